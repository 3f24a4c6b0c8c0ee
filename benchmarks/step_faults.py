"""Page faults and CPU time per bench step: what a step costs the kernel, not only the clock.

    python benchmarks/step_faults.py [--size medium] [--mode forward+backward]
        [--providers floor,body,fastdpo-torch] [--no-huge-pages] [--repeats 5]

Each provider's step (:mod:`fastdpo.bench`, the models and batch ``fastdpo bench`` times) runs
in a fresh process: two untimed calls, then ``--repeats`` calls, each measured with
``getrusage`` (wall, user and system CPU time, minor page faults); the call with the median
wall time is printed.  ``--no-huge-pages`` sets ``fastdpo.scoring.rows.HUGE_PAGES = False`` in the
children (the fused head's buffers in 4 KiB pages, as before issue 25).  A step whose buffers
are fresh memory pays a fault per 4 KiB page the first time it writes them; on a VM that is
system time the profiler's op table does not show (docs/performance-log.md, "2026-12-03 · CPU: issue 25").
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(name: str, size: str, mode: str, repeats: int, huge: bool) -> None:
    import fastdpo.scoring.rows as chunks
    from fastdpo import bench
    from fastdpo.bench.config import SIZES, Config

    chunks.HUGE_PAGES = huge
    cfg = Config(**{k: v for k, v in SIZES[size].items() if k != "repeats"}, device="cpu")
    step = bench.PROVIDERS[name].build("step", mode, cfg)
    step(), step()
    rows = []
    for _ in range(repeats):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append((t1 - t0, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
    wall, user, system, faults = sorted(rows)[len(rows) // 2]
    print(json.dumps(dict(wall=wall, user=user, sys=system, faults=faults)))


def main() -> None:
    from fastdpo.bench.config import SIZES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="medium")
    ap.add_argument("--mode", choices=["forward", "forward+backward"], default="forward+backward")
    ap.add_argument("--providers", default="floor,body,fastdpo-torch")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-huge-pages", dest="huge", action="store_false")
    args = ap.parse_args()
    print(f"{args.size}, {args.mode}, huge pages {'on' if args.huge else 'off'}: the median-wall call of {args.repeats}")
    for name in [n.strip() for n in args.providers.split(",") if n.strip()]:
        cmd = [sys.executable, __file__, "--child", name, args.size, args.mode, str(args.repeats), str(int(args.huge))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{name:16s} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        d = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:16s} wall {d['wall'] * 1e3:7.0f} ms  user {d['user'] * 1e3:7.0f} ms  sys {d['sys'] * 1e3:6.0f} ms  "
              f"minor faults {d['faults']:8d} ({d['faults'] * 4 / 1024:.0f} MiB of 4 KiB pages)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6] == "1")
    else:
        main()
