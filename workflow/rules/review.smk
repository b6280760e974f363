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
