# Shared set-up and input functions. Logic lives in the forensic_vlm package; this file only
# validates the configuration and tells rules where things are.
from pathlib import Path
from types import SimpleNamespace

import yaml
from snakemake.utils import validate

from forensic_vlm.config import Config, coerce_strings, to_dict
from forensic_vlm.evidence import container_fingerprint, is_container, segments
from forensic_vlm.manifest import fingerprint
from forensic_vlm.speed.compile_cache import keep_compile_cache

# Fills defaults for missing keys and stops with the offending key named on a wrong type or an
# unknown key; the dataclasses then check combinations (e.g. augment classes that do not exist).
with open(
    workflow.source_path("../schemas/config.schema.yaml"), encoding="utf-8"
) as schema_file:
    config.update(coerce_strings(config, yaml.safe_load(schema_file)))
validate(config, schema="../schemas/config.schema.yaml")
SETTINGS = Config.from_dict(config)
# torch.compile's artefacts with the results, not in each node's /tmp: a rerun, or a shard on
# another node of a shared file system, loads what was compiled before.
keep_compile_cache(Path("results/cache/torch_compile"))

DEMO_RAW_DATA = "results/demo/raw_data"
DEMO_LISTING = "results/demo/raw_data.tsv"
DEMO_MODEL = "results/demo/model"
DEMO_ARCHITECTURES = ("llava_next", "qwen2_5_vl", "idefics3")
DEMO_MODELS = {f"results/demo/models/{name}" for name in DEMO_ARCHITECTURES}
DEMO_EXTRACTION = "results/demo/extraction"
DEMO_EXTRACTION_LISTING = "results/demo/extraction.tsv"
DEMO_REVIEW_CASES = "results/demo/review_cases"


def demo_listing_of(source):
    """The listing a demo rule writes beside a demo folder it makes (the extraction, or a
    review case's under results/demo/review_cases), or None for any other folder."""
    if source is None:
        return None
    if Path(source) == Path(DEMO_EXTRACTION):
        return DEMO_EXTRACTION_LISTING
    if Path(source).parent == Path(DEMO_REVIEW_CASES):
        return f"{Path(source)}.tsv"
    return None


# Every configured input path must exist, whatever outputs are already there: a mistyped
# evidence path stops here, naming its key, instead of ending in "Nothing to be done".
SETTINGS.require_input_paths(
    {
        DEMO_RAW_DATA,
        DEMO_MODEL,
        *DEMO_MODELS,
        *(
            [SETTINGS.classify.source]
            if demo_listing_of(SETTINGS.classify.source)
            else []
        ),
    }
)


def uses_demo_data():
    """True when raw_data is the synthetic folder that rule demo_data writes."""
    return Path(SETTINGS.raw_data) == Path(DEMO_RAW_DATA)


def get_raw_data_input():
    """What stages reading raw_data depend on: the demo's listing, or the evidence folder."""
    return DEMO_LISTING if uses_demo_data() else SETTINGS.raw_data


def raw_data_folder_of(path):
    """The evidence folder behind a raw_data input: the demo listing names its folder."""
    return path.removesuffix(".tsv") if path == DEMO_LISTING else path


def get_raw_data_folder(wildcards, input):
    return raw_data_folder_of(input.raw_data)


def get_demo_raw_data_folder(wildcards, output):
    return raw_data_folder_of(output.listing)


def get_raw_data_fingerprint(wildcards):
    """Listing digest of real evidence, so added, removed or replaced files rerun the manifest.

    The demo folder is itself a rule output, which Snakemake already tracks.
    """
    if uses_demo_data():
        return "demo"
    return fingerprint(Path(SETTINGS.raw_data))


def model_input_of(name):
    """The model folder when the workflow builds it or it is local; a hub id is no file."""
    built = {Path(DEMO_MODEL), *map(Path, DEMO_MODELS)}
    if Path(name) in built or Path(name).is_dir():
        return name
    return []


def get_model_input():
    return model_input_of(SETTINGS.model.name_or_path)


COMPARED = [entry.name for entry in SETTINGS.compare]


def compared_settings(name):
    """The compared run's model and train sections, as plain mappings for the rules' params."""
    model, train = SETTINGS.compared(name)
    return to_dict(model), to_dict(train)


def get_compared_model_input(wildcards):
    return model_input_of(SETTINGS.compared(wildcards.name)[0].name_or_path)


def get_compared_model(wildcards):
    return compared_settings(wildcards.name)[0]


def get_compared_train(wildcards):
    return compared_settings(wildcards.name)[1]


