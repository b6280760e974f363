"""Stages ``evaluate_zeroshot`` and ``evaluate_finetuned``: score the test split, write metrics.

``decoding: scores`` (default): one forward pass per image, class probabilities from the digit
logits at the answer position. ``decoding: generate``: the reference way (generate, then parse
the text), so both can be compared on the same images. An image that cannot be read stops the
run with its name: nothing is replaced by a blank image or scored against a made-up answer.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from forensic_vlm.batches import (
    Collator,
    Example,
    ImageDataset,
    TokenGroupedBatches,
    examples_from_table,
)
from forensic_vlm.config import ClassSpec, EvaluateConfig, ModelConfig
from forensic_vlm.figures import plot_confusion_matrix
from forensic_vlm.metrics import compute_metrics, report_text
from forensic_vlm.modeling import (
    compute_dtype,
    device_name,
    load_adapter,
    load_base_model,
    load_processor,
    require_gpus,
    resolve_device,
)
from forensic_vlm.prediction_cache import PredictionCache, adapter_fingerprint, model_fingerprint
from forensic_vlm.prompting import AnswerTokens, TokenCounter, answer_tokens, build_prompt, preflight
from forensic_vlm.scoring import class_probabilities, generate_answers, parse_finetuned, parse_zeroshot, to_device
from forensic_vlm.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringJob:
    """What one scoring process needs; picklable, so it can be sent to a process per device."""

    examples: list[Example]
    batches: list[list[int]]  # indices into ``examples``, grouped by token count
    model: ModelConfig
    adapter: str | None
    processor_source: str
    prompt: str
    answer: AnswerTokens
    labels: list[int]
    decoding: str
    max_new_tokens: int
    num_workers: int
    compile: bool = False


def _score_batches(job: ScoringJob, device: torch.device, ready: Callable[[], None] | None = None) -> Iterator[list[dict]]:
    """Load the model on ``device`` and yield the prediction rows of each batch of ``job``.

    ``ready`` is called once the model is loaded, before the first batch.
    """
    model = load_base_model(job.model, device)
    if job.adapter:
        model = load_adapter(model, Path(job.adapter))
    model.eval()
    if job.compile:
        compile_decoder_layers(model)
    processor = load_processor(job.processor_source, job.model.max_tiles)
    mode = "score" if job.decoding == "scores" else "generate"
    loader = DataLoader(
        ImageDataset(job.examples),
        batch_sampler=job.batches,
        collate_fn=Collator(processor, job.prompt, job.answer, job.labels, mode),
        num_workers=job.num_workers,
        pin_memory=device.type == "cuda",
        # A scorer is itself a spawned process, whose workers would otherwise be spawned too, each
        # importing everything again: measured on 2 H100s, 73 s before the first batch. Forked
        # workers start at once; they never touch CUDA (pinning happens in this process).
        multiprocessing_context="fork" if job.num_workers and sys.platform == "linux" else None,
    )
    if ready:
        ready()
    parse = parse_finetuned if job.adapter else parse_zeroshot
    waiting = time.perf_counter()
    for number, batch in enumerate(loader):
        if number == 0:  # start-up costs (worker processes, first kernels) show in the log
            log.info("%s: first batch decoded after %.1f s", device, time.perf_counter() - waiting)
        index = batch["indices"].tolist()
        inputs = to_device(batch, device, compute_dtype(device))
        rows = []
        if mode == "score":
            p = class_probabilities(model, inputs, job.answer.class_ids).cpu().numpy()
            for i, probs in zip(index, p):
                rows.append({"sha256": job.examples[i].sha256, "predicted": job.labels[int(probs.argmax())],
                             "answer": "", **{f"p{label}": f"{v:.6f}" for label, v in zip(job.labels, probs)}})  # fmt: skip
        else:
            for i, text in zip(index, generate_answers(model, inputs, processor.tokenizer, job.max_new_tokens)):
                rows.append({"sha256": job.examples[i].sha256, "predicted": parse(text), "answer": text})
        if number == 0:
            log.info("%s: first batch scored after %.1f s", device, time.perf_counter() - waiting)
        yield rows


def compile_decoder_layers(model) -> int:
    """torch.compile every decoder layer of the language model in place; returns how many.

    All layers share one compiled graph (parameters are graph inputs); the sequence length is
    dynamic, so new token counts do not recompile.
    """
    layers = [module for name, module in model.named_modules()
              if "language_model" in name and type(module).__name__.endswith("DecoderLayer")]  # fmt: skip
    for layer in layers:
        layer.compile(dynamic=True)
    log.info("compiled %d decoder layers", len(layers))
    return len(layers)


def shard_devices(count: int) -> list[torch.device]:
    """``count`` devices for scoring shards: GPUs 0..count-1, or CPU processes without a GPU."""
    if torch.cuda.is_available():
        require_gpus(count, "evaluate.devices")
        return [torch.device("cuda", i) for i in range(count)]
    return [torch.device("cpu")] * count


def _shard_worker(rank: int, job: ScoringJob, device: torch.device, threads: int, results, barrier) -> None:
    """One scoring process: sends ("rows", rank, rows) per batch, then ("done", rank, None).

    Every process waits at ``barrier`` with its model loaded, so all devices start scoring
    together and finish together (the shards are equal).
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s [scorer {rank}] %(name)s: %(message)s")
    try:
        begun = time.perf_counter()
        torch.set_num_threads(threads)

        def ready() -> None:
            log.info("%s: model loaded in %.1f s; waiting for the other devices", device, time.perf_counter() - begun)
            barrier.wait()

        for rows in _score_batches(job, device, ready):
            results.put(("rows", rank, rows))
        results.put(("done", rank, None))
    except BaseException:  # reported to the parent, which stops the run with it
        results.put(("error", rank, traceback.format_exc()))


