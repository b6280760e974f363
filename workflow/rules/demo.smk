# The listing is the output Snakemake tracks: a directory output would get Snakemake's own
# timestamp file inside it, which the manifest would then have to treat as evidence.
rule demo_data:
    output:
        listing="results/demo/raw_data.tsv",
    log:
        "results/logs/demo_data.log",
    conda:
        "../../envs/data.yaml"
    params:
        raw_data=get_demo_raw_data_folder,
        classes=config["classes"],
        demo=config["demo"],
    script:
        "../scripts/demo_data.py"


rule demo_model:
    output:
        directory("results/demo/model"),
    log:
        "results/logs/demo_model.log",
    conda:
        "../../envs/model.yaml"
    params:
        demo_model=config["demo_model"],
    script:
        "../scripts/demo_model.py"


# A tiny model of each architecture, for a comparison of base models on the demo (compare.smk).
use rule demo_model as demo_model_of_architecture with:
    output:
        directory("results/demo/models/{architecture}"),
    log:
        "results/logs/demo_model_{architecture}.log",
    wildcard_constraints:
        architecture="|".join(DEMO_ARCHITECTURES),
    params:
        demo_model=lambda wildcards: {
            **config["demo_model"],
            "architecture": wildcards.architecture,
        },


# The demo's unlabeled phone extraction for rule classify; its true classes are only in the listing.
rule demo_extraction:
    output:
        listing="results/demo/extraction.tsv",
    log:
        "results/logs/demo_extraction.log",
    conda:
        "../../envs/data.yaml"
    params:
        folder=get_demo_extraction_folder,
        classes=config["classes"],
        demo=config["demo"],
    script:
        "../scripts/demo_extraction.py"


# A new phone for the review loop (docs/review.md): raw_data's scenes in another look, which the
# first model gets wrong. Triaged as any folder (classify.input: results/demo/review_cases/<case>);
# the true classes, in the listing, stand for the examiner's decisions.
rule demo_review_case:
    output:
        listing="results/demo/review_cases/{case}.tsv",
        # The examiner's decisions, as a forensic suite exports them (SHA-256, Category).
        export="results/demo/review_cases/{case}_examiner.csv",
    log:
        "results/logs/demo_review_case_{case}.log",
    wildcard_constraints:
        case="[A-Za-z0-9][A-Za-z0-9._-]*",
    conda:
        "../../envs/data.yaml"
    params:
        folder=get_demo_extraction_folder,
        classes=config["classes"],
        demo=config["demo"],
    script:
        "../scripts/demo_review_case.py"
