from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/split.smk"
include: "workflow/rules/augment.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/compare.smk"
# After train and evaluate: the model before the reviewed labels reuses their rules.
include: "workflow/rules/review.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/classify.smk"
include: "workflow/rules/export.smk"


# The target only gathers outputs: it runs on the submitting host, never as a cluster job.
localrules:
    all,


rule all:
    default_target: True
    input:
        get_final_outputs(),
