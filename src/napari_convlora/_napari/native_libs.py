"""Two clashes between torch's native libraries and a napari process, found while building the dock, and
their fixes. Both are called by the compute thread's jobs; nothing here imports torch.

1. Triton crashes napari (segfault on ``import torch._dynamo``, which torchvision and segment_anything
   import). napari's OpenGL canvas loads Mesa, and Mesa loads the system ``libLLVM``. Triton >= 3.7
   ships ``libtriton.so`` with its own LLVM whose symbols are exported; loaded after ``libLLVM``, its
   LLVM calls bind to the system copy (first loaded wins) and its initialisers crash. Loading
   ``libtriton`` with ``RTLD_DEEPBIND`` makes it use its own symbols: :func:`isolate_triton` does that
   before torch is imported, when another LLVM is already in the process.

2. torch trained 2-3x slower in a worker thread. PyTorch's CPU kernels run on OpenMP (GNU ``libgomp`` in
   the Linux wheels), which keeps one thread pool per thread that ever started a parallel region, and
   lets idle pool threads spin (wait busily) for the next region only while the number of threads it
   manages is at most the number of CPUs. Once a second pool exists (the main thread ran a torch op,
   then a worker trains), libgomp throttles spinning and its threads sleep on a futex between regions.
   A small model runs thousands of tiny regions per step, each paying a wake-up: on 2 CPUs, tiny SAM
   36 ms -> 69 ms per step (with ``OMP_WAIT_POLICY=PASSIVE``, which never spins, 85 ms even on the
   main thread alone). ``torch.set_num_threads(1)`` only hid it by never creating a pool. Fix: all torch
   work runs on ONE long-lived compute thread (``_qt/compute.py``), and before a job starts the main
   thread's pool, if any, is released with OpenMP 5's ``omp_pause_resource_all``
   (:func:`release_openmp_threads`); a released pool is re-created if that thread runs torch again.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from functools import lru_cache

_OPENMP_NAMES = ("libgomp", "libomp", "libiomp5")
OMP_PAUSE_SOFT = 1


def _loaded_libraries() -> set[str]:
    """Paths of the shared libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if "/" in line and ".so" in line}
    except OSError:
        return set()


def isolate_triton() -> bool:
    """Import triton with ``RTLD_DEEPBIND`` when another LLVM is already loaded (call before importing
    torch). Returns True when it did so."""
    if "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    if not any("libLLVM" in path.rsplit("/", 1)[-1] for path in _loaded_libraries()):
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    finally:
        sys.setdlopenflags(flags)
    return True


@lru_cache(maxsize=1)
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime loaded in this process (by torch), or None."""
    for path in sorted(_loaded_libraries()):
        if path.rsplit("/", 1)[-1].startswith(_OPENMP_NAMES):
            try:
                lib = ctypes.CDLL(path)
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                lib.omp_pause_resource_all.restype = ctypes.c_int
                return lib
            except (OSError, AttributeError):
                continue
    return None


def release_openmp_threads() -> bool:
    """Free the OpenMP thread pool of the calling thread; call it while no torch op runs anywhere.

    Does nothing (and returns False) when torch is not imported yet, or when the runtime lacks
    ``omp_pause_resource_all`` (OpenMP < 5) or cannot be found (non-Linux).
    """
    if "torch" not in sys.modules:
        return False
    lib = _openmp_runtime()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0
