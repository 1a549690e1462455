"""Our own threads for numpy kernels: ordered results, bounded in flight, BLAS on one thread each.

    for result in in_order(fn, items, cpu_threads()):   # fn(item) on threads, results in item order
        ...
    with blas_one_thread(threads): ...                  # while our threads each run GEMMs

Why not BLAS's own threads: a GEMM split over the cores by BLAS leaves every non-BLAS step between
two GEMMs (an argmax, a gather, a near-tie test) on one core, and OpenBLAS parks its idle threads
by spinning, which burned the other core through those steps; callers that run under the BLAS pin
of `queries` (score SQL: `select`) got one core in all. Independent work units on our threads,
each with a single-threaded BLAS, keep every core busy with useful work. Results come back in item
order, so a caller that folds them in that order gets the same bits for any thread count.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

from clipsql.lazy import threadpoolctl

T = TypeVar("T")
R = TypeVar("R")


def cpu_threads(threads: int | None = None) -> int:
    """`threads`, else the CPUs this process may run on."""
    if threads is not None:
        return max(1, int(threads))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:      # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def blas_one_thread(threads: int) -> Iterator[None]:
    """BLAS on one thread while `threads` > 1 of ours run GEMMs (no oversubscription, no spinning
    BLAS threads between our GEMMs); nothing changes for one thread or without threadpoolctl."""
    if threads <= 1:
        yield
        return
    try:
        limits = threadpoolctl.threadpool_limits
    except ImportError:         # pinning is an optimisation only
        yield
        return
    with limits(limits=1, user_api="blas"):
        yield


def in_order(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """fn(item) for each item on `threads` threads, yielded in item order; at most 2·threads in
    flight, so memory stays bounded however many items there are. One thread: plain `map`."""
    if threads <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(fn, x) for x in islice(it, 2 * threads))
        while pending:
            result = pending.popleft().result()
            for x in islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield result