def _score(jobs: list[ScoringJob], devices: list[torch.device], cache: PredictionCache, kind: str) -> tuple[float, float]:
    """Score every job (one per device), adding each batch's rows to the cache as it arrives.

    One job runs in this process; several run in one spawned process each, and only this process
    writes the cache, so it stays one consistent append-only file. Returns (seconds, images/s
    after every device has finished its first batch, so model loading is left out).
    """
    total = sum(len(batch) for job in jobs for batch in job.batches)
    if not total:
        return 0.0, 0.0
    start, done, first = time.perf_counter(), 0, None
    logged = {"done": 0, "at": 0.0}

    def account(rows: list[dict]) -> None:
        nonlocal done
        cache.add(rows)
        done += len(rows)
        elapsed = time.perf_counter() - start
        # Progress about every 1 % (and at least every 30 s): enough to watch, not a line a batch.
        if done * 100 // total > logged["done"] * 100 // total or elapsed - logged["at"] > 30 or done == total:
            log.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", kind, done, total, done / elapsed,
                     elapsed / done * (total - done))  # fmt: skip
            logged.update(done=done, at=elapsed)

    if len(jobs) == 1:
        for rows in _score_batches(jobs[0], devices[0]):
            account(rows)
            first = first or (done, time.perf_counter() - start)
    else:
        # spawn, not fork: CUDA cannot be used in a forked child of a process that touched it.
        context = torch.multiprocessing.get_context("spawn")
        results, barrier = context.Queue(), context.Barrier(len(jobs))
        threads = max(1, torch.get_num_threads() // len(jobs))  # the cores are shared between the processes
        workers = [context.Process(target=_shard_worker, args=(rank, job, device, threads, results, barrier))
                   for rank, (job, device) in enumerate(zip(jobs, devices))]  # fmt: skip
        for worker in workers:
            worker.start()
        started, finished = set(), set()
        try:
            while len(finished) < len(workers):
                try:
                    what, rank, payload = results.get(timeout=5)
                except queue.Empty:
                    dead = [r for r, w in enumerate(workers) if not w.is_alive() and r not in finished]
                    if dead:
                        barrier.abort()  # the others may be waiting for it
                        raise RuntimeError(f"{kind}: scoring process {dead[0]} ended without finishing "
                                           f"(exit code {workers[dead[0]].exitcode})") from None  # fmt: skip
                    continue
                if what == "error":
                    raise RuntimeError(f"{kind}: scoring process {rank} on {devices[rank]} failed:\n{payload}")
                if what == "done":
                    finished.add(rank)
                    continue
                account(payload)
                started.add(rank)
                if first is None and len(started) == len(workers):
                    first = (done, time.perf_counter() - start)
        finally:
            for worker in workers:
                if worker.is_alive():
                    worker.terminate()
                worker.join()
    seconds = time.perf_counter() - start
    steady = (done - first[0]) / (seconds - first[1]) if first and done > first[0] else done / seconds
    return seconds, steady


def shard_batches(batches: list[list[int]], shards: int) -> list[list[list[int]]]:
    """Deal token-grouped batches round-robin, so every shard gets long and short images alike."""
    return [batches[rank::shards] for rank in range(shards)]


@dataclass(frozen=True)
class Scores:
    """The cached prediction row of every example, in the examples' order, and how they came."""

    rows: list[dict[str, str]]
    images_scored: int
    images_from_cache: int
    seconds: float
    steady_images_per_second: float
    devices: int
    device: str
    cache_key: str

    def run_facts(self) -> dict:
        """The figures a stage records about its scoring run."""
        scored = self.images_scored
        return {"images_scored": scored, "images_from_cache": self.images_from_cache, "seconds": round(self.seconds, 2),
                "images_per_second": round(scored / self.seconds, 2) if scored else None,
                "images_per_second_after_first_batch": round(self.steady_images_per_second, 2) if scored else None,
                "devices": self.devices, "device": self.device}  # fmt: skip


def score_examples(
    examples: list[Example],
    labels: list[int],
    model_config: ModelConfig,
    config: EvaluateConfig,
    adapter: Path | None,
    cache_dir: Path | None,
    kind: str,
) -> Scores:
    """Score examples not already in the prediction cache; return every example's row.

    Rows are appended to the cache after every batch, so a run that is interrupted goes on where
    it stopped. Identical images (same sha256) are scored once.
    """
    device = resolve_device(model_config)
    # The adapter folder carries the processor it was trained with; the base model's otherwise.
    processor = load_processor(adapter or model_config.name_or_path, model_config.max_tiles)
    prompt = build_prompt(processor, model_config.question)
    answer = answer_tokens(processor.tokenizer, prompt, labels)
    max_new = config.max_new_tokens_finetuned if adapter else config.max_new_tokens_zeroshot
    score_columns = ["sha256", "predicted", *[f"p{label}" for label in labels], "answer"]
    cache = PredictionCache(cache_dir, {
        "model": model_fingerprint(model_config.name_or_path), "quantization": model_config.quantization,
        "adapter": adapter_fingerprint(Path(adapter) if adapter else None), "prompt": prompt,
        "max_tiles": model_config.max_tiles, "decoding": config.decoding, "max_new_tokens": max_new if config.decoding == "generate" else None,
        "class_tokens": list(answer.class_ids),
    }, score_columns)  # fmt: skip
    todo, queued = [], set()
    for i, e in enumerate(examples):
        if cache.get(e.sha256) is None and e.sha256 not in queued:
            todo.append(i)
            queued.add(e.sha256)
    distinct = len({e.sha256 for e in examples})
    log.info("%s: %d images (%d distinct), %d already scored by this model (cache %s), %d to score", kind,
             len(examples), distinct, distinct - len(todo), cache.key, len(todo))  # fmt: skip
    subset = [examples[i] for i in todo]
    tokens = preflight(TokenCounter(processor, prompt, answer), [(e.name, e.width, e.height) for e in subset],
                       model_config.max_sequence_tokens)  # fmt: skip
    batches = TokenGroupedBatches(tokens, config.batch_size, shuffle=False).batches()
    devices = shard_devices(config.devices) if config.devices > 1 else [device]
    shards = [shard for shard in shard_batches(batches, len(devices)) if shard]
    jobs = [ScoringJob(subset, shard, model_config, str(adapter) if adapter else None,
                       str(adapter or model_config.name_or_path), prompt, answer, labels, config.decoding,
                       max_new, config.num_workers, config.compile) for shard in shards]  # fmt: skip
    seconds, steady = _score(jobs, devices[: len(jobs)], cache, kind)
    return Scores(rows=[cache.get(e.sha256) for e in examples], images_scored=len(todo),
                  images_from_cache=len(examples) - len(todo), seconds=seconds, steady_images_per_second=steady,
                  devices=len(jobs), device=device_name(device), cache_key=cache.key)  # fmt: skip


def evaluate_split(
    table: Path,
    raw_data: Path,
    classes: list[ClassSpec],
    model_config: ModelConfig,
    config: EvaluateConfig,
    out_dir: Path,
    adapter: Path | None = None,
    threads: int | None = None,
    cache_dir: Path | None = None,
) -> dict:
    """Score every image of ``table``; write predictions.tsv, metrics.json, the report and the figure.

    With ``cache_dir``, images this exact model, adapter and prompt scored before are not scored
    again (``images_scored`` / ``images_from_cache`` in metrics.json say how many).
    """
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kind = "finetuned" if adapter else "zeroshot"
    examples = examples_from_table(read_tsv(Path(table)), raw_data)
    labels = [c.id for c in classes]
    result = score_examples(examples, labels, model_config, config, adapter, cache_dir, kind)
    scores = result.rows
    predicted = np.array([int(s["predicted"]) for s in scores])
    probabilities = np.array([[float(s[f"p{label}"]) if s[f"p{label}"] else np.nan for label in labels] for s in scores])
    answers = [s["answer"] for s in scores]

    truth = [e.label for e in examples]
    scored = probabilities if config.decoding == "scores" else None
    metrics = compute_metrics(truth, predicted.tolist(), scored, classes, config.bootstrap_samples,
                              config.calibration_bins, config.seed)  # fmt: skip
    metrics.update({"kind": kind, "decoding": config.decoding, "model": model_config.name_or_path,
                    "quantization": model_config.quantization, "adapter": str(adapter) if adapter else None,
                    **result.run_facts()})  # fmt: skip
    rows = []
    for i, e in enumerate(examples):
        row = {"sha256": e.sha256, "path": e.name, "flags": e.flags, "true": e.label, "predicted": int(predicted[i])}
        row.update({f"p{label}": "" if scored is None else f"{probabilities[i, j]:.6f}" for j, label in enumerate(labels)})
        row["answer"] = answers[i]
        rows.append(row)
    columns = ["sha256", "path", "flags", "true", "predicted", *[f"p{label}" for label in labels], "answer"]
    write_tsv(out_dir / "predictions.tsv", columns, rows)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "classification_report.txt").write_text(report_text(truth, predicted.tolist(), classes), encoding="utf-8")
    title = f"{'fine-tuned' if adapter else 'zero-shot'} ({config.decoding})"
    plot_confusion_matrix(metrics, classes, title, out_dir / "confusion_matrix.png")
    log.info("%s: accuracy %.4f %s, macro-F1 %.4f, %s images/s on %s", kind, metrics["accuracy"],
             metrics["bootstrap_95"]["accuracy"], metrics["macro_f1"], metrics["images_per_second"], metrics["device"])  # fmt: skip
    return metrics

