"""Shared helpers: small real images, evidence trees, and proof that evidence is never written."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from forensic_vlm.config import ModelConfig
from forensic_vlm.tables import sha256_file

REPO = Path(__file__).resolve().parents[1]


def image_bytes(seed: int, size: tuple[int, int] = (64, 48), fmt: str = "JPEG", **save) -> bytes:
    """A small image whose content (random blocks) differs clearly from any other seed's."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def tree_hashes(root: Path) -> dict[str, tuple[str, int]]:
    """Every entry under root: content hash (or link target) and mode, to detect any change."""
    found = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            info = path.lstat()
            key = os.fsencode(path.relative_to(root)).hex()
            if stat.S_ISLNK(info.st_mode):
                found[key] = ("link:" + os.readlink(path), info.st_mode)
            elif stat.S_ISREG(info.st_mode):
                found[key] = (sha256_file(path), info.st_mode)
            else:
                found[key] = ("", info.st_mode)
    return found


def make_read_only(root: Path) -> None:
    """Remove write permission everywhere under root (stops every user but root)."""
    for directory, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(directory, name)
            if not path.is_symlink() and path.is_file():
                path.chmod(path.stat().st_mode & ~0o222)
        Path(directory).chmod(Path(directory).stat().st_mode & ~0o222)


def restore_writable(root: Path) -> None:
    for directory, _, filenames in os.walk(root):
        Path(directory).chmod(Path(directory).stat().st_mode | 0o200)
        for name in filenames:
            path = Path(directory, name)
            if not path.is_symlink() and path.is_file():
                path.chmod(path.stat().st_mode | 0o200)


def read_only_mount_available() -> bool:
    """Root ignores permission bits; a read-only bind mount in a private namespace does not."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


def read_only_command(root: Path, command: list[str]) -> list[str]:
    """Wrap a command so that ``root`` is mounted read-only for it (when the machine allows)."""
    if not read_only_mount_available():
        return command
    quoted = " ".join(f"'{c}'" for c in command)
    return ["unshare", "-m", "sh", "-c", f"mount --bind -o ro '{root}' '{root}' && exec {quoted}"]


@contextmanager
def evidence_unchanged(root: Path) -> Iterator[None]:
    """Make ``root`` read-only for the block and assert every byte and mode is as before."""
    before = tree_hashes(root)
    make_read_only(root)
    modes = tree_hashes(root)
    try:
        yield
    finally:
        after = tree_hashes(root)
        restore_writable(root)
    assert after == modes, "evidence folder changed"
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}


@pytest.fixture
def raw_tree(tmp_path: Path) -> Path:
    """A small valid evidence folder: four classes, five distinct images each."""
    root = tmp_path / "raw_data"
    folders = ["0_irrelevant", "1_chat_history", "2_transaction_place", "3_drug_raw"]
    for label, folder in enumerate(folders):
        for index in range(5):
            write(root / folder / f"img_{index}.jpg", image_bytes(100 * label + index))
    return root


@pytest.fixture(scope="session", autouse=True)
def repository_raw_data_untouched() -> Iterator[None]:
    """Whatever the tests run, the repository's own raw_data/ ends as it began."""
    root = REPO / "raw_data"
    before = tree_hashes(root) if root.exists() else {}
    yield
    assert (tree_hashes(root) if root.exists() else {}) == before, "the tests wrote under raw_data/"


#: Where the tiny model is kept between test sessions (FORENSIC_VLM_TEST_CACHE overrides).
TEST_CACHE = Path(os.environ.get("FORENSIC_VLM_TEST_CACHE", Path.home() / ".cache" / "forensic-vlm" / "tests"))


