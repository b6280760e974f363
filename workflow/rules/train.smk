rule train:
    input:
        train="results/augment/train_augmented.tsv",
        val="results/split/val.tsv",
        augmented="results/augment/images",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
        # With review.use_for_training: which decisions files the reviewed rows came from.
        reviews=get_review_summary(),
    output:
        adapter=directory("results/train/adapter"),
        curves=report(
            "results/train/metrics.csv",
            caption="../report/curves.rst",
            category="Training",
        ),
    log:
        "results/logs/train.log",
    benchmark:
        "results/benchmarks/train.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 4
    resources:
        gpu=config["train"]["devices"],
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        train=config["train"],
    script:
        "../scripts/train.py"
