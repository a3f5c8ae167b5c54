"""An ordered map over worker processes, for the data stages of training: making shapes-world
clips, reading clips and re-captioning them are mostly single-threaded Python and numpy per
clip, so one process keeps about one core busy however many the machine has.

    with contextlib.closing(process_map(fn, items, workers=4)) as results:
        for result in results:  # fn(item), in the order of items, as they come
            ...

fn must be picklable (a module-level function, or functools.partial of one with picklable
arguments), because workers are spawned afresh rather than forked from a process that may
already run torch's threads. tqdm.contrib.concurrent.process_map is not used: it returns the
whole list at the end, and on Ctrl-C it waits for every queued item.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_workers(workers) -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number of processes, at least 1, got {workers!r}")
    return workers


def process_map(
    fn: Callable[[Item], Result], items: Iterable[Item], workers: int = 1, chunk: int = 16
) -> Iterator[Result]:
    """Yield fn(item) for every item, in order.

    workers 1 (or no more items than one chunk): in this process, with no start-up cost. More: that
    many spawned processes, each handed `chunk` items at a time, with at most two chunks per
    worker queued, so results never pile up ahead of the caller. A worker's exception is raised
    here, as it was raised there. The workers ignore Ctrl-C: on it this process stops handing out
    chunks, lets the workers finish the ones already handed to them (so none dies half-way
    through writing a file; a second or so) and raises KeyboardInterrupt. A worker that dies
    without an exception (stopped by the system) is a RuntimeError that says to use fewer
    workers. Close the iterator (contextlib.closing) if you may stop early.
    """
    workers = check_workers(workers)
    items = list(items)
    if workers == 1 or len(items) <= chunk:
        yield from map(fn, items)
        return
    chunks = (items[start:start + chunk] for start in range(0, len(items), chunk))
    executor = ProcessPoolExecutor(
        min(workers, -(-len(items) // chunk)), mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
    )
    try:
        # A dead worker breaks the pool: whichever of result() and submit() comes next raises.
        try:
            queued = collections.deque(executor.submit(_apply, fn, part) for part in itertools.islice(chunks, 2 * workers))
            while queued:
                results = queued.popleft().result()
                part = next(chunks, None)
                if part is not None:
                    queued.append(executor.submit(_apply, fn, part))
                yield from results
        except BrokenProcessPool as error:
            raise RuntimeError(
                "a worker process died without an error of its own (the system may have stopped it "
                "for lack of memory: check `dmesg` or the system log); run again with fewer workers, "
                "or 1 to work in this process"
            ) from error
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import torch

    torch.set_num_threads(1)  # the parallelism is the processes'


def _apply(fn, part: list) -> list:
    return [fn(item) for item in part]
