"""``fastdpo bench``'s arguments and entry point."""

from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
from collections.abc import Callable

import torch

from .config import (
    DTYPES, LENGTHS, LOSSES, MODES, REFERENCES, SIZE_FIELDS, SIZES, SWEEPABLE, WORKLOADS, Config, references,
)
from .measure import _one_line, environment
from .registry import PROVIDERS, load_provider_modules
from .report import format_table, isolation_note, own_failures, plot, summary, write_rows
from .suite import ISOLATIONS, default_isolation, run


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, with a one-line error otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "an integer >= 0")


def _percent(text: str) -> int:
    value = _non_negative(text)
    if value > 95:
        raise argparse.ArgumentTypeError(f"must be <= 95 (a prompt leaves a completion), got {value}")
    return value


def _lengths(text: str) -> str:
    if text not in LENGTHS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LENGTHS)}, got {text!r}")
    return text


# Each size field's parser (prompt_pct: 0 = the presets' mixed prompt lengths)
_SIZE_TYPE = {"prompt_pct": _percent, "lengths": _lengths}
_SIZE_HELP = {"prompt_pct": " (percent of L; 0: L/8 to L/2 each)",
              "lengths": ": full (every sequence L tokens) or ragged (long-tailed lengths, right padding)"}


def _provider_list(text: str) -> list[str]:
    # Checked against the registry in main_from_args, once --provider-module ones are in.
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of provider names")
    return names


