rule report:
    input:
        manifest="results/manifest/manifest.tsv",
        rejects="results/manifest/rejects.tsv",
        split_summary="results/split/summary.tsv",
        test="results/split/test.tsv",
        lineage="results/augment/lineage.tsv",
        curves="results/train/metrics.csv",
        adapter="results/train/adapter",
        zeroshot="results/evaluate/zeroshot/metrics.json",
        finetuned="results/evaluate/finetuned/metrics.json",
        raw_data=get_raw_data_input(),
        # The base models side by side, when compare names any.
        comparison=["results/models/comparison.json"] if COMPARED else [],
        # Before and after the examiners' reviewed labels, with review.use_for_training.
        review_gain=get_review_gain(),
    output:
        page=report(
            "results/report/index.html",
            caption="../report/comparison.rst",
            category="Evaluation",
        ),
    log:
        "results/logs/report.log",
    conda:
        "../../envs/report.yaml"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        report=config["report"],
        # The whole configuration, for the page's provenance hash only.
        config=config,
    script:
        "../scripts/report.py"
