rule split:
    input:
        manifest="results/manifest/manifest.tsv",
        # The examiners' labels, each case on its side (review.use_for_training), else nothing.
        reviewed=get_review_labels(),
    output:
        train="results/split/train.tsv",
        val="results/split/val.tsv",
        test="results/split/test.tsv",
        summary=report(
            "results/split/summary.tsv",
            caption="../report/split.rst",
            category="Data",
        ),
    log:
        "results/logs/split.log",
    conda:
        "../../envs/data.yaml"
    params:
        classes=config["classes"],
        split=config["split"],
    script:
        "../scripts/split.py"