def _sweep(text: str) -> tuple[str, list[int]]:
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in SWEEPABLE:
        raise argparse.ArgumentTypeError(
            f"expected vocab=V1,V2,..., seq-len=L1,L2,... or prompt-pct=P1,P2,..., got {text!r}"
        )
    try:
        vals = [_SIZE_TYPE.get(name, _positive)(v) for v in values.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{name.replace('_', '-')} values: {e}") from None
    if not vals:
        raise argparse.ArgumentTypeError(f"no values to sweep in {text!r}")
    return name, vals


def _choice_or_all(options: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        if text == "all":
            return list(options)
        names = [n.strip() for n in text.split(",")]
        bad = [n for n in names if n not in options]
        if bad:
            raise argparse.ArgumentTypeError(f"expected 'all' or some of {', '.join(options)}, got {', '.join(map(repr, bad))}")
        return names

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``fastdpo bench``'s options."""
    p.add_argument("--size", choices=list(SIZES), default="small", help="preset size (default: small)")
    for name in SIZE_FIELDS:
        flag = name.replace("_", "-")
        p.add_argument(f"--{flag}", dest=name, type=_SIZE_TYPE.get(name, _positive), default=None,
                       metavar="KIND" if name == "lengths" else "N", help=f"override the preset's {flag}" + _SIZE_HELP.get(name, ""))  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model and logits dtype (default float32)")
    p.add_argument("--loss", choices=list(LOSSES), default="dpo",
                   help="the loss measured (default dpo); orpo, cpo, simpo, kto: fastdpo's module of that loss "
                        "against Liger-Kernel's fused module and TRL's trainer code, on the step workload, "
                        "with its floor and fastdpo's DPO step (fastdpo-torch) for the ratios")  # fmt: skip
    p.add_argument("--workload", type=_choice_or_all(WORKLOADS), default=None,
                   help="step, head, or all (default; comma-separated also works); --loss other than dpo: "
                        "step only")  # fmt: skip
    p.add_argument("--mode", type=_choice_or_all(MODES), default=list(MODES),
                   help="forward, forward+backward, or all (default)")  # fmt: skip
    p.add_argument("--providers", type=_provider_list, default=None, metavar="A,B,...",
                   help=f"comma-separated subset of: {', '.join(PROVIDERS)} (default: all of the --loss; "
                        f"{' and '.join(REFERENCES)} are always measured, for the ratios; with another "
                        f"--loss, {' and '.join(references('orpo'))})")  # fmt: skip
    p.add_argument("--provider-module", dest="provider_modules", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: its fastdpo.bench.register calls add providers (repeatable)")  # fmt: skip
    p.add_argument("--sweep", type=_sweep, default=None, metavar="vocab=V1,V2|seq-len=L1,L2|prompt-pct=P1,P2",
                   help="run every size point of one swept dimension")  # fmt: skip
    p.add_argument("--repeats", type=_positive, default=None, help="timed calls per provider (default: the preset's)")
    p.add_argument("--warmup", type=_non_negative, default=2,
                   help="untimed calls per provider before its timed ones (default 2)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="torch CPU threads (default: torch's, one per core); 1 is steadier on a busy machine")  # fmt: skip
    p.add_argument("--isolation", choices=list(ISOLATIONS), default=None,
                   help="process: each provider timed in a fresh process of its own, the repeats interleaved "
                        "in rounds of shuffled order (default on the CPU); shuffle: all in this process, one "
                        "provider after another in a shuffled order (default on CUDA)")  # fmt: skip
    p.add_argument("--seed", type=_non_negative, default=None, metavar="N",
                   help="seed of the shuffled orders (default: drawn at random; the report prints it)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurements")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--timeout", type=_positive, default=None, metavar="S",
                   help="seconds a worker process may take for one build, warm-up, call or measurement "
                        "before it is killed (default: none)")  # fmt: skip
    p.add_argument("--out", default=None, metavar="PATH",
                   help="write the rows to PATH (.csv or .json; default results/bench-<size>-<time>.csv)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="write a PNG of time and memory (default results/bench-<size>-<time>.png; needs matplotlib)")
    p.add_argument("--no-files", dest="files", action="store_false",
                   help="write no CSV or PNG unless --out / --plot name one")


def configs_from_args(args: argparse.Namespace, error: Callable[[str], None]) -> list[Config]:
    preset = dict(SIZES[args.size])
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else preset[k] for k in SIZE_FIELDS}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        error(f"--device: not a torch device: {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        error("--device: CUDA is not available here")
    points = [sizes]
    if args.sweep is not None:
        name, values = args.sweep
        points = [{**sizes, name: v} for v in values]
    for s in points:
        if s["seq_len"] < 2:
            error(f"--seq-len must be >= 2 (one input and one target token), got {s['seq_len']}")
    return [Config(**s, dtype=args.dtype, device=device, loss=args.loss) for s in points]


def _warn_if_busy(device: str) -> None:
    """CPU timings with one OpenMP thread per core stall whenever another process takes a core."""
    if device.startswith("cuda") or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores:
        hint = " (with --threads 1 they are steadier)" if torch.get_num_threads() > 1 else ""
        print(f"note: load average {load:.1f} on {cores} cores: other processes are running, so CPU "
              f"timings will be noisy{hint}", file=sys.stderr, flush=True)  # fmt: skip


def main_from_args(args: argparse.Namespace, error: Callable[[str], None] | None = None) -> int:
    """``fastdpo bench``: run the suite, print the table, write --out and --plot.  Returns 1
    when any of fastdpo's own providers failed (the summary names them first), else 0."""
    error = error or (lambda msg: sys.exit(f"fastdpo bench: error: {msg}"))
    for name in args.provider_modules:
        try:
            load_provider_modules([name])
        except Exception as e:  # noqa: BLE001 -- a usage error, in one line
            error(f"--provider-module {name}: {_one_line(e)}")
    unknown = [n for n in args.providers or () if n not in PROVIDERS]
    if unknown:
        error(f"argument --providers: unknown provider {', '.join(map(repr, unknown))} (known: {', '.join(PROVIDERS)})")
    other = [n for n in args.providers or () if args.loss not in PROVIDERS[n].losses]
    if other:
        mine = [n for n, p in PROVIDERS.items() if args.loss in p.losses]
        error(f"argument --providers: {', '.join(map(repr, other))} not measured with --loss {args.loss} "
              f"(its providers: {', '.join(mine)})")
    if args.workload is None:
        args.workload = list(WORKLOADS) if args.loss == "dpo" else ["step"]
    elif args.loss != "dpo" and args.workload != ["step"]:
        error(f"--loss {args.loss} has the step workload only, got --workload {','.join(args.workload)}")
    if args.out and not args.out.endswith((".csv", ".json")):
        error(f"--out must end in .csv or .json, got {args.out!r}")
    if args.plot and not args.plot.endswith(".png"):
        error(f"--plot must end in .png, got {args.plot!r}")
    cfgs = configs_from_args(args, error)
    repeats = args.repeats or SIZES[args.size]["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    _warn_if_busy(cfgs[0].device)
    isolation = args.isolation or default_isolation(cfgs[0].device)
    seed = random.randrange(2**31) if args.seed is None else args.seed
    env = environment(cfgs[0].device)
    print(
        f"fastdpo bench --size {args.size}{'' if args.loss == 'dpo' else ' --loss ' + args.loss}: {env['device_name']}, {cfgs[0].dtype}, torch {env['torch']}, "
        f"triton {env['triton']}, x-transformers {env['x_transformers']}, liger-kernel {env['liger_kernel']}, "
        f"{env['threads']} threads, {repeats} repeats, --isolation {isolation} --seed {seed}, {env['date']}",
        flush=True,
    )
    out, png = args.out, args.plot
    if args.files:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        tag = f"{args.size}{'' if args.loss == 'dpo' else '-' + args.loss}{'-' + args.sweep[0] if args.sweep else ''}-{stamp}"
        out = out or os.path.join("results", f"bench-{tag}.csv")
        png = png or os.path.join("results", f"bench-{tag}.png")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    rows = run(
        cfgs, workloads=args.workload, modes=args.mode, providers=args.providers, repeats=repeats,
        warmup=args.warmup, memory=args.memory, progress=args.progress, timeout=args.timeout,
        provider_modules=args.provider_modules, isolation=isolation, seed=seed,
        on_rows=(lambda rows: write_rows(rows, out)) if out else None,
    )  # fmt: skip
    print(format_table(rows))
    base = "x-transformers'" if args.loss == "dpo" else "fastdpo's DPO step's (fastdpo-torch)"
    print(f"ratios: median time and peak memory over {base} and the floor's, same run; "
          f"head MiB (step) = peak - the body-only peak; forward = an evaluation step (no_grad)")  # fmt: skip
    print(isolation_note(rows))
    print()
    print(summary(rows))
    if out:
        write_rows(rows, out)  # (also written after each group, as the run went)
        print(f"rows: {out}")
    if png:
        try:
            os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
            plot(rows, png, x=args.sweep[0] if args.sweep else "vocab")
            print(f"plot: {png}")
        except ImportError as e:  # matplotlib is in the bench extra, not a dependency
            print(f"no plot: {e}")
    failed = own_failures(rows)
    if failed:
        print(f"fastdpo bench: {len(failed)} of fastdpo's own measurements failed, first: {failed[0]}", file=sys.stderr)
    return 1 if failed else 0
