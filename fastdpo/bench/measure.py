"""How the bench measures: time (CUDA events, perf_counter), peak memory (CUDA allocator;
on the CPU a fresh forked process per measurement, see :mod:`fastdpo.bench`), the machine."""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict

import torch

from .config import Config
from .registry import PROVIDERS, Step, Unavailable, load_provider_modules


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _timed_call(fn: Step, device: str) -> float:
    """Seconds taken by one call of ``fn``."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_steps(
    steps: dict[str, Step], device: str, repeats: int, warmup: int = 2
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call of each step: each provider in turn runs ``warmup`` untimed calls,
    then ``repeats`` timed ones back to back, as a training loop repeats its step.

    Back to back, not interleaved across providers: on the CPU, glibc maps every block above
    a threshold on its own and returns it to the kernel when freed, so a call faults its large
    buffers in afresh (a 16 MB buffer: ~4000 page faults) unless the previous call left blocks
    of the same sizes behind.  Interleaving providers charged each one for the heap the
    previous provider left: x-transformers' medium head read 886 ms in the suite against 459
    ms in a loop of its own, and its small head 7 or 14 ms from one turn to the next
    (docs/performance.md).  A loop of one step is what training runs, so that is what is
    timed; the faults it still takes (x-transformers' logit-sized buffers are mapped afresh at
    every step, as in any default CPU training loop) stay in its time.

    Returns (times, errors): a step that raises is dropped and its one-line reason recorded
    in ``errors``.
    """
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for name, fn in steps.items():
        try:
            for _ in range(warmup):
                fn()
                _sync(device)
            for _ in range(repeats):
                times[name].append(_timed_call(fn, device))
        except Exception as e:  # noqa: BLE001 -- a failing provider is a result
            errors[name] = _one_line(e)
    return times, errors


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


# glibc: mallopt(M_MMAP_THRESHOLD, n) fixes the threshold (no dynamic raising) so every
# block >= n is mmapped and unmapped when freed.  256 KiB is far below any activation here.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 256 * 1024


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def peak_extra_bytes(fn: Step, device: str, warmup: bool = True) -> int:
    """Peak memory of one call of ``fn`` above what was held before it (after a warm-up call,
    unless ``warmup=False``).  On the CPU, call it in a fresh process after
    :func:`worker_heap` (see the module doc of :mod:`fastdpo.bench`)."""
    if warmup:
        fn()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark (VmHWM) to the current RSS
    fn()
    return _rss_bytes("VmHWM") - base


def worker_heap() -> None:
    """A memory worker's malloc: every block of at least 256 KiB mapped on its own and returned
    to the kernel when freed, so the resident size follows the live tensors (the bench's
    workers and benchmarks/long_context.py measure the same way)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


def _measure_request(req: dict) -> dict:
    """In a fresh process: build one provider and measure its CPU peak (see the module doc)."""
    worker_heap()
    provider = req["provider"]
    if provider not in PROVIDERS:
        raise KeyError(f"provider {provider!r} is not registered in a fresh process")
    cfg = Config(**req["cfg"])
    torch.set_num_threads(req.get("threads") or torch.get_num_threads())
    try:
        fn = PROVIDERS[provider].build(req["workload"], req["mode"], cfg)
    except Unavailable as e:
        return dict(unavailable=str(e))
    return dict(peak_extra_bytes=peak_extra_bytes(fn, cfg.device))


# What the memory server imports once, before it forks its first worker.
_PRELOAD = ("torch", "x_transformers", "einx", "fastdpo", "liger_kernel.chunked_loss")


def _memory_server(provider_modules: list[str]) -> None:
    """Serve measurement requests (JSON lines on stdin), each in a process forked afresh.

    Started by :class:`MemoryServer`.  This process imports the modules (and the modules
    registering extra providers) and never runs a tensor op, so every forked worker starts
    from an untouched heap and a single thread, and pays no import (4 s with torch and
    x-transformers).  Per request it prints the worker's pid, then the result (or how the
    worker died), one JSON line each.
    """
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    load_provider_modules(provider_modules)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(r)
            os.dup2(2, 1)  # keep stray prints off the protocol pipe
            try:
                result = _measure_request(req)
            except BaseException as e:  # noqa: BLE001 -- reported, not raised
                result = dict(error=_one_line(e))
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        out.write(json.dumps(dict(pid=pid)) + "\n")
        out.flush()
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if data:
            result = json.loads(data)
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            why = " (out of memory?)" if sig == signal.SIGKILL else ""
            result = dict(error=f"memory worker killed by {signal.Signals(sig).name}{why}")
        else:
            result = dict(error=f"memory worker exited with code {os.waitstatus_to_exitcode(status)} and no result")
        out.write(json.dumps(result) + "\n")
        out.flush()


class MemoryServer:
    """Measures CPU peaks in fresh processes forked by one :func:`_memory_server`."""

    def __init__(self, timeout: float | None = None, provider_modules: Iterable[str] = ()):
        self.timeout = timeout
        self.provider_modules = list(provider_modules)
        self.proc = None

    def _start(self):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; import fastdpo.bench; from fastdpo.bench.measure import _memory_server; _memory_server(sys.argv[1:])",
             *self.provider_modules],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self._buf = b""

    def _readline(self, timeout: float | None) -> str:
        # Reads the pipe's fd directly: a buffered reader could hold the next line where
        # select() cannot see it.
        import select

        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("the memory server died")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def measure(self, workload: str, provider: str, mode: str, cfg: Config) -> dict:
        """``{"peak_extra_bytes": n}``, ``{"error": one line}`` or ``{"unavailable": reason}``."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        req = dict(workload=workload, provider=provider, mode=mode, cfg=asdict(cfg), threads=torch.get_num_threads())
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self._readline(None))["pid"]
            try:
                return json.loads(self._readline(self.timeout))
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._readline(None)
                return dict(error=f"memory worker timed out after {self.timeout} s")
        except (OSError, EOFError, ValueError) as e:
            self.close()
            return dict(error=f"memory server: {_one_line(e)}")

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def measure_memory_cuda(fn: Step) -> dict:
    try:
        return dict(peak_extra_bytes=peak_extra_bytes(fn, "cuda"))
    except Exception as e:  # noqa: BLE001 -- an OOM is a result
        return dict(error=_one_line(e))
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi), or None."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _git_commit() -> str | None:
    """The checkout's commit when fastdpo runs from one (not from an installed copy)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str | torch.device) -> dict:
    """What results are tagged with: the machine, the versions, the date (the bench's rows and
    benchmarks/gpu_suite.py's report)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_model() or platform.machine()}, {os.cpu_count()} cores"
    env = dict(
        device_name=name,
        driver=_driver() if cuda else None,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        torch=torch.__version__,
        triton=_version("triton"),
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
        x_transformers=_version("x-transformers"),
        liger_kernel=_version("liger-kernel"),
        trl=_version("trl"),
        cut_cross_entropy=_version("cut-cross-entropy"),
        fastdpo=_version("fastdpo"),
        fastdpo_commit=_git_commit(),
        threads=torch.get_num_threads(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )
    if cuda:
        props = torch.cuda.get_device_properties(device)
        env.update(sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    return env
