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
    params:
        raw_data=get_raw_data_folder,
        augment=config["augment"],
    log:
        "results/logs/augment.log",
    benchmark:
        "results/benchmarks/augment.tsv"
    threads: 4
    conda:
        "../../envs/data.yaml"
    script:
        "../scripts/augment.py"
