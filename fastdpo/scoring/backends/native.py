"""The CPU row fold in C++ (``cpu_fold.cpp``): built for this host at first use, called through
ctypes.

Three calls over rows of float32 logits (each row's V entries contiguous): :func:`score` (the
target's log-prob, nothing written), :func:`softmax` (the softmax written, in place or not, and
the log-prob) and :func:`grad` (``g * (onehot(y) - softmax(z))`` written).  Each row is read
twice (a max pass, then an exp pass while the row is still in cache) with four independent
vector accumulators and a polynomial exp, which is what makes it faster than inductor's
generated code for the same formula (docs/performance-log.md, "A hand-written fold").

The shared library is compiled with the host's C++ compiler (``$CXX``, else ``c++``; ``-O3
-march=native -fopenmp``, about 1 s) into ``$FASTDPO_CACHE`` (else ``~/.cache/fastdpo``), in a file
named by a hash of the source, the compiler's version, the flags and the host's CPU, so a
machine with another instruction set builds its own.  :data:`ENABLED` False, or
``FASTDPO_NATIVE=0`` in the environment, turns it off; where building or loading fails
:func:`available` says False (with one warning) and the callers keep their other paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

ENABLED = os.environ.get("FASTDPO_NATIVE", "1") != "0"
SOURCE = Path(__file__).with_name("cpu_fold.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")
# OpenMP where the compiler has it: the library then links libgomp.so.1, which on Linux is the
# runtime torch has already loaded, so the fold's threads are torch's own (warm, and not left
# spinning against new ones, which std::threads were, inside a step: docs/performance-log.md,
# "A hand-written fold").  Without it (Apple's clang) the fold starts std::threads.
OPENMP = "-fopenmp"

_lib: list = []  # [CDLL] once loaded, [None] once failed
_lock = threading.Lock()

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "fastdpo_score": [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _INT],
    "fastdpo_softmax": [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _INT],
    "fastdpo_grad": [_PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _INT],
}


def _cache_dir() -> Path:
    return Path(os.environ.get("FASTDPO_CACHE") or Path.home() / ".cache" / "fastdpo")


def _cpu_id() -> str:
    """What -march=native depends on: the machine, and on Linux the CPU's model and flags."""
    ident = platform.machine() + platform.system()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    ident += line
                if line.strip() == "":  # the first CPU's block is enough
                    break
    except OSError:
        pass
    return ident


def _compiler() -> list[str]:
    cxx = os.environ.get("CXX") or "c++"
    if shutil.which(cxx.split()[0]) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r}; set CXX)")
    return cxx.split()


def build() -> Path:
    """Compile the library for this host if it is not cached yet; return its path."""
    cxx = _compiler()
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_id()]).encode()).hexdigest()
    path = _cache_dir() / f"cpu_fold-{key[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        for flags in ((*FLAGS, OPENMP), FLAGS):
            done = subprocess.run([*cxx, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{' '.join(cxx)} failed: {done.stderr.strip()[-2000:]}")
        os.replace(out, path)  # atomic: processes building at once each land a whole file
    return path


def open_library(path: Path) -> ctypes.CDLL:
    """The built library at ``path``, its functions typed."""
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _load():
    if _lib:
        return _lib[0]
    with _lock:
        if not _lib:
            lib = None
            try:
                lib = open_library(build())
            except Exception as e:  # noqa: BLE001 -- any failure to build or load means: not here
                warnings.warn(f"fastdpo: building the C++ row fold failed ({type(e).__name__}: {e}); "
                              "using the compiled or ATen path", stacklevel=3)
                lib = None
            _lib.append(lib)
        return _lib[0]


def available() -> bool:
    """True where the library is on (:data:`ENABLED`) and built (built now if need be)."""
    return ENABLED and _load() is not None


def serves(z: Tensor) -> bool:
    """True where the calls below take ``z``: float32 CPU logits (..., V), each row contiguous,
    at most two leading dimensions, and the library available."""
    return (
        z.dtype == torch.float32 and z.device.type == "cpu" and 1 <= z.dim() <= 3
        and z.shape[-1] > 0 and z.stride(-1) == 1 and available()
    )


def _rows(z: Tensor) -> tuple[int, int, int, int]:
    """(A, B, stride of A, stride of B) addressing z's rows."""
    if z.dim() == 3:
        return z.shape[0], z.shape[1], z.stride(0), z.stride(1)
    if z.dim() == 2:
        return 1, z.shape[0], 0, z.stride(0)
    return 1, 1, 0, 0


def _check(z: Tensor, other: Tensor | None = None) -> None:
    if not serves(z):
        raise ValueError("fastdpo.scoring.backends.native: float32 CPU logits with contiguous rows, at most 3-D, expected")
    if other is not None and (other.shape != z.shape or not serves(other)):
        raise ValueError("fastdpo.scoring.backends.native: the output must be float32 with z's shape and contiguous rows")


def _targets(y: Tensor, z: Tensor) -> Tensor:
    if y.shape != z.shape[:-1]:
        raise ValueError(f"fastdpo.scoring.backends.native: targets of shape {tuple(z.shape[:-1])} expected, got {tuple(y.shape)}")
    return y.to(torch.int64).contiguous()


def _threads(z: Tensor) -> int:
    """torch's intra-op thread count, or 1 for calls too small to pay for starting threads
    (~20 us each)."""
    return 1 if z.numel() < (1 << 17) else torch.get_num_threads()


def _raise_if(bad: int) -> None:
    if bad:
        raise IndexError("fastdpo.scoring.backends.native: a target is outside [0, V)")


def score(z: Tensor, y: Tensor) -> Tensor:
    """float32 ``log_softmax(z)[y]`` per row (z's shape minus V); ``z`` is only read."""
    _check(z)
    y = _targets(y, z)
    out = torch.empty(y.shape, dtype=torch.float32)
    a, b, sa, sb = _rows(z)
    _raise_if(_lib[0].fastdpo_score(z.data_ptr(), a, b, sa, sb, z.shape[-1], y.data_ptr(), out.data_ptr(),
                                    _threads(z)))
    return out


def softmax(p: Tensor, z: Tensor, y: Tensor) -> Tensor:
    """Write ``softmax(z)`` into ``p`` (may be ``z``) and return ``log_softmax(z)[y]`` per row."""
    _check(z, p)
    y = _targets(y, z)
    out = torch.empty(y.shape, dtype=torch.float32)
    a, b, sa, sb = _rows(z)
    _, _, da, db = _rows(p)
    _raise_if(_lib[0].fastdpo_softmax(z.data_ptr(), a, b, sa, sb, z.shape[-1], p.data_ptr(), da, db,
                                      y.data_ptr(), out.data_ptr(), _threads(z)))
    return out


def grad(out: Tensor, z: Tensor, y: Tensor, g: Tensor) -> Tensor:
    """Write ``g * (onehot(y) - softmax(z))`` per row into ``out`` (may be ``z``) and return it;
    ``g`` has z's shape minus V."""
    _check(z, out)
    y = _targets(y, z)
    g = g.to(torch.float32).expand(y.shape).contiguous()
    a, b, sa, sb = _rows(z)
    _, _, da, db = _rows(out)
    _raise_if(_lib[0].fastdpo_grad(z.data_ptr(), a, b, sa, sb, z.shape[-1], out.data_ptr(), da, db,
                                   y.data_ptr(), g.data_ptr(), _threads(z)))
    return out
