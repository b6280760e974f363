"""The scoring engine: images to class probabilities (or generated answers), on every device.

Shared by ``evaluate`` (labelled test split) and ``classify`` (unlabeled folder). Images already in
the prediction cache are not scored again; the rest are grouped into batches of equal token count,
and the batches are dealt round-robin to one process per device (``evaluate.devices``). Those
processes wait at a barrier until every model is loaded; only this process writes the cache, after
every batch, so it stays one append-only file and an interrupted run goes on where it stopped. A
failing process stops the run with its traceback.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from forensic_vlm.batches import Collator, Example, ImageDataset, TokenGroupedBatches
from forensic_vlm.config import EvaluateConfig, ModelConfig
from forensic_vlm.decoding import class_probabilities, generate_answers, parse_finetuned, parse_zeroshot, to_device
from forensic_vlm.errors import NonFiniteScoresError, ScoringProcessError
from forensic_vlm.faults import fault_point
from forensic_vlm.integrity import model_files, verify_adapter
from forensic_vlm.kernels import apply_fused_kernels, fused_kernels_wanted, require_fp8, to_fp8
from forensic_vlm.modeling import (
    compile_decoder_layers,
    compile_vision_layers,
    compute_dtype,
    device_name,
    load_adapter,
    load_base_model,
    load_processor,
    require_gpus,
    resolve_device,
)
from forensic_vlm.prediction_cache import PredictionCache
from forensic_vlm.prompting import AnswerTokens, TokenCounter, answer_tokens, build_prompt, preflight
from forensic_vlm.speed.gate import gated_path, path_settings, summary

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
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
    fused_kernels: bool = False


def _score_batches(
    job: ScoringJob, device: torch.device, ready: Callable[[], None] | None = None, processor=None
) -> Iterator[list[dict]]:
    """Load the model on ``device`` and yield the prediction rows of each batch of ``job``.

    ``ready`` is called once the model is loaded, before the first batch. ``processor``: the one
    ``job.processor_source`` gives, already loaded in this process (a process per device loads its own).
    """
    model = _load_model(job, device)
    if processor is None:
        processor = load_processor(job.processor_source, job.model)
    mode = "score" if job.decoding == "scores" else "generate"
    loader = DataLoader(
        ImageDataset(job.examples),
        batch_sampler=job.batches,
        collate_fn=Collator(processor, job.prompt, job.answer, labels=job.labels, mode=mode),
        num_workers=job.num_workers,
        pin_memory=device.type == "cuda",
        # A scorer is itself a spawned process, whose workers would otherwise be spawned too, each
        # importing everything again: measured on 2 H100s, 73 s before the first batch. Forked
        # workers start at once; they never touch CUDA (pinning happens in this process).
        multiprocessing_context="fork" if job.num_workers and sys.platform == "linux" else None,
    )
    if ready:
        ready()
    waiting = time.perf_counter()
    for number, batch in enumerate(loader):
        if number == 0:  # start-up costs (worker processes, first kernels) show in the log
            log.info("%s: first batch decoded after %.1f s", device, time.perf_counter() - waiting)
        inputs = to_device(batch, device, compute_dtype(device))
        rows = _batch_rows(job, model, processor.tokenizer, inputs=inputs, index=batch["indices"].tolist())
        if number == 0:
            log.info("%s: first batch scored after %.1f s", device, time.perf_counter() - waiting)
        yield rows


def _load_model(job: ScoringJob, device: torch.device):
    """The base model on ``device`` in eval mode, set up as ``model.quantization`` and
    ``model.kernels`` say, with the job's adapter if any (merged into full weights)."""
    fp8 = job.model.quantization == "fp8"
    if fp8:
        require_fp8(device)
    # An adapter trained on an nf4 base with some layers kept bf16 is scored on that same base.
    bf16_layers = adapter_bf16_layers(Path(job.adapter)) if job.adapter and job.model.quantization == "nf4" else 0
    model = load_base_model(
        replace(job.model, quantization="none") if fp8 else job.model, device, bf16_layers=bf16_layers
    )
    if job.fused_kernels:
        apply_fused_kernels(model)
    if job.adapter:
        model = load_adapter(model, Path(job.adapter))
        if job.model.quantization != "nf4":
            # One weight per projection again: the LoRA branch's extra products cost time every batch.
            model = model.merge_and_unload()
    model.eval()
    if fp8:
        to_fp8(model, job.model.fp8_scope)
    if job.compile or fp8:
        compile_decoder_layers(model)
        compile_vision_layers(model)
    return model


