rule augment:
    input:
        train="results/split/train.tsv",
        raw_data=get_raw_data_input(),
    output:
        images=directory("results/augment/images"),
        lineage=report(
            "results/augment/lineage.tsv",
            caption="../report/lineage.rst",
            category="Data",
        ),
        training="results/augment/train_augmented.tsv",
    log:
        "results/logs/augment.log",
    benchmark:
        "results/benchmarks/augment.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 4
    params:
        raw_data=get_raw_data_folder,
        augment=config["augment"],
        # Outside the outputs, so children of unchanged parents survive a rerun.
        cache="results/cache/augment",
    script:
        "../scripts/augment.py"
