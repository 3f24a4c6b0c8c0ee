"""What the bench reports: ratios, the printed table, CSV/JSON rows, the PNG."""

from __future__ import annotations

import csv
import json
import math

from .config import COLUMNS, SIZE_FIELDS



def _prompt(sizes: dict) -> str:
    pct = sizes.get("prompt_pct") or 0
    ragged = " lengths=ragged" if sizes.get("lengths") == "ragged" else ""
    return (f" prompts={pct}%" if pct else "") + ragged

def _ratio(a, b):
    if a is None or b is None or not b or (isinstance(b, float) and math.isnan(b)):
        return None
    return a / b


def add_ratios(rows: list[dict]) -> None:
    """Fill vs_xt, vs_dpo, vs_floor, body_mib, head_mib, mem_vs_xt, head_mem_vs_xt in place.

    A row's ``loss`` is the run's (``--loss``): its floor and body are that loss's, and
    ``vs_dpo`` divides by fastdpo's DPO step (``fastdpo-torch``) on the same point."""

    def key(r):
        return (tuple(r[k] for k in SIZE_FIELDS), r["dtype"], r.get("loss") or "dpo", r["workload"], r["mode"])

    by = {}
    for r in rows:
        by[(key(r), r["provider"])] = r
    for r in rows:
        for col in COLUMNS:
            r.setdefault(col, None)
    for r in rows:
        xt = by.get((key(r), "x-transformers"), {})
        floor = by.get((key(r), "floor"), {})
        body = by.get((key(r), "body"), {})
        if r["workload"] == "step":
            r["body_mib"] = body.get("peak_mib")
            r["head_mib"] = None if r["peak_mib"] is None or r["body_mib"] is None else r["peak_mib"] - r["body_mib"]
            xt_head = None if xt.get("peak_mib") is None or r["body_mib"] is None else xt["peak_mib"] - r["body_mib"]
        else:
            r["head_mib"] = r["peak_mib"]
            xt_head = xt.get("peak_mib")
        r["vs_xt"] = _ratio(r["median_ms"], xt.get("median_ms"))
        r["vs_dpo"] = _ratio(r["median_ms"], by.get((key(r), "fastdpo-torch"), {}).get("median_ms"))
        r["vs_floor"] = _ratio(r["median_ms"], floor.get("median_ms"))
        r["mem_vs_xt"] = _ratio(r["peak_mib"], xt.get("peak_mib"))
        r["head_mem_vs_xt"] = _ratio(r["head_mib"], xt_head) if xt_head and xt_head > 0 else None


def _by_point(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The rows grouped by size point (sizes, dtype, device), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((tuple(r[k] for k in SIZE_FIELDS), r["dtype"], r["device"]), []).append(r)
    return groups


def format_table(rows: list[dict]) -> str:
    """The printed table: one block per size point."""

    def f(x, spec, suffix=""):
        return "-" if x is None else format(x, spec) + suffix

    out = []
    for p, here in _by_point(rows).items():
        sizes = dict(zip(SIZE_FIELDS, p[0]))
        loss = here[0].get("loss") or "dpo"
        # DPO: ratios over x-transformers; another loss: over fastdpo's DPO step (x-t has none)
        base, base_col = ("x-t", "vs_xt") if loss == "dpo" else ("DPO", "vs_dpo")
        cols = [("provider", 19, "<"), ("workload", 8, "<"), ("mode", 16, "<"), ("median ms", 10, ">"),
                (f"vs {base}", 7, ">"), ("vs floor", 8, ">"), ("peak MiB", 9, ">"), ("head MiB", 9, ">"),
                ("mem vs x-t", 10, ">")]  # fmt: skip
        if loss != "dpo":
            cols.pop()
        head = " ".join(f"{name:{al}{w}}" for name, w, al in cols)
        out.append("")
        out.append(
            f"B={sizes['batch']} L={sizes['seq_len']} V={sizes['vocab']} D={sizes['dim']} "
            f"depth={sizes['depth']} heads={sizes['heads']}{_prompt(sizes)} {p[1]} on {p[2]}"
            + ("" if loss == "dpo" else f", loss {loss}")
        )
        out += [head, "-" * len(head)]
        for r in here:
            cells = [
                r["provider"], r["workload"], r["mode"], f(r["median_ms"], ".2f"), f(r[base_col], ".2f", "x"),
                f(r["vs_floor"], ".2f", "x"), f(r["peak_mib"], ".1f"), f(r["head_mib"], ".1f"),
                f(r["mem_vs_xt"], ".2f", "x"),
            ][: len(cols)]  # fmt: skip
            line = " ".join(f"{c:{al}{w}}" for c, (_, w, al) in zip(cells, cols))
            if r["status"] != "ok":
                line += f"  {r['status']}: {r['reason']}"
            out.append(line.rstrip())
    return "\n".join(out[1:])


def isolation_note(rows: list[dict]) -> str:
    """One line: how the providers were kept from each other, and the seed of the orders."""
    isolation = {r.get("isolation") for r in rows} - {None}
    seeds = {r.get("seed") for r in rows} - {None}
    seed = f"seed {', '.join(map(str, sorted(seeds)))}" if seeds else "no seed"
    if isolation == {"process"}:
        return (f"isolation: each provider timed in a fresh process of its own, the repeats interleaved in "
                f"rounds of shuffled order ({seed}; --isolation process)")
    if isolation == {"shuffle"}:
        return (f"isolation: every provider timed in one process, one after another in a shuffled order "
                f"({seed}; --isolation shuffle): a provider's time may depend on the ones before it")
    return f"isolation: {', '.join(sorted(isolation)) or 'not recorded'} ({seed})"


def write_rows(rows: list[dict], path: str) -> None:
    """Rows to ``path``: JSON (a list of objects) for ``.json``, else CSV with :data:`COLUMNS`."""
    rows = [{k: r.get(k) for k in COLUMNS} for r in rows]
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)


