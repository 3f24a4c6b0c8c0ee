"""Benchmark: fastdpo against x-transformers' DPO and against the floor, on the current device.

Two workloads:

* ``step`` -- one DPO training step (forward + backward) on an x-transformers
  ``TransformerWrapper``.  Providers: ``x-transformers`` (``x_transformers.dpo.DPO``),
  ``fastdpo`` (``fastdpo.DPO``) and ``floor``: the work no implementation avoids -- the model
  body (reference forward, policy forward + backward, on the 2B concatenated sequences, via
  ``return_embeddings=True``) plus the four head products (2B(L-1), D) x (D, V) (reference
  forward, policy forward, two policy backward) as plain ``torch.mm`` calls.
* ``head`` -- the loss head alone: given float32 logits (2B, L-1, V), masked-mean sequence
  log-probs, forward + backward.  Providers: ``x-transformers`` (its ``log_softmax`` +
  gather + masked mean) and ``fastdpo`` (``sequence_logprobs``).

Times are medians over repeats after a warm-up, the providers interleaved in one process so
machine noise hits them alike; ratios are taken in the same run.  Peak memory is measured in a
fresh subprocess per provider: on CPU the peak resident set size above what the process held
once the model and inputs were built (Linux ``/proc/self/clear_refs``); on CUDA
``torch.cuda.max_memory_allocated`` above the same point.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

SIZES = {
    "tiny": dict(batch=1, seq_len=32, vocab=512, dim=32, depth=1, heads=2),
    "small": dict(batch=2, seq_len=256, vocab=8192, dim=128, depth=2, heads=4),
    "medium": dict(batch=4, seq_len=512, vocab=32000, dim=256, depth=2, heads=4),
}
WORKLOADS = {"step": ("floor", "x-transformers", "fastdpo"), "head": ("x-transformers", "fastdpo")}


@dataclass(frozen=True)
class Config:
    batch: int
    seq_len: int
    vocab: int
    dim: int
    depth: int
    heads: int
    device: str = "cpu"
    seed: int = 0


# ----------------------------------------------------------------------------- workloads


def _model(cfg: Config):
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(cfg.seed)
    return TransformerWrapper(
        num_tokens=cfg.vocab,
        max_seq_len=cfg.seq_len,
        attn_layers=Decoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads),
    ).to(cfg.device)


def _batch(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed + 1)
    b, l, v = cfg.batch, cfg.seq_len, cfg.vocab
    pref = torch.randint(0, v, (b, l), generator=g)
    unpref = torch.randint(0, v, (b, l), generator=g)
    prompt_lens = torch.randint(l // 8, l // 2, (b, 1), generator=g)
    prompt_mask = torch.arange(l)[None] < prompt_lens
    return pref.to(cfg.device), unpref.to(cfg.device), prompt_mask.to(cfg.device)


def build(workload: str, provider: str, cfg: Config) -> Callable[[], None]:
    """Set up one provider's inputs and return a callable running one step."""
    if workload == "step":
        pref, unpref, prompt_mask = _batch(cfg)
        if provider == "floor":
            return _floor_step(cfg, pref, unpref)
        if provider == "x-transformers":
            from x_transformers.dpo import DPO as Impl
        elif provider == "fastdpo":
            from fastdpo import DPO as Impl
        else:
            raise ValueError(f"unknown provider {provider!r} for workload 'step'")
        dpo = Impl(_model(cfg), beta=0.1)

        def step():
            dpo(pref, unpref, prompt_mask=prompt_mask).backward()
            dpo.policy_model.zero_grad(set_to_none=True)

        return step
    if workload == "head":
        return _head_step(provider, cfg)
    raise ValueError(f"unknown workload {workload!r}")


def _floor_step(cfg: Config, pref, unpref):
    model = _model(cfg)
    ref = _model(cfg)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad = False
    src = torch.cat((pref, unpref))[:, :-1]
    m, d, v = src.numel(), cfg.dim, cfg.vocab
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 2)
    hidden = torch.randn(m, d, generator=g, device=cfg.device)
    weight = torch.randn(v, d, generator=g, device=cfg.device)
    grad_logits = torch.randn(m, v, generator=g, device=cfg.device)

    def step():
        with torch.no_grad():
            ref(src, return_embeddings=True)
            torch.mm(hidden, weight.T)  # reference head
        emb = model(src, return_embeddings=True)
        torch.mm(hidden, weight.T)  # policy head, forward
        torch.mm(grad_logits, weight)  # d hidden
        torch.mm(hidden.T, grad_logits)  # d weight (transposed: no copy of grad_logits)
        emb.backward(torch.ones_like(emb))
        model.zero_grad(set_to_none=True)

    return step


def _head_step(provider: str, cfg: Config):
    pref, unpref, prompt_mask = _batch(cfg)
    seq = torch.cat((pref, unpref))
    tgt = seq[:, 1:]
    mask = (~prompt_mask.repeat(2, 1))[:, :-1]
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 3)
    logits = torch.randn(*tgt.shape, cfg.vocab, generator=g, device=cfg.device).requires_grad_()
    if provider == "x-transformers":
        import einx
        from x_transformers.dpo import masked_mean

        def step():
            lp = einx.get_at("b n [l], b n -> b n", logits.log_softmax(dim=-1), tgt)
            masked_mean(lp, mask).sum().backward()
            logits.grad = None

    elif provider == "fastdpo":
        from fastdpo import sequence_logprobs

        count = mask.sum(-1).clamp(min=1e-5)

        def step():
            (sequence_logprobs(logits, tgt, mask) / count).sum().backward()
            logits.grad = None

    else:
        raise ValueError(f"unknown provider {provider!r} for workload 'head'")
    return step


