"""``forensic-vlm``: the workflow's stages as commands, for use without Snakemake.

Each command reads the same ``config.yaml`` the workflow uses and calls the same package function
as the workflow's rule, so results are identical. Model commands import torch only when run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from forensic_vlm.config import Config, to_dict
from forensic_vlm.errors import ForensicVlmError, InputNotFoundError
from forensic_vlm.logs import setup_logging
from forensic_vlm.manifest import build_manifest
from forensic_vlm.split import split_dataset

#: Each command's arguments that name something that must already exist.
INPUTS = {
    "manifest": ("raw_data",),
    "split": ("manifest",),
    "augment": ("train", "raw_data"),
    "train": ("train", "val", "raw_data", "augment_dir"),
    "evaluate": ("table", "raw_data", "adapter"),
    "classify": ("input_dir", "adapter"),
    "report": ("results", "raw_data"),
    "export": ("adapter", "test", "raw_data"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forensic-vlm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="config.yaml (default: built-in defaults)")
    parser.add_argument("--log", type=Path, default=None, help="also write the log to this file")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-data", help="write the synthetic demo evidence folder")
    demo.add_argument("out_dir", type=Path)
    demo.add_argument("--listing", type=Path, default=None, help="listing TSV (default: OUT_DIR.tsv)")

    manifest = commands.add_parser("manifest", help="inspect raw_data: manifest.tsv and rejects.tsv")
    manifest.add_argument("raw_data", type=Path)
    manifest.add_argument("--out", type=Path, default=Path("results/manifest"))
    manifest.add_argument("--workers", type=int, default=1)

    split = commands.add_parser("split", help="train/val/test tables from manifest.tsv")
    split.add_argument("manifest", type=Path)
    split.add_argument("--out", type=Path, default=Path("results/split"))

    augment = commands.add_parser("augment", help="augmented children of training images")
    augment.add_argument("train", type=Path, help="results/split/train.tsv")
    augment.add_argument("--raw-data", type=Path, required=True)
    augment.add_argument("--out", type=Path, default=Path("results/augment"))
    augment.add_argument("--workers", type=int, default=1)

    demo_model = commands.add_parser("demo-model", help="write the demo's tiny random model (demo_model.architecture)")
    demo_model.add_argument("out_dir", type=Path)

    train = commands.add_parser("train", help="QLoRA fine-tuning; writes the adapter folder")
    train.add_argument("train", type=Path, help="results/augment/train_augmented.tsv (or a split's train.tsv)")
    train.add_argument("val", type=Path, help="results/split/val.tsv")
    train.add_argument("--raw-data", type=Path, required=True)
    train.add_argument("--augment-dir", type=Path, default=None, help="folder of the augmented children")
    train.add_argument("--adapter", type=Path, default=Path("results/train/adapter"))
    train.add_argument("--work-dir", type=Path, default=None, help="checkpoints and logs (default: adapter's parent)")

    evaluate = commands.add_parser("evaluate", help="score a split table; metrics, predictions, figure")
    evaluate.add_argument("table", type=Path, help="results/split/test.tsv")
    evaluate.add_argument("--raw-data", type=Path, required=True)
    evaluate.add_argument("--out", type=Path, required=True)
    evaluate.add_argument("--adapter", type=Path, default=None, help="omit for zero-shot")
    evaluate.add_argument("--cache-dir", type=Path, default=None, help="prediction cache (skip images scored before)")

    classify = commands.add_parser(
        "classify",
        help="triage a folder or an evidence container: triage.tsv/.html/.csv, custody.json, case.jsonld",
    )
    classify.add_argument(
        "input_dir",
        type=Path,
        help="folder, or container (E01, raw disk image, zip, tar), to triage: read only, in place",
    )
    classify.add_argument("--partition", default=None, help="one partition of a disk image (p1, p2; default: all)")
    classify.add_argument("--inside-path", default=None, help="one folder inside the container (default: all of it)")
    classify.add_argument(
        "--no-verify-container", action="store_true", help="do not check an E01's stored hashes first (recorded)"
    )
    classify.add_argument(
        "--accept-hash-mismatch", action="store_true", help="triage a container that fails its hash check (recorded)"
    )
    classify.add_argument("--model", default=None, help="base model folder or hub id (default: model.name_or_path)")
    classify.add_argument("--adapter", type=Path, default=None, help="fine-tuned adapter folder; omit for zero-shot")
    classify.add_argument("--case", default=None, help="case name (default: classify.case)")
    classify.add_argument("--out", type=Path, default=None, help="output folder (default: results/classify/<case>)")
    classify.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("results/cache/predictions"),
        help="prediction cache: what an interrupted run already scored is not scored again",
    )
    classify.add_argument("--workers", type=int, default=1, help="processes that read and check the files")

    report = commands.add_parser("report", help="the comparison page from a finished run's results folder")
    report.add_argument("--results", type=Path, default=Path("results"), help="the run's results folder")
    report.add_argument("--raw-data", type=Path, required=True, help="the evidence folder (for thumbnails)")
    report.add_argument("--out", type=Path, default=None, help="output folder (default: RESULTS/report)")

    export = commands.add_parser(
        "export", help="merge the adapter into its base model: a plain transformers checkpoint to serve"
    )
    export.add_argument("--adapter", type=Path, default=Path("results/train/adapter"))
    export.add_argument("--out", type=Path, required=True, help="new folder for the merged checkpoint")
    export.add_argument("--test", type=Path, default=Path("results/split/test.tsv"), help="the parity check's images")
    export.add_argument("--raw-data", type=Path, required=True, help="the evidence folder the test table names")
    export.add_argument("--model", default=None, help="base model folder or hub id (default: model.name_or_path)")
    export.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="of the saved weights")

    review = commands.add_parser("review", help="the examiner's decisions on a triage (review.dir/<case>.jsonl)")
    actions = review.add_subparsers(dest="review_command", required=True)
    served = actions.add_parser("serve", help="the review page on http://127.0.0.1:PORT/ (this machine only)")
    served.add_argument("--case", required=True, help="the triage's case name")
    served.add_argument(
        "--results", type=Path, default=None, help="the triage folder (default: results/classify/<case>)"
    )
    served.add_argument("--port", type=int, default=8765)
    imported = actions.add_parser(
        "import", help="decisions from triage.csv edited in a spreadsheet, or a forensic suite's export"
    )
    imported.add_argument("file", type=Path, help="CSV with a SHA-256 column and a category column")
    imported.add_argument("--case", required=True, help="the triage's case name")
    imported.add_argument("--examiner", required=True, help="who made the decisions")
    imported.add_argument(
        "--results", type=Path, default=None, help="the triage folder (default: results/classify/<case>)"
    )
    imported.add_argument("--column", default="Category", help="the category column (default: Category)")
    imported.add_argument(
        "--all-rows", action="store_true", help="a category equal to the model's is a decision too (every row reviewed)"
    )
    return parser


def require_inputs(args: argparse.Namespace) -> None:
    """Stop, naming the argument, when a path the command reads does not exist."""
    given = [("--config", args.config)] + [(name, getattr(args, name)) for name in INPUTS.get(args.command, ())]
    for name, path in given:
        if path is not None and not Path(path).exists():
            raise InputNotFoundError(f"{args.command}: {name.replace('_', '-')} {path} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.log)
    try:
        require_inputs(args)
        config = Config.from_yaml(args.config) if args.config else Config()
        # Stage modules are imported by their command: training needs neither Albumentations nor
        # the demo's drawing code, and model commands import torch only when run.
        if args.command == "demo-data":
            from forensic_vlm.demo_data import generate_demo_data

            listing = args.listing or args.out_dir.with_suffix(".tsv")
            generate_demo_data(args.out_dir, listing, list(config.classes), config.demo)
        elif args.command == "manifest":
            build_manifest(args.raw_data, args.out, config.classes, config.manifest, workers=args.workers)
        elif args.command == "split":
            split_dataset(args.manifest, args.out, config.classes, config.split)
        elif args.command == "augment":
            from forensic_vlm.augment import augment_training_set

            augment_training_set(args.train, args.raw_data, args.out, config.augment, workers=args.workers)
        elif args.command == "demo-model":
            from forensic_vlm.demo_model import build_demo_model

            build_demo_model(args.out_dir, config.demo_model)
        elif args.command == "train":
            from forensic_vlm.train import load_training_data, train_adapter

            data = load_training_data(args.train, args.val, args.raw_data, args.augment_dir)
            work_dir = args.work_dir or args.adapter.parent
            train_adapter(
                data,
                list(config.classes),
                model_config=config.model,
                config=config.train,
                adapter_dir=args.adapter,
                work_dir=work_dir,
            )
        elif args.command == "evaluate":
            from forensic_vlm.evaluate import evaluate_split

            evaluate_split(
                args.table,
                args.raw_data,
                classes=list(config.classes),
                model_config=config.model,
                config=config.evaluate,
                out_dir=args.out,
                adapter=args.adapter,
                cache_dir=args.cache_dir,
            )
        elif args.command == "classify":
            _classify(args, config)
        elif args.command == "report":
            from forensic_vlm.report import ReportInputs, build_report

            inputs = ReportInputs.from_results(args.results, args.raw_data, to_dict(config))
            build_report(inputs, list(config.classes), config.report, args.out or args.results / "report")
        elif args.command == "export":
            _export(args, config)
        elif args.command == "review":
            _review(args, config)
    except ForensicVlmError as error:
        logging.getLogger("forensic_vlm").error("%s", error)
        return 2
    return 0


def _review(args: argparse.Namespace, config: Config) -> None:
    from forensic_vlm.review.decisions import DecisionLog, decisions_path
    from forensic_vlm.review.imports import import_decisions

    log = DecisionLog(decisions_path(Path(config.review.dir), args.case), config.classes)
    if args.review_command == "serve":
        from forensic_vlm.review.server import ReviewSession, serve

        serve(ReviewSession(args.results or Path("results/classify") / args.case, log, list(config.classes)), args.port)
        return
    triage = (args.results or Path("results/classify") / args.case) / "triage.tsv"
    if not triage.is_file():
        raise InputNotFoundError(f"review import: {triage} does not exist (run the triage of case {args.case} first)")
    if not args.file.is_file():
        raise InputNotFoundError(f"review import: {args.file} does not exist")
    import_decisions(args.file, triage, log, examiner=args.examiner, column=args.column, all_rows=args.all_rows)


def _export(args: argparse.Namespace, config: Config) -> None:
    import dataclasses

    from forensic_vlm.models.export import export_merged
    from forensic_vlm.tables import examples_from_table, read_tsv

    model = dataclasses.replace(config.model, name_or_path=args.model) if args.model else config.model
    export_merged(
        args.adapter,
        args.out,
        examples=examples_from_table(read_tsv(args.test), args.raw_data),
        classes=list(config.classes),
        model_config=model,
        evaluate_config=config.evaluate,
        dtype=args.dtype,
    )


def _classify(args: argparse.Namespace, config: Config) -> None:
    import dataclasses

    from forensic_vlm.classify import classify_folder

    model = dataclasses.replace(config.model, name_or_path=args.model) if args.model else config.model
    settings = dataclasses.replace(
        config.classify,
        case=args.case or config.classify.case,
        partition=args.partition or config.classify.partition,
        inside_path=args.inside_path or config.classify.inside_path,
        verify_container=config.classify.verify_container and not args.no_verify_container,
        accept_hash_mismatch=config.classify.accept_hash_mismatch or args.accept_hash_mismatch,
    )
    classify_folder(
        args.input_dir,
        args.out or Path("results/classify") / settings.case,
        classes=list(config.classes),
        model_config=model,
        evaluate_config=config.evaluate,
        config=settings,
        manifest_config=config.manifest,
        report_config=config.report,
        adapter=args.adapter,
        cache_dir=args.cache_dir,
        workers=args.workers,
    )


if __name__ == "__main__":
    sys.exit(main())
