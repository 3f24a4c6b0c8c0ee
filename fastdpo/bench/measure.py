"""How the bench measures: time (CUDA events, perf_counter), peak memory (the CUDA allocator;
on the CPU the peak RSS of a fresh process), the fresh processes each provider runs in, and
the machine.  :mod:`fastdpo.bench` says how they fit together."""

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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(
    steps: dict[str, Step], device: str, repeats: int, warmup: int = 2
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call of each step, all in this process: each provider in turn (the order of
    ``steps``) runs ``warmup`` untimed calls, then ``repeats`` timed ones back to back, as a
    training loop repeats its step.  (``isolation="shuffle"``; the default on the CPU times
    each provider in a process of its own, :class:`WorkerServer`.)

    Back to back, not interleaved across providers in one process: on the CPU, glibc maps every
    block above a threshold on its own and returns it to the kernel when freed, so a call
    faults its large buffers in afresh (a 16 MB buffer: ~4000 page faults) unless the previous
    call left blocks of the same sizes behind; interleaved, each provider would pay for the
    heap its neighbour left.  The faults a loop of one step still takes (x-transformers'
    logit-sized buffers are mapped afresh at every step, as in any default CPU training loop)
    stay in its time.

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


def measure_memory_cuda(fn: Step) -> dict:
    try:
        return dict(peak_extra_bytes=peak_extra_bytes(fn, "cuda"))
    except Exception as e:  # noqa: BLE001 -- an OOM is a result
        return dict(error=_one_line(e))
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- fresh processes


def _worker(req: dict, cmd_fd: int, res_fd: int) -> None:
    """One provider's process: build its step, then answer commands (JSON lines on ``cmd_fd``,
    one JSON line back on ``res_fd`` each) until the command pipe closes.

    ``req["heap"] == "fixed"``: a memory worker (:func:`worker_heap` before anything else).
    Commands: ``{"do": "warmup", "n": n}`` (n untimed calls), ``{"do": "time", "untimed": u,
    "timed": n}`` (u untimed calls, then the seconds of n timed ones, back to back),
    ``{"do": "memory"}`` (:func:`peak_extra_bytes`, its warm-up call included).
    """
    if req.get("heap") == "fixed":
        worker_heap()
    res = os.fdopen(res_fd, "w")

    def send(obj: dict) -> None:
        res.write(json.dumps(obj) + "\n")
        res.flush()

    cfg = Config(**req["cfg"])
    device = cfg.device
    torch.set_num_threads(req.get("threads") or torch.get_num_threads())
    provider = req["provider"]
    try:
        if provider not in PROVIDERS:
            raise KeyError(f"provider {provider!r} is not registered in a fresh process")
        fn = PROVIDERS[provider].build(req["workload"], req["mode"], cfg)
    except Unavailable as e:
        return send(dict(unavailable=str(e)))
    except Exception as e:  # noqa: BLE001 -- reported, not raised
        return send(dict(error=_one_line(e)))
    send(dict(ok=True))
    for line in os.fdopen(cmd_fd, "r"):
        cmd = json.loads(line)
        try:
            if cmd["do"] == "warmup":
                for _ in range(cmd["n"]):
                    fn()
                    _sync(device)
                send(dict(ok=True))
            elif cmd["do"] == "time":
                for _ in range(cmd.get("untimed", 0)):
                    fn()
                    _sync(device)
                send(dict(seconds=[_timed_call(fn, device) for _ in range(cmd["timed"])]))
            elif cmd["do"] == "memory":
                if device.startswith("cuda"):
                    send(measure_memory_cuda(fn))
                else:
                    send(dict(peak_extra_bytes=peak_extra_bytes(fn, device)))
            else:
                raise ValueError(f"unknown command {cmd['do']!r}")
        except Exception as e:  # noqa: BLE001 -- a failing step is a result
            send(dict(error=_one_line(e)))


def _death(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = " (out of memory?)" if sig == signal.SIGKILL else ""
        return f"worker killed by {signal.Signals(sig).name}{why}"
    return f"worker exited with code {os.waitstatus_to_exitcode(status)} and no result"


# What the server imports once, before it forks its first worker (not trl.trainer.utils: it
# starts another thread, and a lock that thread holds when the server forks stays held in the
# worker).
_PRELOAD = ("torch", "x_transformers", "einx", "fastdpo", "liger_kernel.chunked_loss", "cut_cross_entropy",
            "trl.kernels.chunked_logprob")  # fmt: skip


def _server(provider_modules: list[str]) -> None:
    """Fork workers (:func:`_worker`) and relay to them; requests are JSON lines on stdin.

    Started by :class:`WorkerServer`.  This process imports the modules (and the modules
    registering extra providers) and never runs a tensor op, so every forked worker starts
    from an untouched heap and a single thread, and pays no import (4 s with torch and
    x-transformers).  ``{"op": "start", "req": ...}`` forks a worker and answers two lines: its
    pid, then its build result; ``{"op": "call", "pid": p, "cmd": ...}`` answers the worker's
    reply, or how it died; ``{"op": "stop", "pid": p}`` closes its command pipe and reaps it.
    """
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 -- a worker that needs it says why
            pass
    load_provider_modules(provider_modules)
    out = sys.stdout
    workers: dict[int, tuple] = {}  # pid: (command file, result file)

    def reply(obj: dict) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    def reap(pid: int) -> int:
        cmd, res = workers.pop(pid)
        for f in (cmd, res):
            try:
                f.close()
            except OSError:
                pass
        return os.waitpid(pid, 0)[1]

    def relay(pid: int) -> dict:
        line = workers[pid][1].readline()
        return json.loads(line) if line else dict(error=_death(reap(pid)))

    for line in sys.stdin:
        msg = json.loads(line)
        pid = msg.get("pid")
        if msg["op"] == "start":
            if msg["req"]["cfg"]["device"].startswith("cuda") and torch.cuda.is_initialized():
                reply(dict(pid=None))
                reply(dict(error="cannot fork a CUDA worker: CUDA was initialized in the worker server"))
                continue
            cmd_r, cmd_w = os.pipe()
            res_r, res_w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker
                os.close(cmd_w)
                os.close(res_r)
                for cmd, res in workers.values():  # others' pipes: their EOF must not wait on us
                    cmd.close()
                    res.close()
                os.dup2(2, 1)  # keep stray prints off the protocol pipe
                code = 0
                try:
                    _worker(msg["req"], cmd_r, res_w)
                except BaseException:  # noqa: BLE001 -- the server reports a worker without a result
                    code = 1
                os._exit(code)
            os.close(cmd_r)
            os.close(res_w)
            workers[pid] = (os.fdopen(cmd_w, "w"), os.fdopen(res_r, "rb"))
            reply(dict(pid=pid))
            reply(relay(pid))
        elif msg["op"] == "call":
            if pid not in workers:
                reply(dict(error=f"no worker {pid}"))
                continue
            try:
                workers[pid][0].write(json.dumps(msg["cmd"]) + "\n")
                workers[pid][0].flush()
            except OSError:
                pass  # it died: relay reads the end of its pipe and says how
            reply(relay(pid))
        elif msg["op"] == "stop":
            if pid in workers:
                reap(pid)
            reply({})
    for pid in list(workers):
        reap(pid)


class WorkerServer:
    """Fresh processes, one per provider, workload, mode and size, forked by one
    :func:`_server` (a subprocess that has only imported the modules).

    :meth:`start` forks a worker that builds one provider's step; :meth:`call` asks it to warm
    up, time or measure; :meth:`stop` ends it; :meth:`measure` is a memory worker's whole life
    (the CPU peak of one call, :func:`peak_extra_bytes`).  A worker that runs past ``timeout``
    seconds in one request is killed, and the request answers ``{"error": ...}``.
    """

    def __init__(self, timeout: float | None = None, provider_modules: Iterable[str] = ()):
        self.timeout = timeout
        self.provider_modules = list(provider_modules)
        self.proc = None

    def _start(self):
        import subprocess

        # No CUDA query at import in the server (liger asks torch.cuda.is_available()): a
        # process that has initialized CUDA cannot fork a worker that uses it.
        env = {**os.environ, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
        # The server imports the fastdpo this process runs, whatever the working directory.
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import fastdpo.bench; "
                "from fastdpo.bench.measure import _server; _server(sys.argv[2:])")  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, root, *self.provider_modules],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        self._buf = b""

    def _readline(self, timeout: float | None) -> dict:
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
                raise EOFError("the worker server died")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def _send(self, msg: dict) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def _answer(self, pid: int) -> dict:
        """The worker's answer, or after ``timeout`` seconds the worker killed and an error."""
        try:
            return self._readline(self.timeout)
        except TimeoutError:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now: its answer is on the way
                pass
            self._readline(None)  # the server's word that it died
            return dict(error=f"worker timed out after {self.timeout:g} s")

    def start(
        self, provider: str, workload: str, mode: str, cfg: Config, heap: str = "default"
    ) -> tuple[int | None, dict]:
        """Fork a worker that builds ``provider``'s step: (pid, ``{"ok": True}``,
        ``{"unavailable": reason}`` or ``{"error": one line}``).  ``heap="fixed"``: a memory
        worker (:func:`worker_heap`)."""
        req = dict(provider=provider, workload=workload, mode=mode, cfg=asdict(cfg), heap=heap,
                   threads=torch.get_num_threads())  # fmt: skip
        try:
            self._send(dict(op="start", req=req))
            pid = self._readline(None)["pid"]
            return pid, (self._readline(None) if pid is None else self._answer(pid))
        except (OSError, EOFError, ValueError) as e:
            self.close()
            return None, dict(error=f"worker server: {_one_line(e)}")

    def call(self, pid: int, **cmd) -> dict:
        """One command to worker ``pid`` (see :func:`_worker`); its answer or ``{"error": ...}``."""
        try:
            self._send(dict(op="call", pid=pid, cmd=cmd))
            return self._answer(pid)
        except (OSError, EOFError, ValueError) as e:
            self.close()
            return dict(error=f"worker server: {_one_line(e)}")

    def stop(self, pid: int | None) -> None:
        if pid is None or self.proc is None or self.proc.poll() is not None:
            return
        try:
            self._send(dict(op="stop", pid=pid))
            self._readline(None)
        except (OSError, EOFError, ValueError):
            self.close()

    def measure(self, workload: str, provider: str, mode: str, cfg: Config) -> dict:
        """The peak memory of one call in a fresh memory worker: ``{"peak_extra_bytes": n}``,
        ``{"error": one line}`` or ``{"unavailable": reason}``."""
        pid, built = self.start(provider, workload, mode, cfg, heap="fixed")
        try:
            return self.call(pid, do="memory") if built.get("ok") else built
        finally:
            self.stop(pid)

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self.proc.kill()
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
