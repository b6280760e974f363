# Base models side by side (config key compare): each named run trains and is evaluated both ways
# on the same split, by the same scripts as the main chain, under results/models/<name>/; rule
# compare_models then pairs them image by image. Only stale runs rerun: a run's model and train
# settings are its rules' params.
wildcard_constraints:
    name="|".join(COMPARED) if COMPARED else "(?!)",


use rule train as train_model with:
    input:
        train="results/augment/train_augmented.tsv",
        val="results/split/val.tsv",
        augmented="results/augment/images",
        raw_data=get_raw_data_input(),
        model=get_compared_model_input,
        reviews=get_review_summary(),
    output:
        adapter=directory("results/models/{name}/train/adapter"),
        curves="results/models/{name}/train/metrics.csv",
    log:
        "results/logs/models/{name}/train.log",
    benchmark:
        "results/benchmarks/models/{name}/train.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=get_compared_model,
        train=get_compared_train,


use rule evaluate_zeroshot_shard as evaluate_model_zeroshot_shard with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_compared_model_input,
    output:
        part="results/models/{name}/evaluate/zeroshot/shards/{scatteritem}.tsv",
        record="results/models/{name}/evaluate/zeroshot/shards/{scatteritem}.json",
    log:
        "results/logs/models/{name}/evaluate_zeroshot_shard_{scatteritem}.log",
    benchmark:
        "results/benchmarks/models/{name}/evaluate_zeroshot_shard_{scatteritem}.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=get_compared_model,
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_cache=lambda wildcards: get_evaluate_shard_cache(
            "zeroshot", wildcards.scatteritem, wildcards.name
        ),


use rule evaluate_zeroshot_shard as evaluate_model_finetuned_shard with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_compared_model_input,
        adapter="results/models/{name}/train/adapter",
    output:
        part="results/models/{name}/evaluate/finetuned/shards/{scatteritem}.tsv",
        record="results/models/{name}/evaluate/finetuned/shards/{scatteritem}.json",
    log:
        "results/logs/models/{name}/evaluate_finetuned_shard_{scatteritem}.log",
    benchmark:
        "results/benchmarks/models/{name}/evaluate_finetuned_shard_{scatteritem}.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=get_compared_model,
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_cache=lambda wildcards: get_evaluate_shard_cache(
            "finetuned", wildcards.scatteritem, wildcards.name
        ),


use rule evaluate_zeroshot as evaluate_model_zeroshot with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        parts=gather.evaluate(
            "results/models/{{name}}/evaluate/zeroshot/shards/{scatteritem}.tsv"
        ),
    output:
        predictions="results/models/{name}/evaluate/zeroshot/predictions.tsv",
        metrics="results/models/{name}/evaluate/zeroshot/metrics.json",
        report="results/models/{name}/evaluate/zeroshot/classification_report.txt",
        confusion="results/models/{name}/evaluate/zeroshot/confusion_matrix.png",
    log:
        "results/logs/models/{name}/evaluate_zeroshot.log",
    benchmark:
        "results/benchmarks/models/{name}/evaluate_zeroshot.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=get_compared_model,
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_caches=lambda wildcards, input: get_evaluate_shard_caches(
            "zeroshot", input, wildcards.name
        ),


use rule evaluate_zeroshot as evaluate_model_finetuned with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        parts=gather.evaluate(
            "results/models/{{name}}/evaluate/finetuned/shards/{scatteritem}.tsv"
        ),
        adapter="results/models/{name}/train/adapter",
    output:
        predictions="results/models/{name}/evaluate/finetuned/predictions.tsv",
        metrics="results/models/{name}/evaluate/finetuned/metrics.json",
        report="results/models/{name}/evaluate/finetuned/classification_report.txt",
        confusion="results/models/{name}/evaluate/finetuned/confusion_matrix.png",
    log:
        "results/logs/models/{name}/evaluate_finetuned.log",
    benchmark:
        "results/benchmarks/models/{name}/evaluate_finetuned.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=get_compared_model,
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_caches=lambda wildcards, input: get_evaluate_shard_caches(
            "finetuned", input, wildcards.name
        ),


rule compare_models:
    input:
        evaluations=expand(
            "results/models/{name}/evaluate/{kind}/predictions.tsv",
            name=COMPARED,
            kind=("zeroshot", "finetuned"),
        ),
        curves=expand("results/models/{name}/train/metrics.csv", name=COMPARED),
        adapters=expand("results/models/{name}/train/adapter", name=COMPARED),
    output:
        comparison="results/models/comparison.json",
        table="results/models/comparison.tsv",
    log:
        "results/logs/compare_models.log",
    conda:
        "../../envs/report.yaml"
    params:
        names=COMPARED,
        classes=config["classes"],
    script:
        "../scripts/compare_models.py"
