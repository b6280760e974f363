"""Run a picklable function over items in worker processes, in order, with progress in the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(function: Callable[[T], R], items: Sequence[T], workers: int, what: str) -> Iterator[R]:
    """Yield ``function(item)`` in input order; logs done/total, elapsed and ETA about 20 times."""
    total = len(items)
    if workers <= 1 or total < 2:
        results: Iterator[R] = map(function, items)
        yield from _progress(results, total, what)
        return
    # Images are independent and decoding is CPU-bound: processes, not threads, use every core.
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from _progress(pool.map(function, items, chunksize=8), total, what)


def _progress(results: Iterator[R], total: int, what: str) -> Iterator[R]:
    start, step = time.monotonic(), max(1, total // 20)
    for done, result in enumerate(results, 1):
        if done % step == 0 or done == total:
            elapsed = time.monotonic() - start
            log.info(
                "%s: %d/%d, %.1f s elapsed, ETA %.0f s", what, done, total, elapsed, elapsed / done * (total - done)
            )
        yield result