def get_demo_extraction_folder(wildcards, output):
    return output.listing.removesuffix(".tsv")


def get_classify_input():
    """What the triage depends on: the demo extraction's listing, the folder itself, or every
    file of a container (each segment of an E01)."""
    source = SETTINGS.classify.source
    if source is None:  # no triage asked for: the rule is never scheduled
        return []
    if listing := demo_listing_of(source):
        return listing
    if is_container(source):
        return [str(path) for path in segments(Path(source))]
    return source


def get_classify_adapter():
    return "results/train/adapter" if SETTINGS.classify.use_adapter else []


def get_classify_parity_gate():
    return "results/evaluate/parity_gate.json" if SETTINGS.classify.use_adapter else []


def get_classify_shard_cache(wildcards):
    """A shard's own prediction cache, outside the outputs (a failed job's outputs are removed)."""
    return f"results/cache/predictions/shards/{wildcards.case}/{wildcards.scatteritem}"


def get_evaluate_shard_cache(kind, scatteritem, name=None):
    """An evaluation shard's own prediction cache (no case name can start with an underscore);
    ``name``: a compared model's."""
    run = f"_evaluate_{kind}" if name is None else f"_evaluate_{name}_{kind}"
    return f"results/cache/predictions/shards/{run}/{scatteritem}"


def get_evaluate_shard_caches(kind, input, name=None):
    """Every shard's own cache, for the merging evaluation rule to merge into the shared one."""
    return [
        get_evaluate_shard_cache(kind, Path(part).stem, name) for part in input.parts
    ]


def get_classify_shard_caches(wildcards, input):
    """Every shard's own cache, for rule classify to merge into the shared one."""
    items = [Path(part).stem for part in input.parts]
    return [
        get_classify_shard_cache(SimpleNamespace(case=wildcards.case, scatteritem=item))
        for item in items
    ]


def get_classify_fingerprint(wildcards):
    """Listing digest of the folder (or the container's files' sizes and times), so added,
    removed or replaced files rerun the triage."""
    source = SETTINGS.classify.source
    if demo_listing_of(source):
        return "demo"
    if is_container(source):
        return container_fingerprint(Path(source))
    return fingerprint(Path(source), skip_documentation=False)


def get_review_labels():
    return "results/review/labels.tsv" if SETTINGS.review.use_for_training else []


def get_review_decision_files():
    """Every case's decisions file under review.dir (with use_for_training)."""
    if not SETTINGS.review.use_for_training:
        return []
    from forensic_vlm.review.labels import decision_files

    return [str(path) for path in decision_files(Path(SETTINGS.review.dir))]


def get_review_listing_digests():
    """sha256 of each reviewed case's triage listing (absent: "none", the rule then names it)."""
    from forensic_vlm.review.labels import listing_of
    from forensic_vlm.tables import sha256_file

    digests = {}
    for file in get_review_decision_files():
        listing = listing_of(Path("results/classify"), Path(file).stem)
        digests[Path(file).stem] = sha256_file(listing) if listing.is_file() else "none"
    return digests


def get_review_summary():
    return "results/review/reviews.json" if SETTINGS.review.use_for_training else []


def get_review_gain():
    """The models before and after the reviewed labels, for the report (with use_for_training)."""
    return ["results/review/gain.json"] if SETTINGS.review.use_for_training else []


def get_final_outputs():
    # The evaluations too, not only the report built from them: Snakemake does not remake a
    # missing file that an up-to-date target no longer needs, so an evaluation killed with
    # Snakemake (its outputs already removed) would otherwise leave "Nothing to be done".
    outputs = ["results/report/index.html"]
    outputs += [
        f"results/evaluate/{kind}/{name}"
        for kind in ("zeroshot", "finetuned")
        for name in ("metrics.json", "predictions.tsv")
    ]
    outputs += [
        f"results/models/{name}/evaluate/{kind}/metrics.json"
        for name in COMPARED
        for kind in ("zeroshot", "finetuned")
    ]
    if COMPARED:
        outputs.append("results/models/comparison.json")
    if SETTINGS.review.use_for_training:
        outputs += [
            f"results/review/before/evaluate/finetuned/{name}"
            for name in ("metrics.json", "predictions.tsv")
        ]
    if SETTINGS.classify.source:
        case = f"results/classify/{SETTINGS.classify.case}"
        outputs += [
            f"{case}/{name}"
            for name in (
                "triage.tsv",
                "triage.html",
                "custody.json",
                "triage.csv",
                "case.jsonld",
            )
        ]
    return outputs
