"""Two clashes between torch's native libraries and a napari process, found while building the dock, and
their fixes. The compute thread calls both; nothing here imports torch.

1. **Triton crashes napari** (segfault on ``import torch._dynamo``, which torchvision and segment_anything
   import). napari's OpenGL canvas loads Mesa, and Mesa loads the system ``libLLVM``. Since Triton 3.7,
   ``libtriton.so`` exports the symbols of the LLVM it links statically (triton-lang/triton#9549); loaded
   after another LLVM, its LLVM calls bind to that copy (first loaded wins) and its initialisers crash. The
   same clash with TensorFlow's LLVM is tensorflow/tensorflow#124205. Loading ``libtriton`` with
   ``RTLD_DEEPBIND`` makes it use its own symbols: :func:`isolate_triton` does that, before torch is
   imported, for Triton >= 3.7 and only when another LLVM is already in the process.

2. **torch trained 2-3x slower in a worker thread.** PyTorch's CPU kernels run on OpenMP (GNU ``libgomp`` in
   the Linux wheels), which keeps one thread pool per thread that ever started a parallel region, and lets
   idle pool threads spin (wait busily) for the next region only while the number of threads it manages is
   at most the number of CPUs. Once a second pool exists (the main thread ran a torch op, then a worker
   trains), libgomp throttles spinning and its threads sleep on a futex between regions. A small model runs
   thousands of tiny regions per step, each paying a wake-up: on 2 CPUs, tiny SAM 36 ms -> 69 ms per step.
   Fix: all torch work runs on ONE long-lived compute thread (``_qt/compute.py``), and when that thread
   starts, the main thread's pool, if any, is released with OpenMP 5's ``omp_pause_resource_all`` of the
   runtime torch itself linked (:func:`release_openmp_threads`). Set ``NAPARI_CONVLORA_KEEP_OPENMP_POOL=1``
   to turn this off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Set to 1 to keep the main thread's OpenMP pool (no call to ``omp_pause_resource_all``).
KEEP_POOL_VARIABLE = "NAPARI_CONVLORA_KEEP_OPENMP_POOL"
OMP_PAUSE_SOFT = 1
#: The first Triton release whose libtriton exports its LLVM symbols.
TRITON_EXPORTS_LLVM = (3, 7)


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if "/" in line and ".so" in line})
    except OSError:
        return []


def _triton_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version("triton").split(".")[:2] if part.isdigit())
    except (PackageNotFoundError, ValueError):
        return None


def isolate_triton() -> bool:
    """Import triton with ``RTLD_DEEPBIND`` when it exports its LLVM (>= 3.7) and another LLVM is already
    loaded (call before importing torch). Returns True when it did so."""
    if "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return False
    if not any(Path(path).name.startswith("libLLVM") for path in _loaded_libraries()):
        return False
    found = _triton_version()
    if found is None or found < TRITON_EXPORTS_LLVM or importlib.util.find_spec("triton") is None:
        return False
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        _import_triton()
    except ImportError:
        return False
    finally:
        sys.setdlopenflags(flags)
    log.info("loaded triton %s with RTLD_DEEPBIND: another LLVM is in this process (see native_libs.py)",
             ".".join(map(str, found)))
    return True


def _import_triton() -> None:
    import triton  # noqa: F401


def torch_openmp_pause() -> tuple[Callable[[int], int], str] | None:
    """torch's own ``omp_pause_resource_all`` and the file of the OpenMP runtime it comes from, or None.

    The symbol is looked up through ``libtorch_cpu`` (already loaded, ``RTLD_NOLOAD``), which resolves it in
    the runtime torch links against, not in whichever OpenMP library happens to be found first by name.
    """
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(os, "RTLD_NOLOAD"):
        return None
    torch_lib = Path(torch.__file__).parent / "lib"
    candidates = [p for p in _loaded_libraries() if Path(p).parent == torch_lib and Path(p).name.startswith("libtorch_cpu")]
    for path in candidates:
        try:
            pause = ctypes.CDLL(path, mode=os.RTLD_NOLOAD).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause, _library_of(pause) or path
    return None


def _library_of(function: Any) -> str | None:
    """The file a C function was loaded from (``dladdr``), or None."""

    class DlInfo(ctypes.Structure):
        _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                    ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

    try:
        libc = ctypes.CDLL(None)
        info = DlInfo()
        if libc.dladdr(ctypes.cast(function, ctypes.c_void_p), ctypes.byref(info)) and info.dli_fname:
            return info.dli_fname.decode()
    except (OSError, AttributeError):
        pass
    return None


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP thread pool in torch's runtime; call it while no torch op runs.

    Does nothing (and returns False) when ``NAPARI_CONVLORA_KEEP_OPENMP_POOL=1``, when torch is not imported
    yet (then the caller has no pool), or when torch's runtime lacks ``omp_pause_resource_all`` (OpenMP < 5)
    or cannot be found (non-Linux). Logs a line when it fires.
    """
    if os.environ.get(KEEP_POOL_VARIABLE, "") not in ("", "0"):
        return False
    found = torch_openmp_pause()
    if found is None:
        return False
    pause, library = found
    if pause(OMP_PAUSE_SOFT) != 0:
        return False
    log.info("released this thread's OpenMP thread pool in %s, so that training on the compute thread keeps "
             "its full speed (set %s=1 to keep it)", library, KEEP_POOL_VARIABLE)
    return True