def scoring_quantization(model_config: ModelConfig, adapter: Path | None) -> str:
    """``model.quantization``, with ``auto`` resolved: the base an adapter was trained on, so that
    the review thresholds validated in training hold for the numbers scoring produces; nf4 (the
    reference's) without an adapter. An explicit setting that differs from the adapter's base is
    used, and said in the log."""
    trained_on = adapter_base_quantization(adapter) if adapter else None
    if model_config.quantization == "auto":
        return trained_on or "nf4"
    if trained_on and trained_on != model_config.quantization:
        log.warning(
            "model.quantization is %s but the adapter %s was trained and its review thresholds validated on a "
            "%s base; its scores will differ somewhat from those it was validated with",
            model_config.quantization,
            adapter,
            trained_on,
        )
    return model_config.quantization


def adapter_base_quantization(adapter: Path) -> str | None:
    """The base quantization an adapter was trained (and its thresholds validated) on."""
    card = _training_card(adapter)
    plan = card.get("validation", {}).get("plan")
    if plan:
        return plan["quantization"]
    # Adapters from before the training plan were trained on model.quantization.
    return {"nf4": "nf4", "none": "none"}.get(card.get("model", {}).get("quantization"))


def adapter_bf16_layers(adapter: Path) -> int:
    """How many of the first decoder layers an nf4-trained adapter's base kept in bf16 (0: none)."""
    return int((_training_card(adapter).get("validation", {}).get("plan") or {}).get("bf16_layers", 0))


def _training_card(adapter: Path) -> dict:
    return json.loads((adapter / "training.json").read_text(encoding="utf-8"))


def scoring_path(model_config: ModelConfig, config: EvaluateConfig, device: torch.device) -> dict:
    """How the model will run (``model_config.quantization`` resolved already): part of the
    prediction cache's key and of the stage's record.

    Liger is not combined with compilation: Inductor fuses the same element-wise work itself.
    """
    compiled = config.compile or model_config.quantization == "fp8"
    fused = not compiled and fused_kernels_wanted(model_config, device)
    path = {"quantization": model_config.quantization, "kernels": "liger" if fused else "transformers"}
    if model_config.quantization == "fp8":
        path["fp8_scope"] = model_config.fp8_scope
    return {**path, "compiled": compiled}


def _batch_rows(job: ScoringJob, model, tokenizer, *, inputs: dict, index: list[int]) -> list[dict]:
    """The prediction rows (cache columns) of one batch; ``index`` points into ``job.examples``."""
    sha256 = [job.examples[i].sha256 for i in index]
    if job.decoding == "scores":
        probabilities = class_probabilities(model, inputs, job.answer.class_ids).cpu().numpy()
        broken = [
            job.examples[i].path for i, row in zip(index, probabilities, strict=True) if not np.isfinite(row).all()
        ]
        if broken:
            # argmax of a NaN row is class 0, "irrelevant": a plausible-looking wrong answer
            raise NonFiniteScoresError(
                f"the model gave non-finite class probabilities for {len(broken)} of {len(index)} images of a batch "
                f"(e.g. {broken[0]}) on {job.model.quantization}, kernels {job.model.kernels}, "
                f"compiled {job.compile or job.model.quantization == 'fp8'}"
            )
        return [
            {
                "sha256": digest,
                "predicted": job.labels[int(row.argmax())],
                "answer": "",
                **{f"p{label}": f"{value:.6f}" for label, value in zip(job.labels, row, strict=True)},
            }
            for digest, row in zip(sha256, probabilities, strict=True)
        ]
    parse = parse_finetuned if job.adapter else parse_zeroshot
    texts = generate_answers(model, inputs, tokenizer, job.max_new_tokens)
    return [
        {"sha256": digest, "predicted": parse(text), "answer": text} for digest, text in zip(sha256, texts, strict=True)
    ]


