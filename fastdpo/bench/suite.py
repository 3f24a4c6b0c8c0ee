"""The run: every (size, workload, mode, provider), timed and measured, one row each."""

from __future__ import annotations

import gc
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch

from .config import LOSSES, MODES, SIZE_FIELDS, WORKLOADS, Config, references
from .inputs import make_batch
from .measure import WorkerServer, _one_line, environment, measure_memory_cuda, time_steps
from .registry import PROVIDERS, Step, Unavailable, applicable
from .report import add_ratios

ISOLATIONS = ("process", "shuffle")

# Seconds between two visits of the interleaved rounds: after a call, libgomp's idle threads spin
# (GOMP_SPINCOUNT, 300000 turns: milliseconds) before they sleep, and on 2 cores a spinning thread
# of the previous worker slowed the next one's short calls (the small head's, 2-4 ms, read up to
# 2x) even after its untimed call.
VISIT_GAP_S = 0.02


def default_isolation(device: str) -> str:
    """``process`` on the CPU; ``shuffle`` on CUDA, where a worker forked from the server has
    not been run on a GPU yet (a process that initialized CUDA cannot fork one that uses it)."""
    return "shuffle" if device.startswith("cuda") else "process"


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:

        class _Null:
            def update(self, n=1): ...
            def set_description_str(self, s): ...
            def close(self): ...

        return _Null()
    # disable=None: no bar when stderr is not a terminal (CI logs, pipes).
    return tqdm(total=total, unit="task", dynamic_ncols=True, leave=False, file=sys.stderr, disable=None)