def tiny_model_key(config) -> str:
    """What the tiny model's files depend on: its settings, the code that builds it, the library
    versions that write it, and the tokenizer it is given."""
    import dataclasses
    import hashlib
    import importlib.metadata

    import forensic_vlm.demo_model

    parts = [
        json.dumps(dataclasses.asdict(config), sort_keys=True),
        Path(forensic_vlm.demo_model.__file__).read_text(encoding="utf-8"),
        *(importlib.metadata.version(name) for name in ("transformers", "torch", "safetensors", "tokenizers")),
        os.environ.get("FORENSIC_VLM_TEST_TOKENIZER", ""),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny random LLaVA-NeXT, saved and loaded like any real checkpoint.

    Built once and kept in TEST_CACHE under a key of everything it depends on; a cached copy is
    used only if every file matches the SHA256SUMS written with it, and each session works on a
    copy of its own. On the device machine, which lacks mistral-common, FORENSIC_VLM_TEST_TOKENIZER
    names a saved processor folder whose (identical, real) tokenizer is used instead.
    """
    from filelock import FileLock

    from forensic_vlm.config import DemoModelConfig
    from forensic_vlm.demo_model import build_demo_model
    from forensic_vlm.errors import ForensicVlmError
    from forensic_vlm.integrity import LISTING, read_listing, verify, write_listing

    config = DemoModelConfig()
    cache = TEST_CACHE
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: kept for this session only
        cache = tmp_path_factory.getbasetemp()
    cached = cache / f"tiny-model-{tiny_model_key(config)}"
    with FileLock(cache / f"{cached.name}.lock"):
        try:
            verify(cached, read_listing(cached / LISTING), str(cached / LISTING))
        except ForensicVlmError:  # not built yet, or damaged: built again
            shutil.rmtree(cached, ignore_errors=True)
            tokenizer = None
            if os.environ.get("FORENSIC_VLM_TEST_TOKENIZER"):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(os.environ["FORENSIC_VLM_TEST_TOKENIZER"])
            build_demo_model(cached, config, tokenizer)
            write_listing(cached)
    model = tmp_path_factory.mktemp("model") / "tiny"
    shutil.copytree(cached, model, ignore=shutil.ignore_patterns(LISTING))
    return model


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo evidence (6 images a class) with its manifest; train/val/test are tables of it."""
    from forensic_vlm.config import DEFAULT_CLASSES, DemoConfig, ManifestConfig
    from forensic_vlm.demo_data import generate_demo_data
    from forensic_vlm.manifest import build_manifest
    from forensic_vlm.split import SPLIT_COLUMNS
    from forensic_vlm.tables import read_tsv, write_tsv

    root = tmp_path_factory.mktemp("tiny_data")
    raw = root / "raw_data"
    generate_demo_data(raw, root / "listing.tsv", list(DEFAULT_CLASSES), DemoConfig(6, seed=3, bad_examples=False))
    build_manifest(raw, root / "manifest", DEFAULT_CLASSES, ManifestConfig())
    rows = read_tsv(root / "manifest" / "manifest.tsv")
    rows = [{**r, "group": r["sha256"]} for r in rows]
    write_tsv(root / "train.tsv", SPLIT_COLUMNS, rows)
    write_tsv(root / "val.tsv", SPLIT_COLUMNS, rows[::3])
    return {"raw_data": raw, "train": root / "train.tsv", "val": root / "val.tsv"}


#: Training settings that make the tiny model learn in seconds on the CPU.
FAST = {
    "learning_rate": 3e-3,
    "batch_size": 4,
    "accumulate_grad_batches": 1,
    "precision": "32-true",
    "gradient_checkpointing": False,
    "num_workers": 0,
}


def training_batch(tiny_model: Path, tiny_dataset: dict, every: int) -> dict:
    """One ``train``-mode batch (prompt, answer and labels) of every ``every``-th tiny training image."""
    from forensic_vlm.batches import Collator, examples_from_table
    from forensic_vlm.config import REFERENCE_QUESTION
    from forensic_vlm.images import load_checked_image
    from forensic_vlm.modeling import load_processor
    from forensic_vlm.prompting import answer_tokens, build_prompt
    from forensic_vlm.tables import read_tsv

    labels = [0, 1, 2, 3]
    processor = load_processor(tiny_model)
    prompt = build_prompt(processor, REFERENCE_QUESTION)
    answer = answer_tokens(processor, REFERENCE_QUESTION, labels)
    examples = examples_from_table(read_tsv(tiny_dataset["train"]), tiny_dataset["raw_data"])[::every]
    items = [(i, load_checked_image(e.path, e.sha256)) for i, e in enumerate(examples)]
    return Collator(processor, prompt, answer, labels=labels, mode="train")(items, [e.label for e in examples])


def model_config(tiny_model: Path, quantization: str = "none"):
    from forensic_vlm.config import ModelConfig

    return ModelConfig(name_or_path=str(tiny_model), quantization=quantization, device="cpu")


@pytest.fixture(scope="session")
def trained(tiny_model: Path, tiny_dataset, tmp_path_factory) -> dict:
    """An adapter of the tiny model, trained once for the tests that score with one."""
    from forensic_vlm.config import DEFAULT_CLASSES, TrainConfig
    from forensic_vlm.train import load_training_data, train_adapter

    work = tmp_path_factory.mktemp("train")
    data = load_training_data(tiny_dataset["train"], tiny_dataset["val"], tiny_dataset["raw_data"], None)
    metrics = train_adapter(
        data,
        list(DEFAULT_CLASSES),
        model_config=model_config(tiny_model),
        config=TrainConfig(**FAST, epochs=2),
        adapter_dir=work / "adapter",
        work_dir=work,
    )
    return {"work": work, "adapter": work / "adapter", "metrics": metrics}


#: ``forensic-vlm`` as a plain new process (the entry point itself; DDP ranks rerun its command line).
CLI = (sys.executable, "-m", "forensic_vlm")


def eager_and_compiled_losses(model: ModelConfig, dataset: dict[str, Path], work: Path, quantization: str):
    """train.compile's check: one epoch of the tiny model trained eager and then compiled on the same
    images (recomputing, so the compiled graph is replayed in the backward pass); per-step losses
    and the returned metrics of each, keyed by whether it was compiled."""
    import csv

    from forensic_vlm.config import DEFAULT_CLASSES, TrainConfig
    from forensic_vlm.train import load_training_data, train_adapter

    data = load_training_data(dataset["train"], dataset["val"], dataset["raw_data"], None)
    losses, metrics = {}, {}
    for compiled in (False, True):
        folder = work / f"compiled_{compiled}"
        train = TrainConfig(
            learning_rate=3e-3, epochs=1, batch_size=2, accumulate_grad_batches=1, num_workers=0,
            quantization=quantization, gradient_checkpointing=True, compile=compiled,
        )  # fmt: skip
        metrics[compiled] = train_adapter(
            data, list(DEFAULT_CLASSES), model_config=model, config=train,
            adapter_dir=folder / "adapter", work_dir=folder,
        )  # fmt: skip
        with open(folder / "metrics.csv", newline="") as handle:
            losses[compiled] = np.array([float(r["train_loss"]) for r in csv.DictReader(handle) if r["train_loss"]])
    assert (metrics[False]["compiled"], metrics[True]["compiled"]) == (False, True)
    assert len(losses[True]) == len(losses[False]) > 3
    return losses, metrics


def train_command(config: Path, dataset: dict[str, Path], adapter: Path, log: Path | None = None) -> list[str]:
    """The arguments of ``forensic-vlm train`` on the tiny dataset (for a process of its own:
    ``warm_processes.run``, or after ``python -m forensic_vlm`` for DDP ranks)."""
    return [
        *("--config", str(config)),
        *(("--log", str(log)) if log else ()),
        *("train", str(dataset["train"]), str(dataset["val"]), "--raw-data", str(dataset["raw_data"])),
        *("--adapter", str(adapter)),
    ]


DEMO_JOBS = {
    "demo_data",
    "demo_model",
    "demo_extraction",
    "manifest",
    "split",
    "augment",
    "train",
    "evaluate_zeroshot_shard",
    "evaluate_zeroshot",
    "parity_gate",
    "evaluate_finetuned_shard",
    "evaluate_finetuned",
    "report",
    "classify_listing",
    "classify_shard",
    "classify",
    "all",
}
#: The triage shard the shard tests kill (of --set-scatter classify=3): one that has images to
#: score in the demo's extraction (batches go to shards by content hash; 2-of-3 gets none). The
#: tests assert that it has, so a change of the demo data that empties it is caught.
SHARD_VICTIM = "3-of-3"
DATA_TARGETS = ("results/split/summary.tsv", "results/augment/train_augmented.tsv")
PROFILE = ("--profile", str(REPO / "profiles" / "demo"))
DEMO_CONFIG = (str(REPO / "config.yaml"), str(REPO / "profiles" / "demo" / "demo.yaml"))


def snakemake_command(workdir: Path, *args: str, demo: bool = False, targets: tuple[str, ...] = ()) -> list[str]:
    """The command line that runs the repository's workflow in ``workdir`` (the demo profile's
    config files are named explicitly, since a profile's relative paths are read from the working
    directory). ``targets`` come before the options, whose lists (--configfile, --config) would
    take them for values."""
    configs = DEMO_CONFIG if demo else DEMO_CONFIG[:1]
    return [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "-d",
        str(workdir),
        *targets,
        *(PROFILE if demo else ()),
        "--configfile",
        *configs,
        *args,
    ]


def snakemake(
    workdir: Path, *args: str, read_only: Path | None = None, demo: bool = False, targets: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Run ``snakemake_command``; optionally with ``read_only`` mounted read-only.

    Only a dry run (``-n``) is allowed outside the slow tier: ``pytest -m "not slow"`` runs no workflow.
    """
    if "-n" not in args and not _CURRENT["slow"]:
        pytest.fail("a test that runs the workflow must be marked slow")
    command = snakemake_command(workdir, *args, demo=demo, targets=targets)
    if read_only is not None:
        command = read_only_command(read_only, command)
    return subprocess.run(command, capture_output=True, text=True)


def checkpoint_step(checkpoint: Path) -> int:
    """The global step of a Lightning checkpoint, or -1 while it is being written."""
    import torch

    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # being written at this very moment
        return -1


def planned_jobs(result: subprocess.CompletedProcess) -> set[str]:
    """Rule names from the 'Job stats' table of a dry run."""
    lines = result.stdout.splitlines()
    if "Nothing to be done" in result.stdout + result.stderr:
        return set()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats"))
    jobs = set()
    for line in lines[start + 3 :]:
        if not line.strip() or line.startswith("total"):
            break
        jobs.add(line.split()[0])
    return jobs


#: How far one probability (written to 6 decimals) may move between CPU processes that score the
#: same batch: float32 kernels can round an image's last bit differently. Seen on CI three times in
#: about nine runs, as one unit in the 6th decimal (twice sharded against one job, once after a kill);
#: never reproduced on the 2-core CPU here (docs/reliability.md).
PROCESS_ROUNDING = 2e-6
#: The keys of metrics.json (and of custody.json's scoring facts) that say how fast a scoring run
#: went, not what it found: they differ between two runs of the same scoring.
SCORING_TIMES = frozenset(
    {"seconds", "images_per_second", "images_per_second_after_first_batch", "seconds_to_first_batch"}
)
PROBABILITY_COLUMNS = re.compile(r"^(confidence|p\d+)$")


def assert_same_scores(actual: Path | bytes, expected: Path | bytes, name: str = "") -> None:
    """Two tables of scored images (triage.tsv, predictions.tsv: files, or their bytes) with the same
    rows in the same order: every column byte for byte, except the probabilities, which may differ
    by PROCESS_ROUNDING."""
    import csv

    tables = []
    for table in (actual, expected):
        text = table.decode("utf-8") if isinstance(table, bytes) else Path(table).read_text(encoding="utf-8")
        tables.append(list(csv.reader(io.StringIO(text, newline=""), delimiter="\t")))
    where = name or str(actual)
    header = tables[1][0]
    assert tables[0][0] == header, where
    assert len(tables[0]) == len(tables[1]), where
    for number, (got, want) in enumerate(zip(tables[0][1:], tables[1][1:], strict=True), start=2):
        for column, a, b in zip(header, got, want, strict=True):
            if PROBABILITY_COLUMNS.match(column) and a and b:
                assert abs(float(a) - float(b)) <= PROCESS_ROUNDING, f"{where}:{number} {column}: {a} != {b}"
            else:
                assert a == b, f"{where}:{number} {column}: {a!r} != {b!r}"


def same_figures(a, b, tolerance: float = 1e-5) -> bool:
    """Whether two JSON values are equal, floats to within ``tolerance`` (figures computed from
    probabilities that may differ by PROCESS_ROUNDING)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and abs(a - b) <= tolerance
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_figures(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_figures(x, y, tolerance) for x, y in zip(a, b, strict=True))
    return a == b


def copy_run(workdir: Path, target: Path) -> Path:
    """A copy of a workflow's working directory, for a test that changes or reruns part of it: the
    shared demo run stays as it was made. ``cp --reflink=auto`` shares the blocks where the file
    system can (copy-on-write), and copies them where it cannot. No hard links: a stage that rewrote
    a file in place would change the original too."""
    subprocess.run(["cp", "-a", "--reflink=auto", str(workdir), str(target)], check=True)
    return target


def shared_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of this test session that every pytest-xdist worker sees (each has a base
    temporary folder of its own inside it); without xdist, the session's base folder."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(scope="session")
def demo_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One complete run of the demo profile, shared by the tests that inspect it, made once per
    session even with several xdist workers (the first to ask runs it; the others wait for it). A
    test that changes or reruns anything in it works on a copy (:func:`copy_run`)."""
    from filelock import FileLock

    root = shared_folder(request, tmp_path_factory)
    workdir, record = root / "demo_run", root / "demo_run.json"
    with FileLock(root / "demo_run.lock"):
        if not record.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a run that failed in another worker
            workdir.mkdir()
            start = time.monotonic()
            result = snakemake(workdir, demo=True)
            assert result.returncode == 0, result.stderr[-3000:]
            record.write_text(json.dumps({"seconds": time.monotonic() - start}))
    return {"workdir": workdir, **json.loads(record.read_text())}


_CURRENT = {"slow": True}  # whether the running test is in the slow tier


@pytest.fixture(autouse=True)
def _tier(request: pytest.FixtureRequest) -> Iterator[None]:
    _CURRENT["slow"] = request.node.get_closest_marker("slow") is not None
    yield
    _CURRENT["slow"] = True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tiers hold: a test that needs the demo run is marked slow, or the run stops here."""
    unmarked = [
        item.nodeid
        for item in items
        if "demo_run" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow")
    ]
    if unmarked:
        raise pytest.UsageError(f"tests use the demo run without @pytest.mark.slow: {unmarked}")
    items.sort(key=start_order)


def start_order(item: pytest.Item) -> int:
    """Long tests first, so that with -n 2 neither worker is left alone with one at the end (xdist
    hands out tests in this order, a few at a time): first the SLURM tests (one worker, one after
    the other, about 7 minutes with the demo run), then the slow tests with workflows of their own, so that the
    other worker has work while the first one makes the shared demo run, then the slow tests that
    inspect that run, then the fast tier. Within each, the order of collection."""
    slow = item.get_closest_marker("slow") is not None
    uses_demo = "demo_run" in getattr(item, "fixturenames", ())
    if item.get_closest_marker("xdist_group") is not None:
        return 0
    return 1 if slow and not uses_demo else 2 if slow else 3


MEASURED = "measured.txt"  # in the session's shared folder


@pytest.fixture
def measured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Record a measured figure; all of them are printed at the end of the run (and so in CI's
    log). Kept in a file of the session's shared folder, so xdist workers' figures are printed too."""
    record = shared_folder(request, tmp_path_factory) / MEASURED

    def add(line: str) -> None:
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(line.replace("\n", " ") + "\n")

    return add


def pytest_terminal_summary(terminalreporter, config) -> None:
    if hasattr(config, "workerinput"):
        return
    # The controller's (or the only) session folder: the shared folder the workers wrote into.
    record = config._tmp_path_factory.getbasetemp() / MEASURED
    lines = record.read_text(encoding="utf-8").splitlines() if record.exists() else []
    if lines:
        terminalreporter.section("measured on this machine")
        for line in lines:
            terminalreporter.write_line(line)
