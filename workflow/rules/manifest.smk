rule manifest:
    input:
        raw_data=get_raw_data_input(),
    output:
        manifest=report(
            "results/manifest/manifest.tsv",
            caption="../report/manifest.rst",
            category="Data",
        ),
        rejects=report(
            "results/manifest/rejects.tsv",
            caption="../report/rejects.rst",
            category="Data",
        ),
    log:
        "results/logs/manifest.log",
    benchmark:
        "results/benchmarks/manifest.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 8
    params:
        raw_data=get_raw_data_folder,
        classes=config["classes"],
        manifest=config["manifest"],
        # Not read by the script: a changed listing must rerun the manifest.
        raw_data_fingerprint=get_raw_data_fingerprint,
    script:
        "../scripts/manifest.py"
