"""Where a bench step's time goes, by op: ``torch.profiler`` over bench providers' steps.

    python benchmarks/profile_step.py [--size medium] [--providers floor,fastdpo-torch]
        [--mode forward+backward] [--rows 22]

Each provider's step (:mod:`fastdpo.bench`, the same models and batch ``fastdpo bench`` times)
is built in this process, called twice untimed, then timed over three calls (the minimum is
printed) and profiled over one (CPU activities; CUDA too on a GPU): a table of self time by op,
largest first.  One process, one profiled call: the split says where the time goes, not a
timing to compare (``fastdpo bench`` does that).  docs/performance-log.md has the medium CPU
training step of ``floor`` against ``fastdpo-torch``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    from fastdpo import bench
    from fastdpo.bench.config import SIZES, Config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="medium")
    ap.add_argument("--providers", default="floor,fastdpo-torch")
    ap.add_argument("--mode", choices=list(bench.MODES), default="forward+backward")
    ap.add_argument("--rows", type=int, default=22, help="ops per table")
    args = ap.parse_args()
    cfg = Config(**{k: v for k, v in SIZES[args.size].items() if k != "repeats"},
                 device="cuda" if torch.cuda.is_available() else "cpu")
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    steps = {n: bench.PROVIDERS[n].build("step", args.mode, cfg) for n in names}
    sync = torch.cuda.synchronize if cfg.device == "cuda" else (lambda: None)
    for step in steps.values():
        step(), step()
    for name, step in steps.items():
        times = []
        for _ in range(3):
            sync()
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        print(f"{name}: fastest of 3 calls {min(times):.3f} s")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cfg.device == "cuda" else [])
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            step()
            sync()
        print(f"===== {name}, {args.size}, {args.mode}, {cfg.device}, {torch.get_num_threads()} threads")
        key = "self_cuda_time_total" if cfg.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
