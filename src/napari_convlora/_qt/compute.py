"""The one thread where all of the plugin's torch work runs, and the worker that stops gracefully.

Every job (probe devices, load a file, train, predict, save) is a generator started as a napari
``thread_worker`` on a private single-thread ``QThreadPool`` that never expires, instead of on the
global pool. One long-lived compute thread means one OpenMP thread pool: two pools on a machine with
few cores made torch 2-3x slower (see ``_napari/native_libs.py``). Jobs therefore run one after the other.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generator

from napari.qt.threading import thread_worker
from qtpy.QtCore import QCoreApplication, QThreadPool
from superqt.utils import GeneratorWorker

from .._napari.native_libs import release_openmp_threads

#: How long closing napari waits for a running job to finish its step and save (ms).
QUIT_TIMEOUT_MS = 120_000


class JobWorker(GeneratorWorker):
    """A generator worker whose ``quit()`` sets the job's stop event, so that the job ends at its next
    step *and saves*, instead of being abandoned mid-step. napari calls ``quit()`` on running tasks when
    its window closes. Errors are not relayed as tracebacks: the widget shows their message."""

    stop_event: threading.Event | None = None
    ended = False  # set in the worker thread before ``finished`` is emitted

    def work(self) -> Any:
        try:
            return super().work()
        finally:
            self.ended = True

    def quit(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()
        else:
            super().quit()


class ComputeThread:
    """Runs jobs one at a time on a dedicated, never-expiring thread."""

    def __init__(self) -> None:
        self.pool = QThreadPool()
        self.pool.setMaxThreadCount(1)
        self.pool.setExpiryTimeout(-1)
        self.running: set[JobWorker] = set()
        self.started = False
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    @property
    def busy(self) -> bool:
        return bool(self.running)

    def start(
        self,
        job: Callable[..., Generator[Any, None, Any]],
        *args: Any,
        stoppable: bool = False,
        connect: dict[str, Callable] | None = None,
        **kwargs: Any,
    ) -> JobWorker:
        """Start ``job(*args, **kwargs)`` on the compute thread. With ``stoppable``, the job receives
        ``stop=threading.Event()`` and ``worker.quit()`` sets it. Pass the signal handlers in ``connect``
        (signal name -> callable): a fast job may be over before a connection made after this returns."""
        stop = threading.Event() if stoppable else None
        if stoppable:
            kwargs["stop"] = stop
        make = thread_worker(job, start_thread=False, ignore_errors=True, worker_class=JobWorker, connect=connect)
        worker: JobWorker = make(*args, **kwargs)
        worker.stop_event = stop
        self.running.add(worker)
        worker.finished.connect(lambda: self.running.discard(worker))
        if not self.started:  # once, as the compute thread starts: the main thread's OpenMP pool, if it has one
            self.started = True
            release_openmp_threads()
        self.pool.start(worker)
        return worker

    def stop_all(self) -> None:
        for worker in list(self.running):
            worker.quit()

    def shutdown(self, timeout_ms: int = QUIT_TIMEOUT_MS) -> bool:
        """Ask running jobs to stop (training saves) and wait for them; True when all ended in time."""
        self.stop_all()
        return self.pool.waitForDone(timeout_ms)


_compute: ComputeThread | None = None


def compute_thread() -> ComputeThread:
    """The process-wide compute thread, shared by every dock widget."""
    global _compute
    if _compute is None:
        _compute = ComputeThread()
    return _compute
