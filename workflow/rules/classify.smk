# Triage of an unlabeled folder or evidence container (classify.input) into results/classify/<case>/:
# the input is inspected once, scored in classify.shards jobs cut by content hash (--set-scatter classify=N
# overrides), and merged by rule classify into the outputs one job would write.
scattergather:
    classify=SETTINGS.classify.shards,


rule classify_listing:
    input:
        evidence=get_classify_input(),
    output:
        listing="results/classify/{case}/listing.jsonl",
    log:
        "results/logs/classify_listing_{case}.log",
    benchmark:
        "results/benchmarks/classify_listing_{case}.tsv"
    wildcard_constraints:
        case="[A-Za-z0-9][A-Za-z0-9._-]*",
    conda:
        "../../envs/model.yaml"  # forensic_vlm.classify (scores too) and the [evidence] readers
    threads: 8
    params:
        # The folder or container the listing reads (an E01: its first segment).
        source=SETTINGS.classify.source,
        manifest=config["manifest"],
        classify=config["classify"],
        # Not read by the script: a changed listing must rerun the triage.
        folder_fingerprint=get_classify_fingerprint,
    script:
        "../scripts/classify_listing.py"


rule classify_shard:
    input:
        listing="results/classify/{case}/listing.jsonl",
        model=get_model_input(),
        adapter=get_classify_adapter(),
        parity_gate=get_classify_parity_gate(),
    output:
        part="results/classify/{case}/shards/{scatteritem}.tsv",
        record="results/classify/{case}/shards/{scatteritem}.json",
    log:
        "results/logs/classify_shard_{case}_{scatteritem}.log",
    benchmark:
        "results/benchmarks/classify_shard_{case}_{scatteritem}.tsv"
    wildcard_constraints:
        case="[A-Za-z0-9][A-Za-z0-9._-]*",
        scatteritem=r"\d+-of-\d+",
    conda:
        "../../envs/model.yaml"
    threads: 8
    resources:
        gpu=config["evaluate"]["devices"],
    params:
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        # Read, never written, by the shards: rule classify merges their own caches into it.
        cache="results/cache/predictions",
        # Outside the outputs: what a killed shard scored is not scored again when it reruns.
        shard_cache=get_classify_shard_cache,
    script:
        "../scripts/classify_shard.py"


rule classify:
    input:
        listing="results/classify/{case}/listing.jsonl",
        parts=gather.classify("results/classify/{{case}}/shards/{scatteritem}.tsv"),
        adapter=get_classify_adapter(),
    output:
        triage="results/classify/{case}/triage.tsv",
        page=report(
            "results/classify/{case}/triage.html",
            caption="../report/triage.rst",
            category="Triage",
        ),
        custody="results/classify/{case}/custody.json",
        csv="results/classify/{case}/triage.csv",
        case_jsonld="results/classify/{case}/case.jsonld",
    log:
        "results/logs/classify_{case}.log",
    benchmark:
        "results/benchmarks/classify_{case}.tsv"
    wildcard_constraints:
        case="[A-Za-z0-9][A-Za-z0-9._-]*",
    conda:
        "../../envs/model.yaml"
    params:
        classes=config["classes"],
        model=config["model"],
        evaluate=config["evaluate"],
        classify=config["classify"],
        manifest=config["manifest"],
        # Only what the page uses: a new report title does not rerun the triage.
        report={key: config["report"][key] for key in ("show_images", "thumbnail_px")},
        cache="results/cache/predictions",
        shard_caches=get_classify_shard_caches,
    script:
        "../scripts/classify.py"