def shard_devices(count: int) -> list[torch.device]:
    """``count`` devices for scoring shards: GPUs 0..count-1, or CPU processes without a GPU."""
    if torch.cuda.is_available():
        require_gpus(count, "evaluate.devices")
        return [torch.device("cuda", i) for i in range(count)]
    return [torch.device("cpu")] * count


class _Progress:
    """Adds each batch's rows to the cache as they arrive, logs progress, and times the run.

    Progress is logged about every 1 % (and at least every 30 s): enough to watch, not a line a
    batch. The steady rate is counted from the moment every device has finished a first batch, so
    model loading and the first kernels are left out.
    """

    def __init__(self, cache: PredictionCache, total: int, kind: str) -> None:
        self.cache, self.total, self.kind = cache, total, kind
        self.start, self.done = time.perf_counter(), 0
        self.logged_done, self.logged_at = 0, 0.0
        self.first: tuple[int, float] | None = None

    def add(self, rows: list[dict]) -> None:
        self.cache.add(rows)
        fault_point("scoring.batch")  # this batch's rows on disk, the rest not scored yet
        self.done += len(rows)
        elapsed = time.perf_counter() - self.start
        new_percent = self.done * 100 // self.total > self.logged_done * 100 // self.total
        if new_percent or elapsed - self.logged_at > 30 or self.done == self.total:
            rate, left = self.done / elapsed, elapsed / self.done * (self.total - self.done)
            log.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", self.kind, self.done, self.total, rate, left)
            self.logged_done, self.logged_at = self.done, elapsed

    def every_device_started(self) -> None:
        if self.first is None:
            self.first = (self.done, time.perf_counter() - self.start)

    def timings(self) -> tuple[float, float, float]:
        """(seconds, images/s after every device's first batch, seconds until then).

        The last is the start-up a run pays once: loading the model, starting the workers, the first
        kernels and, compiled, the compilation (``evaluate.compile``, FP8)."""
        seconds = time.perf_counter() - self.start
        started = self.first[1] if self.first else seconds
        if self.first and self.done > self.first[0]:
            return seconds, (self.done - self.first[0]) / (seconds - self.first[1]), started
        return seconds, self.done / seconds, started


def _score(
    jobs: list[ScoringJob], devices: list[torch.device], cache: PredictionCache, kind: str, *, processor
) -> tuple[float, float, float]:
    """Score every job (one per device), adding each batch's rows to the cache as it arrives.

    One job runs in this process; several run in one spawned process each, and only this process
    writes the cache, so it stays one consistent append-only file. Returns ``_Progress.timings()``.
    """
    total = sum(len(batch) for job in jobs for batch in job.batches)
    if not total:
        return 0.0, 0.0, 0.0
    progress = _Progress(cache, total, kind)
    if len(jobs) == 1:
        for rows in _score_batches(jobs[0], devices[0], processor=processor):
            progress.add(rows)
            progress.every_device_started()
    else:
        _score_in_processes(jobs, devices, progress)
    return progress.timings()


