# The examiners' decisions as training labels (review.use_for_training): every case's decisions
# file, located in its triage listing and read again from the evidence, into results/review/.
# The listings are params, not inputs: a retrained adapter re-triages a case without changing
# its listing, so the labels (and the training after them) do not go stale in a loop.
rule review_labels:
    input:
        manifest="results/manifest/manifest.tsv",
        decisions=get_review_decision_files(),
    output:
        labels="results/review/labels.tsv",
        withheld="results/review/withheld.tsv",
        summary="results/review/reviews.json",
    log:
        "results/logs/review_labels.log",
    conda:
        "../../envs/model.yaml"  # reads the triage listing (forensic_vlm.classify) and containers
    params:
        classes=config["classes"],
        split=config["split"],
        test_cases=config["review"]["test_cases"],
        classify_dir="results/classify",
        # Not read by the script: a re-listed case's evidence reruns the labels.
        listings=get_review_listing_digests(),
    script:
        "../scripts/review_labels.py"


# The model before the reviewed labels, for the report's before-and-after (review.use_for_training):
# trained as rule train is, on the same training table less every reviewed row (and their
# augmented copies), and scored on the same test split as the model trained with them.
use rule train as train_before_review with:
    input:
        train="results/augment/train_augmented.tsv",
        val="results/split/val.tsv",
        augmented="results/augment/images",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
    output:
        adapter=directory("results/review/before/adapter"),
        curves="results/review/before/metrics.csv",
    log:
        "results/logs/review_before/train.log",
    benchmark:
        "results/benchmarks/review_before/train.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        train=config["train"],
        without_review=True,


use rule evaluate_finetuned_shard as evaluate_before_review_shard with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
        adapter="results/review/before/adapter",
    output:
        part="results/review/before/evaluate/finetuned/shards/{scatteritem}.tsv",
        record="results/review/before/evaluate/finetuned/shards/{scatteritem}.json",
    log:
        "results/logs/review_before/evaluate_shard_{scatteritem}.log",
    benchmark:
        "results/benchmarks/review_before/evaluate_shard_{scatteritem}.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_cache=lambda wildcards: get_evaluate_shard_cache(
            "finetuned", wildcards.scatteritem, "review_before"
        ),


use rule evaluate_finetuned as evaluate_before_review with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        parts=gather.evaluate(
            "results/review/before/evaluate/finetuned/shards/{scatteritem}.tsv"
        ),
        adapter="results/review/before/adapter",
    output:
        predictions="results/review/before/evaluate/finetuned/predictions.tsv",
        metrics="results/review/before/evaluate/finetuned/metrics.json",
        report="results/review/before/evaluate/finetuned/classification_report.txt",
        confusion="results/review/before/evaluate/finetuned/confusion_matrix.png",
    log:
        "results/logs/review_before/evaluate.log",
    benchmark:
        "results/benchmarks/review_before/evaluate.tsv"
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        cache="results/cache/predictions",
        shard_caches=lambda wildcards, input: get_evaluate_shard_caches(
            "finetuned", input, "review_before"
        ),


# Before and after the reviewed labels, paired on the same test images, for the report.
rule review_gain:
    input:
        summary="results/review/reviews.json",
        test="results/split/test.tsv",
        before="results/review/before/evaluate/finetuned/metrics.json",
        after="results/evaluate/finetuned/metrics.json",
    output:
        gain="results/review/gain.json",
    log:
        "results/logs/review_gain.log",
    conda:
        "../../envs/report.yaml"
    params:
        classes=config["classes"],
        evaluate=config["evaluate"],
    script:
        "../scripts/review_gain.py"
