# Triage of an unlabeled folder (classify.input_dir) into results/classify/<case>/.
rule classify:
    input:
        folder=get_classify_input(),
        model=get_model_input(),
        adapter=get_classify_adapter(),
    output:
        triage="results/classify/{case}/triage.tsv",
        page=report(
            "results/classify/{case}/triage.html",
            caption="../report/triage.rst",
            category="Triage",
        ),
        custody="results/classify/{case}/custody.json",
    log:
        "results/logs/classify_{case}.log",
    benchmark:
        "results/benchmarks/classify_{case}.tsv"
    wildcard_constraints:
        case="[A-Za-z0-9][A-Za-z0-9._-]*",
    conda:
        "../../envs/model.yaml"
    threads: 8
    resources:
        gpu=config["evaluate"]["devices"],
    params:
        folder=get_classify_folder,
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        classify=config["classify"],
        manifest=config["manifest"],
        # Only what the page uses: a new report title does not rerun the triage.
        report={key: config["report"][key] for key in ("show_images", "thumbnail_px")},
        # Outside the outputs: what an interrupted run scored is not scored again.
        cache="results/cache/predictions",
        # Not read by the script: a changed listing must rerun the triage.
        folder_fingerprint=get_classify_fingerprint,
    script:
        "../scripts/classify.py"