# Every provider's colour, the same in every panel and every plot, each colour used once.
# Families: fastdpo's routes in warm colours (reds, oranges, pink, brown, amber) with a heavier
# line and a black bar edge; x-transformers blue; the plain-torch peers cyan; the fused-head
# peers green (TRL, cut-cross-entropy, torch) and purple (Liger); the floor and the bodies grey
# and dashed.  tests/test_bench.py checks that every registered provider has a colour here and
# that no two providers drawn share one.
PROVIDER_COLORS = {
    "fastdpo-torch": "#d62728", "fastdpo-triton": "#ff7f0e", "fastdpo-logits": "#e377c2",
    "fastdpo-precomputed": "#8c564b", "fastdpo-shared": "#e6ab02", "fastdpo-packed": "#b15928",
    "x-transformers": "#1f77b4",
    "torch": "#17becf", "trl": "#9edae5",
    "trl-fused": "#2ca02c", "cce": "#98df8a", "torch-lce": "#637939",
    "liger": "#9467bd", "liger-eager": "#c5b0d5",
    "floor": "#7f7f7f", "body": "#c7c7c7",
    # --loss orpo|cpo|simpo|kto (fastdpo.bench.families)
    "fastdpo-orpo": "#a50f15", "fastdpo-cpo": "#fb6a4a", "fastdpo-simpo": "#fd8d3c", "fastdpo-kto": "#cc4c02",
    "fastdpo-kto-given-kl": "#f768a1",
    "liger-orpo": "#54278f", "liger-orpo-eager": "#bcbddc", "liger-cpo": "#756bb1", "liger-cpo-eager": "#dadaeb",
    "liger-simpo": "#6a51a3", "liger-simpo-eager": "#9e9ac8", "liger-kto": "#3f007d", "liger-kto-eager": "#807dba",
    "trl-orpo": "#006d2c", "trl-cpo": "#41ab5d", "trl-simpo": "#74c476", "trl-kto": "#a1d99b",
}  # fmt: skip
# Providers registered elsewhere (--provider-module) take these in name order, then again dotted.
SPARE_COLORS = ("#393b79", "#843c39", "#7b4173", "#8c6d31", "#5254a3", "#ad494a", "#a55194", "#bd9e39")
_DASHED = ("floor", "body")


def provider_styles(providers: list[str]) -> dict[str, dict]:
    """Line/bar style (matplotlib keyword arguments) of each provider: its colour from
    :data:`PROVIDER_COLORS`, or a spare one for a provider not in it (assigned in name order,
    so the same set of providers gets the same colours in every plot)."""
    spare = sorted(p for p in dict.fromkeys(providers) if p not in PROVIDER_COLORS)
    out = {}
    for p in dict.fromkeys(providers):
        ours = p.startswith("fastdpo")
        if p in PROVIDER_COLORS:
            color, linestyle = PROVIDER_COLORS[p], "--" if p in _DASHED else "-"
        else:
            k = spare.index(p)
            color, linestyle = SPARE_COLORS[k % len(SPARE_COLORS)], "-" if k < len(SPARE_COLORS) else ":"
        out[p] = dict(color=color, linestyle=linestyle, linewidth=2.6 if ours else 1.3, zorder=3 if ours else 2)
    return out


