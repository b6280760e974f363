rule evaluate_zeroshot:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
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
    threads: 4
    resources:
        gpu=config["evaluate"]["devices"],
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        # Outside the outputs: an image scored before by the same model is not scored again.
        cache="results/cache/predictions",
    script:
        "../scripts/evaluate.py"


# The same scoring, with the adapter: only inputs, outputs and logs differ.
use rule evaluate_zeroshot as evaluate_finetuned with:
    input:
        test="results/split/test.tsv",
        raw_data=get_raw_data_input(),
        model=get_model_input(),
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