# ----------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    steps: dict[str, Callable[[], None]], device: str, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps taking turns so drift hits them alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_extra_bytes(fn: Callable[[], None], device: str) -> int:
    """Peak memory of two calls of ``fn`` above what was held before them."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS watermark (VmHWM) to the current RSS
    fn()
    fn()
    return _rss_bytes("VmHWM") - base


def measure_memory(workload: str, provider: str, cfg: Config) -> dict:
    """Run :func:`peak_extra_bytes` in a fresh interpreter (one provider cannot hide another)."""
    payload = json.dumps(dict(workload=workload, provider=provider, cfg=asdict(cfg)))
    proc = subprocess.run(
        [sys.executable, "-m", "fastdpo.bench", "--memory-worker", payload],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(peak_extra_bytes=None, error=tail)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_worker(payload: str) -> None:
    spec = json.loads(payload)
    cfg = Config(**spec["cfg"])
    torch.set_num_threads(torch.get_num_threads())
    fn = build(spec["workload"], spec["provider"], cfg)
    print(json.dumps(dict(peak_extra_bytes=peak_extra_bytes(fn, cfg.device))))


# ----------------------------------------------------------------------------- report


def environment() -> dict:
    import x_transformers  # noqa: F401
    from importlib.metadata import version

    def ver(name):
        try:
            return version(name)
        except Exception:
            return None

    dev = "cpu"
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.machine()} {os.cpu_count()} cores" if dev == "cpu" else dev,
        torch=torch.__version__,
        triton=ver("triton"),
        x_transformers=ver("x-transformers"),
        fastdpo=ver("fastdpo"),
        threads=torch.get_num_threads(),
    )


def run(cfg: Config, workloads, repeats: int, progress: bool = True) -> list[dict]:
    rows = []
    env = environment()
    for workload in workloads:
        providers = WORKLOADS[workload]
        if progress:
            print(f"[{workload}] timing {', '.join(providers)} ({repeats} repeats)...", flush=True)
        steps = {p: build(workload, p, cfg) for p in providers}
        times = time_interleaved(steps, cfg.device, repeats)
        del steps
        for p in providers:
            if progress:
                print(f"[{workload}] peak memory of {p} in a fresh process...", flush=True)
            mem = measure_memory(workload, p, cfg)
            rows.append(
                dict(
                    workload=workload,
                    provider=p,
                    median_s=statistics.median(times[p]),
                    min_s=min(times[p]),
                    repeats=repeats,
                    peak_extra_mib=(
                        mem["peak_extra_bytes"] / 2**20 if mem.get("peak_extra_bytes") is not None else None
                    ),
                    error=mem.get("error"),
                    **asdict(cfg),
                    **env,
                )
            )
    for r in rows:
        base = next(x for x in rows if x["workload"] == r["workload"] and x["provider"] == "x-transformers")
        r["time_vs_xt"] = r["median_s"] / base["median_s"]
        r["mem_vs_xt"] = (
            r["peak_extra_mib"] / base["peak_extra_mib"]
            if r["peak_extra_mib"] is not None and base["peak_extra_mib"]
            else None
        )
        floor = next((x for x in rows if x["workload"] == r["workload"] and x["provider"] == "floor"), None)
        r["time_vs_floor"] = r["median_s"] / floor["median_s"] if floor else None
    return rows


def format_table(rows: list[dict]) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)

    head = f"{'workload':8} {'provider':15} {'median s':>9} {'vs x-t':>7} {'vs floor':>8} {'peak MiB':>9} {'mem vs x-t':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['workload']:8} {r['provider']:15} {f(r['median_s'], '9.3f')} {f(r['time_vs_xt'], '6.2f')}x"
            f" {f(r['time_vs_floor'], '7.2f')}x {f(r['peak_extra_mib'], '9.1f')} {f(r['mem_vs_xt'], '9.2f')}x"
            + (f"  ({r['error']})" if r.get("error") else "")
        )
    return "\n".join(lines)


def write_rows(rows: list[dict], path: str) -> None:
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="preset workload size")
    for name in ("batch", "seq-len", "vocab", "dim", "depth", "heads"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    p.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per provider (median)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="write the rows to this .csv or .json file")


def main_from_args(args: argparse.Namespace) -> int:
    sizes = dict(SIZES[args.size])
    for name in ("batch", "seq_len", "vocab", "dim", "depth", "heads"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"fastdpo bench: --{name.replace('_', '-')} must be >= 1, got {value}")
            sizes[name] = value
    if sizes["seq_len"] < 2:
        raise SystemExit("fastdpo bench: --seq-len must be >= 2")
    if args.repeats < 1:
        raise SystemExit(f"fastdpo bench: --repeats must be >= 1, got {args.repeats}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config(**sizes, device=device)
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    print(f"fastdpo bench: {args.size} {asdict(cfg)}", flush=True)
    rows = run(cfg, workloads, args.repeats)
    env = environment()
    print(f"\n{env['machine']}, torch {env['torch']}, x-transformers {env['x_transformers']}, "
          f"{env['threads']} threads, {env['date']}")
    print(format_table(rows))
    if args.out:
        write_rows(rows, args.out)
        print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    # Internal entry point of measure_memory's subprocess; users run `fastdpo bench`.
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        _memory_worker(sys.argv[2])
    else:
        from .cli import main

        sys.exit(main(["bench", *sys.argv[1:]]))
