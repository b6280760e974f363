# The adapter merged into its base model, a plain transformers checkpoint for vLLM or TGI, checked
# against base + adapter on the test split before it is kept. Not part of `all`: ask for it,
# `snakemake --cores 8 --resources gpu=1 export` (or the folder, results/export/merged).
rule export:
    input:
        adapter="results/train/adapter",
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
    output:
        merged=directory("results/export/merged"),
    log:
        "results/logs/export.log",
    benchmark:
        "results/benchmarks/export.tsv"
    conda:
        "../../envs/model.yaml"
    threads: 4
    resources:
        gpu=1,
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
    script:
        "../scripts/export.py"
