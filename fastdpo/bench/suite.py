"""The run: every (size, workload, mode, provider), timed and measured, one row each."""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Callable, Iterable

import torch

from .config import MODES, REFERENCES, SIZE_FIELDS, WORKLOADS, Config
from .measure import MemoryServer, _one_line, environment, measure_memory_cuda, time_steps
from .registry import PROVIDERS, Step, Unavailable, applicable
from .report import add_ratios


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
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Measure every (size, workload, mode, provider); returns one row per combination.

    ``providers=None`` means every registered one; :data:`REFERENCES` (and ``body`` for the
    step workload) are always added.  ``provider_modules`` are the modules that registered
    extra providers (imported again by the CPU memory workers).  ``on_rows(rows)`` is called
    with every row so far after each (size, workload, mode) group.
    """
    names = list(PROVIDERS) if providers is None else [*REFERENCES, *providers]
    names = list(dict.fromkeys(names))
    workloads, modes = list(workloads), list(modes)
    if any(w == "step" for w in workloads):
        names.append("body")  # the head-memory column needs it
    groups = [(c, w, m) for c in cfgs for w in workloads for m in modes]
    total = sum(len(applicable(w, names)) * (2 if memory else 1) for _, w, _ in groups)
    bar = _progress(total, progress)
    rows: list[dict] = []
    env = environment(cfgs[0].device)
    with MemoryServer(timeout, provider_modules) as server:
        try:
            for cfg, workload, mode in groups:
                names_here = applicable(workload, names)
                rows += _run_group(cfg, workload, mode, names_here, repeats, warmup, memory, bar, env, server)
                if on_rows is not None:  # e.g. save as it goes: a long run cut short keeps its rows
                    add_ratios(rows)
                    on_rows(rows)
        finally:
            bar.close()
    add_ratios(rows)
    return rows


def _run_group(cfg, workload, mode, names, repeats, warmup, memory, bar, env, server) -> list[dict]:
    label = f"{workload} {mode} V={cfg.vocab} L={cfg.seq_len}"
    rows = {
        n: dict(provider=n, workload=workload, mode=mode, status="ok", reason="", repeats=repeats,
                **{k: getattr(cfg, k) for k in SIZE_FIELDS}, dtype=cfg.dtype, device=cfg.device, **env)
        for n in names
    }  # fmt: skip

    def fail(n, status, reason):
        if rows[n]["status"] == "ok":
            rows[n].update(status=status, reason=reason)

    steps: dict[str, Step] = {}
    for n in names:
        bar.set_description_str(f"{label}: building {n}")
        try:
            steps[n] = PROVIDERS[n].build(workload, mode, cfg)
        except Unavailable as e:
            fail(n, "unavailable", str(e))
            bar.update(2 if memory else 1)
        except Exception as e:  # noqa: BLE001
            fail(n, "failed", _one_line(e))
            bar.update(2 if memory else 1)
    bar.set_description_str(f"{label}: timing {len(steps)} providers x {repeats}")
    times, errors = time_steps(steps, cfg.device, repeats, warmup)
    for n, why in errors.items():
        fail(n, "failed", why)
    for n in steps:
        if times[n] and n not in errors:
            rows[n].update(median_ms=statistics.median(times[n]) * 1e3, min_ms=min(times[n]) * 1e3)
        bar.update(1)
    if cfg.device.startswith("cuda") and memory:
        for n, fn in steps.items():
            if n not in errors:
                bar.set_description_str(f"{label}: peak memory of {n}")
                _record_memory(rows[n], measure_memory_cuda(fn))
            bar.update(1)
    steps.clear()
    gc.collect()
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
    if not cfg.device.startswith("cuda") and memory:
        for n in times:
            if n not in errors:
                bar.set_description_str(f"{label}: peak memory of {n} (fresh process)")
                _record_memory(rows[n], server.measure(workload, n, mode, cfg))
            bar.update(1)
    return list(rows.values())


def _record_memory(row: dict, mem: dict) -> None:
    if "peak_extra_bytes" in mem:
        row["peak_mib"] = mem["peak_extra_bytes"] / 2**20
    elif "unavailable" in mem:
        row.update(status="unavailable", reason=mem["unavailable"])
    else:
        row.update(status="failed", reason=f"peak memory: {mem.get('error')}")