def plot(rows: list[dict], path: str, x: str = "vocab") -> None:
    """A PNG of median time, peak memory and head memory: lines against ``x`` (vocab or
    seq_len) for a sweep, bars per provider for one size point.  One panel per (workload,
    mode), one colour per provider throughout, the legend and title inside the canvas."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for r in rows:
        if (r["workload"], r["mode"]) not in panels:
            panels.append((r["workload"], r["mode"]))
    metrics = [("median_ms", "median time (ms)"), ("peak_mib", "peak memory (MiB)"), ("head_mib", "head memory (MiB)")]
    metrics = [m for m in metrics if any(r[m[0]] is not None for r in rows)] or metrics[:1]  # --no-memory
    xs = sorted({r[x] for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    style = provider_styles(providers)
    sweep = len(xs) > 1
    fig, axes = plt.subplots(len(metrics), len(panels), squeeze=False,
                             figsize=(4.8 * len(panels), 3.0 * len(metrics) + 2.2))
    for j, (workload, mode) in enumerate(panels):
        here = [r for r in rows if (r["workload"], r["mode"]) == (workload, mode)]
        names = [p for p in providers if any(r["provider"] == p for r in here)]
        for i, (col, label) in enumerate(metrics):
            ax = axes[i][j]
            if sweep:
                for p in names:
                    pts = sorted((r[x], r[col]) for r in here if r["provider"] == p and r[col] is not None)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=p, **style[p])
                if xs[-1] >= 4 * xs[0]:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(v) for v in xs])
                ax.minorticks_off()
                if i == len(metrics) - 1:
                    ax.set_xlabel("vocabulary size" if x == "vocab" else "sequence length")
            else:
                vals = [(p, next((r[col] for r in here if r["provider"] == p), None)) for p in names]
                vals = [(p, v) for p, v in vals if v is not None]
                for k, (p, v) in enumerate(vals):
                    ax.bar(k, v, color=style[p]["color"], label=p,
                           edgecolor="black" if p.startswith("fastdpo") else "none", linewidth=1.2)
                ax.set_xticks(range(len(vals)), [p for p, _ in vals], rotation=60, ha="right", fontsize=7)
            if i == 0:
                ax.set_title(f"{workload}, {mode}", fontsize=10)
            if j == 0:
                ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y" if not sweep else "both")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    r0 = rows[0]
    swept = x if sweep else None
    title = (f"fastdpo bench: {r0['device_name']} ({r0['device']}), {r0['dtype']}, B={r0['batch']}, "
             f"L={'swept' if swept == 'seq_len' else r0['seq_len']}, V={'swept' if swept == 'vocab' else r0['vocab']}, "
             f"D={r0['dim']}, depth={r0['depth']}; torch {r0['torch']}, {str(r0['date'])[:10]}")
    if r0.get("loss") not in (None, "dpo"):
        title += f"; --loss {r0['loss']}"
    if r0.get("isolation"):
        title += f"; --isolation {r0['isolation']} --seed {r0['seed']}"
    fig.suptitle(title, fontsize=9, wrap=True)
    ncol = min(len(handles), max(2, int(fig.get_figwidth() // 1.6)))
    rows_of_legend = -(-len(handles) // ncol) if handles else 0
    if handles and sweep:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, frameon=False, fontsize=8)
    height = fig.get_figheight()
    bottom = (0.15 + 0.22 * rows_of_legend) / height if sweep else 0.05
    fig.tight_layout(rect=(0, bottom, 1, 1 - 0.45 / height))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fastdpo_default(device: str) -> str:
    """The provider that is fastdpo's default route on ``device``."""
    return "fastdpo-triton" if device.startswith("cuda") else "fastdpo-torch"


PEERS = ("torch", "trl", "trl-fused", "cce", "liger", "liger-eager", "torch-lce")
_MODE_WORDS = {("step", "forward+backward"): "training step", ("step", "forward"): "evaluation step (no_grad)",
               ("head", "forward+backward"): "loss head alone, forward+backward", ("head", "forward"): "loss head alone, forward"}


def own_failures(rows: list[dict]) -> list[str]:
    """One line per failed row of fastdpo's own providers (:func:`~fastdpo.bench.registry.is_own`):
    the provider, where it failed and why.  ``unavailable`` rows (a device, a missing package) are
    not failures."""
    from .registry import is_own

    return [f"{r['provider']} ({r['workload']} {r['mode']} B={r['batch']} L={r['seq_len']} V={r['vocab']}): {r['reason']}"
            for r in rows if r["status"] == "failed" and is_own(r["provider"])]  # fmt: skip