def _score_in_processes(jobs: list[ScoringJob], devices: list[torch.device], progress: _Progress) -> None:
    """One spawned process per job; a failing or vanished process stops the run with its reason."""
    # spawn, not fork: CUDA cannot be used in a forked child of a process that touched it.
    context = torch.multiprocessing.get_context("spawn")
    results, barrier = context.Queue(), context.Barrier(len(jobs))
    threads = max(1, torch.get_num_threads() // len(jobs))  # the cores are shared between the processes
    workers = [
        context.Process(
            target=_shard_worker,
            kwargs={
                "rank": rank,
                "job": job,
                "device": device,
                "threads": threads,
                "results": results,
                "barrier": barrier,
            },
        )
        for rank, (job, device) in enumerate(zip(jobs, devices, strict=True))
    ]
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
                    raise ScoringProcessError(
                        f"{progress.kind}: scoring process {dead[0]} ended without finishing "
                        f"(exit code {workers[dead[0]].exitcode})"
                    ) from None
                continue
            if what == "error":
                raise ScoringProcessError(
                    f"{progress.kind}: scoring process {rank} on {devices[rank]} failed:\n{payload}"
                )
            if what == "done":
                finished.add(rank)
                continue
            progress.add(payload)
            started.add(rank)
            if len(started) == len(workers):
                progress.every_device_started()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()


def _shard_worker(*, rank: int, job: ScoringJob, device: torch.device, threads: int, results, barrier) -> None:
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


def shard_of(sha256: str, shards: int) -> int:
    """The shard (from 0) of a batch whose first image has this content hash."""
    return int(sha256[:16], 16) % shards


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
    start_up_seconds: float  # until every device had scored a first batch (loading, compiling)
    devices: int
    device: str
    cache_key: str
    model_files_sha256: dict[str, str]  # every file of the base model, hashed in full before use
    adapter_files_sha256: dict[str, str] | None  # and of the adapter, verified against its SHA256SUMS
    path: dict  # quantization as resolved, kernels and compilation (``scoring_path``)
    parity_gate: dict | None = None  # the verdict auto followed (``speed.gate.summary``), if any

    def run_facts(self) -> dict:
        """The figures a stage records about its scoring run."""
        scored = self.images_scored
        return {
            "images_scored": scored,
            "images_from_cache": self.images_from_cache,
            "seconds": round(self.seconds, 2),
            "images_per_second": round(scored / self.seconds, 2) if scored else None,
            "images_per_second_after_first_batch": round(self.steady_images_per_second, 2) if scored else None,
            "seconds_to_first_batch": round(self.start_up_seconds, 2) if scored else None,
            "devices": self.devices,
            "device": self.device,
            **self.path,
            "parity_gate": self.parity_gate,
        }


def score_examples(
    examples: list[Example],
    labels: list[int],
    *,
    model_config: ModelConfig,
    config: EvaluateConfig,
    adapter: Path | None,
    cache_dir: Path | None,
    kind: str,
    shared_cache_dir: Path | None = None,
    shard: tuple[int, int] | None = None,
    gate: dict | None = None,
) -> Scores:
    """Score examples not already in the prediction cache; return every example's row.

    Rows are appended to the cache after every batch, so a run that is interrupted goes on where
    it stopped. Identical images (same sha256) are scored once. ``shared_cache_dir``: a cache that
    is read too but never written (a shard's; see ``classify.score_shard``). ``shard`` (index from
    0, count): score, and return the rows of, only the images of that shard (:func:`shard_of`).
    ``gate``: a parity gate verdict (``speed.gate.read_verdict``) for this adapter; under
    ``model.quantization: auto`` the path it chose is used.
    """
    device = resolve_device(model_config)
    # Every model and adapter file hashed in full (and verified) before anything is loaded; the
    # model is then loaded from the folder that was hashed.
    base = model_files(model_config.name_or_path, model_config.files_sha256)
    tuned = verify_adapter(Path(adapter)) if adapter else None
    quantization = scoring_quantization(model_config, Path(adapter) if adapter else None)
    if gate is not None and tuned is not None and model_config.quantization == "auto":
        chosen = gated_path(
            gate,
            model_config=model_config,
            device=device,
            trained_on=adapter_base_quantization(Path(adapter)),
            model_hashes=base.hashes,
            adapter_hashes=tuned.hashes,
        )
        if chosen["quantization"] != quantization or chosen["kernels"] != "transformers":
            # A fast path the gate passed; otherwise the user's own settings (evaluate.compile) stand.
            model_config, config = path_settings(model_config, config, chosen)
            quantization = chosen["quantization"]
    model_config = replace(model_config, name_or_path=str(base.folder), quantization=quantization)
    # The adapter folder carries the processor it was trained with; the base model's otherwise.
    processor = load_processor(adapter or model_config.name_or_path, model_config)
    prompt = build_prompt(processor, model_config.question)
    answer = answer_tokens(processor, model_config.question, labels)
    max_new = config.max_new_tokens_finetuned if adapter else config.max_new_tokens_zeroshot
    score_columns = ["sha256", "predicted", *[f"p{label}" for label in labels], "answer"]
    path = scoring_path(model_config, config, device)
    cache = PredictionCache(
        cache_dir,
        {
            "model": base.hashes,
            **path,
            "adapter": tuned.hashes if tuned else "none",
            "prompt": prompt,
            "max_tiles": model_config.max_tiles,
            # Compiled scoring compiles the vision tower too since issue 27: its numbers differ in
            # bf16 rounding from those of a decoder compiled alone, which older caches hold.
            **({"compiled_vision": True} if path["compiled"] else {}),
            # Qwen's pixel budget changes every image's tokens; in the key only when set, so keys
            # (and caches) made before these settings existed stay valid.
            **{key: getattr(model_config, key) for key in ("min_pixels", "max_pixels") if getattr(model_config, key)},
            "decoding": config.decoding,
            "max_new_tokens": max_new if config.decoding == "generate" else None,
            "class_tokens": list(answer.class_ids),
        },
        score_columns,
        shared=shared_cache_dir,
    )
    # The batches are planned over every distinct image, scored or not, so that they, and with them
    # the numerics of every image, do not depend on what is cached or on how a case is sharded.
    first: dict[str, Example] = {}
    for e in examples:
        first.setdefault(e.sha256, e)
    distinct = list(first.values())
    tokens = preflight(
        TokenCounter(processor, prompt, answer),
        [(e.name, e.width, e.height) for e in distinct],
        model_config.max_sequence_tokens,
    )
    plan = TokenGroupedBatches(tokens, config.batch_size, shuffle=False).batches()
    if shard is not None:
        # Whole batches go to a shard, by their first image's content: every shard computes the
        # same plan from the same listing, so each image falls in exactly one shard.
        index, count = shard
        plan = [batch for batch in plan if shard_of(distinct[batch[0]].sha256, count) == index]
        mine = {distinct[i].sha256 for batch in plan for i in batch}
        examples = [e for e in examples if e.sha256 in mine]
    batches = [kept for batch in plan if (kept := [i for i in batch if cache.get(distinct[i].sha256) is None])]
    to_score = sum(len(batch) for batch in batches)
    in_scope = len({e.sha256 for e in examples})
    log.info(
        "%s: %d images (%d distinct), %d already scored by this model (cache %s), %d to score",
        kind,
        len(examples),
        in_scope,
        in_scope - to_score,
        cache.key,
        to_score,
    )
    devices = shard_devices(config.devices) if config.devices > 1 else [device]
    per_device = [device_batches for device_batches in shard_batches(batches, len(devices)) if device_batches]
    jobs = [
        ScoringJob(
            examples=distinct,
            batches=device_batches,
            model=model_config,
            adapter=str(adapter) if adapter else None,
            processor_source=str(adapter or model_config.name_or_path),
            prompt=prompt,
            answer=answer,
            labels=labels,
            decoding=config.decoding,
            max_new_tokens=max_new,
            num_workers=config.num_workers,
            compile=path["compiled"],
            fused_kernels=path["kernels"] == "liger",
        )
        for device_batches in per_device
    ]
    seconds, steady, start_up = _score(jobs, devices[: len(jobs)], cache, kind, processor=processor)
    for state in (base, tuned):
        if state:
            state.check_unchanged()
    return Scores(
        rows=[cache.get(e.sha256) for e in examples],
        images_scored=to_score,
        images_from_cache=len(examples) - to_score,
        seconds=seconds,
        steady_images_per_second=steady,
        start_up_seconds=start_up,
        devices=len(jobs),
        device=device_name(device),
        cache_key=cache.key,
        model_files_sha256=base.hashes,
        adapter_files_sha256=tuned.hashes if tuned else None,
        path=path,
        parity_gate=summary(gate) if gate is not None and tuned is not None else None,
    )