def run(
    cfgs: list[Config],
    *,
    workloads: Iterable[str] = WORKLOADS,
    modes: Iterable[str] = MODES,
    providers: Iterable[str] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    memory: bool = True,
    progress: bool = True,
    timeout: float | None = None,
    provider_modules: Iterable[str] = (),
    isolation: str | None = None,
    seed: int | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Measure every (size, workload, mode, provider); returns one row per combination.

    ``providers=None`` means every registered one measured under the configs' ``loss``;
    :func:`~fastdpo.bench.config.references` of that loss (and ``body`` for the step workload)
    are always added.  A loss other than ``"dpo"`` has the step workload only.  ``provider_modules`` are the modules that registered
    extra providers (imported again by the worker processes).

    ``isolation`` (default :func:`default_isolation`): ``"process"`` times each provider in a
    fresh process of its own, the repeats interleaved across providers in rounds, each round in
    a shuffled order; ``"shuffle"`` times every provider in this process, one after the other in
    a shuffled order, each provider's calls back to back.  ``seed`` (default: drawn at random)
    seeds the shuffles and is written in every row, with ``isolation``, the timing process's
    ``pid`` and (shuffle) the provider's place in the ``order``.  ``on_rows(rows)`` is called
    with every row so far after each (size, workload, mode) group.
    """
    loss = cfgs[0].loss
    if loss not in LOSSES or any(c.loss != loss for c in cfgs):
        raise ValueError(f"every config must have the same loss, one of {LOSSES}; got {sorted({c.loss for c in cfgs})}")
    names = list(PROVIDERS) if providers is None else [*references(loss), *providers]
    names = list(dict.fromkeys(names))
    workloads, modes = list(workloads), list(modes)
    if loss != "dpo" and workloads != ["step"]:
        raise ValueError(f"loss {loss!r} has the step workload only, got workloads {workloads}")
    isolation = isolation or default_isolation(cfgs[0].device)
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    seed = random.randrange(2**31) if seed is None else seed
    if any(w == "step" for w in workloads):
        names.append("body")  # the head-memory column needs it
    groups = [(c, w, m) for c in cfgs for w in workloads for m in modes]
    total = sum(len(applicable(w, names, loss)) * (2 if memory else 1) for _, w, _ in groups)
    bar = _progress(total, progress)
    rows: list[dict] = []
    env = environment(cfgs[0].device)
    with WorkerServer(timeout, provider_modules) as server:
        try:
            for i, (cfg, workload, mode) in enumerate(groups):
                here = [_new_row(n, cfg, workload, mode, repeats, env, isolation, seed)
                        for n in applicable(workload, names, loss)]  # fmt: skip
                rng = random.Random(f"{seed}/{i}")  # a group's order does not depend on the groups before it
                group = _run_in_processes if isolation == "process" else _run_in_order
                group(cfg, workload, mode, {r["provider"]: r for r in here}, repeats, warmup, memory, bar, server, rng)
                rows += here
                if on_rows is not None:  # e.g. save as it goes: a long run cut short keeps its rows
                    add_ratios(rows)
                    on_rows(rows)
        finally:
            bar.close()
    add_ratios(rows)
    return rows


def _new_row(n, cfg, workload, mode, repeats, env, isolation, seed) -> dict:
    padded, packed = make_batch(cfg).tokens
    return dict(provider=n, loss=cfg.loss, workload=workload, mode=mode, status="ok", reason="", repeats=repeats,
                **{k: getattr(cfg, k) for k in SIZE_FIELDS}, dtype=cfg.dtype, device=cfg.device, **env,
                isolation=isolation, seed=seed, pid=None, order=None, tokens_padded=padded,
                tokens_packed=packed)  # fmt: skip


def _fail(row: dict, status: str, reason: str) -> None:
    if row["status"] == "ok":
        row.update(status=status, reason=reason)


def _record_times(row: dict, seconds: list[float]) -> None:
    if seconds and row["status"] == "ok":
        row.update(median_ms=statistics.median(seconds) * 1e3, min_ms=min(seconds) * 1e3)


def _record_memory(row: dict, mem: dict) -> None:
    if "peak_extra_bytes" in mem:
        row["peak_mib"] = mem["peak_extra_bytes"] / 2**20
    elif "unavailable" in mem:
        _fail(row, "unavailable", mem["unavailable"])
    else:
        _fail(row, "failed", f"peak memory: {mem.get('error')}")


def _label(cfg: Config, workload: str, mode: str) -> str:
    return f"{workload} {mode} V={cfg.vocab} L={cfg.seq_len}"


def _run_in_processes(cfg, workload, mode, rows, repeats, warmup, memory, bar, server, rng) -> None:
    """isolation="process": each provider built, warmed up and timed in a worker of its own
    (the workers live side by side; only one runs at a time), then measured in a fresh
    memory worker (CPU) or by its timing worker (CUDA).

    The ``repeats`` timed calls are interleaved in rounds: each round visits every provider
    once, in a freshly shuffled order, and a visit is one untimed call then one timed call,
    :data:`VISIT_GAP_S` after the previous visit ended.
    The rounds spread whatever the machine does during the run over every provider alike (what
    makes ratios from one run comparable on a shared machine); the untimed call lets each timed
    call follow one of its own in its own process, as a training loop's step does, rather than
    another process's work (caches, the previous worker's OpenMP threads still spinning).
    """
    label = _label(cfg, workload, mode)
    cuda = cfg.device.startswith("cuda")
    pids: dict[str, int] = {}
    seconds: dict[str, list[float]] = {}
    try:
        for n, row in rows.items():
            bar.set_description_str(f"{label}: building {n} (own process)")
            pid, built = server.start(n, workload, mode, cfg)
            row["pid"] = pid
            if built.get("ok"):
                pids[n] = pid
                built = server.call(pid, do="warmup", n=warmup)
            if not built.get("ok"):
                status = "unavailable" if "unavailable" in built else "failed"
                _fail(row, status, built.get("unavailable") or built.get("error"))
                pids.pop(n, None)
                server.stop(pid)
                bar.update(2 if memory else 1)
        bar.set_description_str(f"{label}: timing {len(pids)} providers x {repeats}, interleaved")
        seconds = {n: [] for n in pids}
        for _ in range(repeats):
            for n in rng.sample(list(pids), len(pids)):
                time.sleep(VISIT_GAP_S)
                got = server.call(pids[n], do="time", untimed=1, timed=1)
                if "seconds" in got:
                    seconds[n] += got["seconds"]
                else:
                    _fail(rows[n], "failed", got.get("error"))
                    server.stop(pids.pop(n))
                    bar.update(2 if memory else 1)
        for n in pids:
            _record_times(rows[n], seconds[n])
            bar.update(1)
        if cuda and memory:
            for n, pid in pids.items():
                bar.set_description_str(f"{label}: peak memory of {n}")
                _record_memory(rows[n], server.call(pid, do="memory"))
                bar.update(1)
    finally:
        for pid in pids.values():
            server.stop(pid)
    if not cuda and memory:
        _measure_cpu_memory(cfg, workload, mode, rows, [n for n in pids if rows[n]["status"] == "ok"], bar, server)


def _run_in_order(cfg, workload, mode, rows, repeats, warmup, memory, bar, server, rng) -> None:
    """isolation="shuffle": every provider built and timed in this process (each one's calls
    back to back, :func:`time_steps`), one after the other in a shuffled order; the CPU peaks
    in fresh memory workers, the CUDA ones here."""
    label = _label(cfg, workload, mode)
    order = rng.sample(list(rows), len(rows))
    steps: dict[str, Step] = {}
    for k, n in enumerate(order, 1):
        rows[n].update(pid=os.getpid(), order=k)
        bar.set_description_str(f"{label}: building {n}")
        try:
            steps[n] = PROVIDERS[n].build(workload, mode, cfg)
        except Unavailable as e:
            _fail(rows[n], "unavailable", str(e))
            bar.update(2 if memory else 1)
        except Exception as e:  # noqa: BLE001
            _fail(rows[n], "failed", _one_line(e))
            bar.update(2 if memory else 1)
    bar.set_description_str(f"{label}: timing {len(steps)} providers x {repeats}, in a shuffled order")
    times, errors = time_steps(steps, cfg.device, repeats, warmup)
    for n, why in errors.items():
        _fail(rows[n], "failed", why)
    for n in steps:
        _record_times(rows[n], times[n])
        bar.update(1)
    if cfg.device.startswith("cuda") and memory:
        for n, fn in steps.items():
            if n not in errors:
                bar.set_description_str(f"{label}: peak memory of {n}")
                _record_memory(rows[n], measure_memory_cuda(fn))
            bar.update(1)
    ok = [n for n in steps if n not in errors]
    steps.clear()
    gc.collect()
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
    elif memory:
        _measure_cpu_memory(cfg, workload, mode, rows, ok, bar, server)


def _measure_cpu_memory(cfg, workload, mode, rows, names, bar, server) -> None:
    label = _label(cfg, workload, mode)
    for n in names:
        bar.set_description_str(f"{label}: peak memory of {n} (fresh process)")
        _record_memory(rows[n], server.measure(workload, n, mode, cfg))
        bar.update(1)
