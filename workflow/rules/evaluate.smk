# Both evaluations of the test split: each is scored in evaluate.shards jobs (--set-scatter
# evaluate=N overrides), cut by content hash as the triage is, and merged by rules
# evaluate_zeroshot and evaluate_finetuned into the outputs one job would write.
scattergather:
    evaluate=SETTINGS.evaluate.shards,


rule evaluate_zeroshot_shard:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
    output:
        part="results/evaluate/zeroshot/shards/{scatteritem}.tsv",
        record="results/evaluate/zeroshot/shards/{scatteritem}.json",
    log:
        "results/logs/evaluate_zeroshot_shard_{scatteritem}.log",
    benchmark:
        "results/benchmarks/evaluate_zeroshot_shard_{scatteritem}.tsv"
    wildcard_constraints:
        scatteritem=r"\d+-of-\d+",
    conda:
        "../../envs/model.yaml"
    threads: 4
    resources:
        gpu=config["evaluate"]["devices"],
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        # Read, never written, by the shards: the merging rule writes their own caches into it.
        cache="results/cache/predictions",
        # Outside the outputs: what a killed shard scored is not scored again when it reruns.
        shard_cache=lambda wildcards: get_evaluate_shard_cache(
            "zeroshot", wildcards.scatteritem
        ),
    script:
        "../scripts/evaluate_shard.py"


# Once per adapter: whether auto may score it on a fast path (FP8, Liger), measured on the
# validation split against the adapter's own base scored eagerly (forensic_vlm.speed.gate). On a
# CPU it decides at once that there is none.
rule parity_gate:
    input:
        val="results/split/val.tsv",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
        adapter="results/train/adapter",
    output:
        verdict="results/evaluate/parity_gate.json",
    log:
        "results/logs/parity_gate.log",
    benchmark:
        "results/benchmarks/parity_gate.tsv"
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
        # Its own: what a killed gate scored is not scored again when it reruns.
        cache="results/cache/parity_gate",
    script:
        "../scripts/parity_gate.py"


# The same scoring, with the adapter: only inputs, outputs, logs and the shard's cache differ.
use rule evaluate_zeroshot_shard as evaluate_finetuned_shard with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
        adapter="results/train/adapter",
        parity_gate="results/evaluate/parity_gate.json",
    output:
        part="results/evaluate/finetuned/shards/{scatteritem}.tsv",
        record="results/evaluate/finetuned/shards/{scatteritem}.json",
    log:
        "results/logs/evaluate_finetuned_shard_{scatteritem}.log",
    benchmark:
        "results/benchmarks/evaluate_finetuned_shard_{scatteritem}.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_cache=lambda wildcards: get_evaluate_shard_cache(
            "finetuned", wildcards.scatteritem
        ),


rule evaluate_zeroshot:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        parts=gather.evaluate("results/evaluate/zeroshot/shards/{scatteritem}.tsv"),
    output:
        predictions="results/evaluate/zeroshot/predictions.tsv",
        metrics="results/evaluate/zeroshot/metrics.json",
        report="results/evaluate/zeroshot/classification_report.txt",
        confusion=report(
            "results/evaluate/zeroshot/confusion_matrix.png",
            caption="../report/confusion.rst",
            category="Evaluation",
        ),
    log:
        "results/logs/evaluate_zeroshot.log",
    benchmark:
        "results/benchmarks/evaluate_zeroshot.tsv"
    conda:
        "../../envs/model.yaml"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_caches=lambda wildcards, input: get_evaluate_shard_caches(
            "zeroshot", input
        ),
    script:
        "../scripts/evaluate.py"


use rule evaluate_zeroshot as evaluate_finetuned with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        parts=gather.evaluate("results/evaluate/finetuned/shards/{scatteritem}.tsv"),
        adapter="results/train/adapter",
    output:
        predictions="results/evaluate/finetuned/predictions.tsv",
        metrics="results/evaluate/finetuned/metrics.json",
        report="results/evaluate/finetuned/classification_report.txt",
        confusion=report(
            "results/evaluate/finetuned/confusion_matrix.png",
            caption="../report/confusion.rst",
            category="Evaluation",
        ),
    log:
        "results/logs/evaluate_finetuned.log",
    benchmark:
        "results/benchmarks/evaluate_finetuned.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_caches=lambda wildcards, input: get_evaluate_shard_caches(
            "finetuned", input
        ),