def summary(rows: list[dict]) -> str:
    """A few lines a newcomer reads in five seconds: fastdpo's default route against
    x-transformers and against the fastest peer of the same run, time and the memory the head
    adds, per size point and (workload, mode).  When any of fastdpo's own providers failed, the
    summary opens with them (:func:`own_failures`)."""

    def ms(r):
        return f"{r['median_ms']:.3g} ms"

    def faster(a, b):
        ratio = b["median_ms"] / a["median_ms"]
        return f"{ratio:.2f}x faster than" if ratio >= 1 else f"{1 / ratio:.2f}x slower than"

    failed = own_failures(rows)
    out = [f"FAILED: {len(failed)} of fastdpo's own measurements failed (fastdpo bench exits 1):"] if failed else []
    out += [f"  {line}" for line in failed]
    for p, here in _by_point(rows).items():
        sizes = dict(zip(SIZE_FIELDS, p[0]))
        out.append(f"summary, B={sizes['batch']} L={sizes['seq_len']} V={sizes['vocab']} D={sizes['dim']} "
                   f"depth={sizes['depth']}{_prompt(sizes)}, {p[1]} on {p[2]}:")
        loss = here[0].get("loss") or "dpo"
        if loss != "dpo":
            out += _family_summary(loss, here)
            continue
        ours_name = fastdpo_default(p[2])
        for key, words in _MODE_WORDS.items():
            by = {r["provider"]: r for r in here if (r["workload"], r["mode"]) == key and r["status"] == "ok"
                  and r["median_ms"] is not None}
            ours, xt = by.get(ours_name), by.get("x-transformers")
            if ours is None or xt is None:
                continue
            line = f"  {words}: fastdpo {ms(ours)}, {faster(ours, xt)} x-transformers ({ms(xt)})"
            peers = [by[n] for n in PEERS if n in by]
            if peers:
                best = min(peers, key=lambda r: r["median_ms"])
                line += f", {faster(ours, best)} the fastest peer, {best['provider']} ({ms(best)})"
            if ours.get("head_mib") is not None and xt.get("head_mib") is not None and key[0] == "step":
                line += f"; its head adds {ours['head_mib']:.1f} MiB (x-transformers' {xt['head_mib']:.1f})"
            out.append(line)
            packed = by.get("fastdpo-packed")
            if packed is not None and key[0] == "step" and packed.get("tokens_packed"):
                share = packed["tokens_packed"] / packed["tokens_padded"]
                ideal = ours["median_ms"] * share
                out.append(f"  {words}, packed (packing='batch', {packed['tokens_packed']} of {packed['tokens_padded']} "
                           f"padded tokens): {ms(packed)}, {faster(packed, xt)} x-transformers, "
                           f"{packed['median_ms'] / ideal:.2f}x the token-proportional ideal ({ideal:.3g} ms)")
    return "\n".join(out)


def _family_summary(loss: str, here: list[dict]) -> list[str]:
    """A loss family's lines: each of fastdpo's providers of the loss against fastdpo's DPO
    step on the same sequences (time, and the memory each head adds), then against each peer
    that computes the same loss (the same ``same_loss_as``: ``liger-kto`` is set against
    ``fastdpo-kto-given-kl``, not against ``fastdpo-kto``, which also scores KL sequences)."""
    from .registry import PROVIDERS

    def ms(r):
        return f"{r['median_ms']:.3g} ms"

    def same(a, b):
        return a in PROVIDERS and b in PROVIDERS and PROVIDERS[a].same_loss_as == PROVIDERS[b].same_loss_as

    out = []
    for key, words in _MODE_WORDS.items():
        by = {r["provider"]: r for r in here if (r["workload"], r["mode"]) == key and r["status"] == "ok"
              and r["median_ms"] is not None}
        dpo = by.get("fastdpo-torch")
        for name, ours in by.items():
            if not name.startswith(f"fastdpo-{loss}"):
                continue
            line = f"  {loss} {words}: {name} {ms(ours)}"
            if dpo is not None:
                line += f", {ours['median_ms'] / dpo['median_ms']:.2f}x fastdpo's DPO step ({ms(dpo)})"
                if ours.get("head_mib") is not None and dpo.get("head_mib") is not None:
                    line += f"; its head adds {ours['head_mib']:.1f} MiB (DPO's {dpo['head_mib']:.1f})"
            out.append(line)
            for peer, r in by.items():
                if peer.startswith(("liger-", "trl-")) and same(peer, name):
                    mem = "" if r.get("peak_mib") is None or ours.get("peak_mib") is None else (
                        f", peak {ours['peak_mib']:.1f} MiB against {r['peak_mib']:.1f}")
                    ratio = r["median_ms"] / ours["median_ms"]
                    than = f"{ratio:.2f}x faster than" if ratio >= 1 else f"{1 / ratio:.2f}x slower than"
                    out.append(f"    {than} {peer} ({ms(r)}){mem}")
    return out
