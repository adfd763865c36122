"""Where blockwise prediction runs: a dask.distributed client on a local cluster (the default) or on a scheduler
that already runs (``--scheduler tcp://host:8786``), and how its tasks are run and gathered.

Needs the optional ``large`` extra. Without a client, tasks run one after another in this process (tests, small
images); the results are the same.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Sequence, TypeVar

from ...errors import ConfigError
from ...io.zarr_stores import require_large

T = TypeVar("T")
R = TypeVar("R")
#: The environment of local worker processes: distributed's default without ``MALLOC_TRIM_THRESHOLD_``, which
#: also turns off glibc's adaptive mmap threshold, so that every tile's activations were mapped and unmapped
#: again (a third of a worker's time in the kernel; BENCHMARKS.md, blockwise prediction).
WORKER_ENVIRON = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    workers: int = 2,
    memory_limit: str | float | None = "auto",
    processes: bool = True,
    timeout: float = 10.0,
) -> Iterator[Any]:
    """A ``distributed.Client``: connected to ``scheduler`` when given, else to a new local cluster of ``workers``
    workers with one thread each (prediction runs one task per worker at a time; torch uses one thread per
    worker unless told otherwise), each limited to ``memory_limit`` ("4GB", bytes, "auto": the machine's memory
    shared among the workers, None: no limit). ``processes=False`` runs the workers as threads of this process.
    The cluster is closed on exit; a scheduler given is left running. The local workers log nothing below
    CRITICAL: a task's error comes back as the error of the call (one line), not as a worker's traceback.

    Raises:
        ConfigError: ``workers`` < 1, or no scheduler answered at ``scheduler`` within ``timeout`` seconds.
    """
    distributed = require_large("distributed", "prediction on dask")
    cluster = None
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - OSError, TimeoutError, ValueError for a malformed address
            raise ConfigError(f"--scheduler {scheduler}: no dask scheduler answered within {timeout:g} s "
                              f"({' '.join(str(e).split())[:200]})") from None
    else:
        if workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {workers}")
        dask = require_large("dask")
        with dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENVIRON}):
            cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=memory_limit,
                                               processes=processes, dashboard_address=None,
                                               silence_logs=logging.CRITICAL)
        client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_tasks(
    client: Any | None,
    fn: Callable[[T], R],
    tasks: Sequence[T],
    progress: Callable[[int, int, R], None] | None = None,
) -> list[R]:
    """``[fn(t) for t in tasks]``, on the client's workers when there is a client (results in task order).
    ``progress(done, total, result)`` after each task, in the order they finish. The first task that fails
    cancels the others and its error is raised here."""
    results: list[Any] = [None] * len(tasks)
    if client is None:
        for index, task in enumerate(tasks):
            results[index] = fn(task)
            if progress is not None:
                progress(index + 1, len(tasks), results[index])
        return results
    distributed = require_large("distributed", "prediction on dask")
    futures = client.map(fn, list(tasks), pure=False)
    where = {future.key: index for index, future in enumerate(futures)}
    try:
        for done, future in enumerate(distributed.as_completed(futures), start=1):
            results[where[future.key]] = future.result()
            if progress is not None:
                progress(done, len(tasks), results[where[future.key]])
    except BaseException as e:
        client.cancel(futures)
        if isinstance(e, distributed.KilledWorker):
            raise RuntimeError("a dask worker died while predicting (out of memory? try a smaller --block-size or "
                               "a larger --memory-limit)") from None
        raise
    return results


def compute(client: Any | None, collections: Sequence[Any]) -> list[Any]:
    """Compute dask collections together (shared chunks are read once), on the client when there is one."""
    if client is not None:
        return list(client.compute(list(collections), sync=True))
    dask = require_large("dask")
    return list(dask.compute(*collections, scheduler="threads"))
