"""fastdpo.bench internals: the registry, that the providers compute the same losses (so the
benchmark compares like with like), the CPU peak-memory measurement, ratios and output."""

from __future__ import annotations

import dataclasses

import argparse
import csv
import json
import math
import os

import pytest
import torch

from fastdpo import DPO, bench

from helpers import TOL, three_way

TINY = bench.Config(batch=2, seq_len=24, vocab=256, dim=32, depth=1, heads=2, seed=3)
RAGGED = bench.Config(batch=4, seq_len=48, vocab=256, dim=32, depth=1, heads=2, seed=3, lengths="ragged")


FAMILY_PROVIDERS = {
    "orpo": {"fastdpo-orpo", "liger-orpo", "liger-orpo-eager", "trl-orpo"},
    "cpo": {"fastdpo-cpo", "liger-cpo", "liger-cpo-eager", "trl-cpo"},
    "simpo": {"fastdpo-simpo", "liger-simpo", "liger-simpo-eager", "trl-simpo"},
    "kto": {"fastdpo-kto", "fastdpo-kto-given-kl", "liger-kto", "liger-kto-eager", "trl-kto"},
}


def test_registry_has_the_documented_providers():
    step_only = {"body", "liger", "liger-eager", "trl-fused", "cce", "torch-lce", "fastdpo-logits", "fastdpo-precomputed",
                 "fastdpo-shared", "fastdpo-packed", *set().union(*FAMILY_PROVIDERS.values())}
    both = {"floor", "x-transformers", "torch", "trl", "fastdpo-torch", "fastdpo-triton"}
    assert set(bench.PROVIDERS) == step_only | both
    for name in step_only | both:
        want = ("step",) if name in step_only else bench.WORKLOADS
        assert bench.PROVIDERS[name].workloads == want, name
        assert (bench.PROVIDERS[name].same_loss_as is None) == (name in ("floor", "body")), name
    assert bench.applicable("head", ["liger", "torch", "body"]) == ["torch"]
    # each --loss measures its own providers, the floor, the body and fastdpo's DPO step
    for loss, names in FAMILY_PROVIDERS.items():
        assert set(bench.applicable("step", bench.PROVIDERS, loss)) == names | {"floor", "body", "fastdpo-torch"}, loss
        assert all(bench.PROVIDERS[n].loss == loss for n in names)
    assert not set(bench.applicable("step", bench.PROVIDERS)) & set().union(*FAMILY_PROVIDERS.values())


def test_register_adds_a_provider_and_checks_workloads():
    before = dict(bench.PROVIDERS)
    try:

        @bench.register("test-only", workloads=("head",))
        def build(workload, mode, cfg):
            return lambda: None

        assert bench.PROVIDERS["test-only"].build is build
        with pytest.raises(ValueError, match="workloads"):
            bench.register("bad", workloads=("train",))
    finally:
        bench.PROVIDERS.clear()
        bench.PROVIDERS.update(before)


def _loss(provider: str, workload: str, mode: str = "forward", cfg: bench.Config = TINY) -> float:
    return bench.PROVIDERS[provider].build(workload, mode, cfg)().item()


def _fastdpo_loss(cfg: bench.Config, **conventions) -> float:
    policy, ref = bench.make_models(cfg)
    dpo = DPO(policy, beta=bench.BETA, head="logits", **conventions)  # an independent route
    dpo.ref_model.load_state_dict(ref.state_dict())
    bt = bench.make_batch(cfg)
    with torch.no_grad():
        return dpo(bt.pref, bt.unpref, **bt.dpo_kwargs).item()


LOSS_PROVIDERS = [n for n, p in bench.PROVIDERS.items()
                  if p.same_loss_as is not None and "step" in p.workloads and p.loss == "dpo"]


@pytest.mark.parametrize("cfg", [TINY, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", LOSS_PROVIDERS)
def test_every_provider_computes_the_loss_it_claims(provider, mode, cfg, monkeypatch):
    """Each provider's step returns fastdpo's loss in the conventions it names (x-transformers':
    mean over an input-aligned mask; TRL's: sum over a target-aligned mask), on the same model
    and batch: a provider that computed something else would be compared unfairly."""
    import fastdpo.bench.providers as providers

    monkeypatch.setattr(providers, "LIGER_COMPILED", False)  # the same math, without 15 s of compiling
    try:
        got = _loss(provider, "step", mode, cfg)
    except bench.Unavailable as e:
        if provider == "fastdpo-triton" and not torch.cuda.is_available():
            pytest.skip(f"needs CUDA: {e}")
        if provider == "torch-lce" and not hasattr(torch.nn.functional, "linear_cross_entropy"):
            pytest.skip(f"needs torch >= 2.13: {e}")
        raise  # a peer that should run here (the test command installs them) but does not
    want = _fastdpo_loss(cfg, **bench.PROVIDERS[provider].same_loss_as)
    assert abs(want - math.log(2)) > 1e-3  # the reference is not the policy: a loss that says something
    assert got == pytest.approx(want, rel=1e-5), provider


def _family_loss(cfg: bench.Config, loss: str, options: dict) -> float:
    """fastdpo's module of ``loss`` with ``options`` on the logits route (an independent route),
    the bench's models and sequences; ``kl`` in ``options`` is KTO's forward argument."""
    from fastdpo import CPO, KTO, ORPO

    options = dict(options)
    kl = options.pop("kl", None)
    policy, ref = bench.make_models(cfg)
    with torch.no_grad():
        if loss == "kto":
            kto = KTO(policy, head="logits", **options)
            kto.ref_model.load_state_dict(ref.state_dict())
            extra = {} if kl is None else {"kl": kl}
            return kto(**bench.inputs.kto_batch(cfg, kl=kl is None), **extra).item()
        module = (ORPO if loss == "orpo" else CPO)(policy, head="logits", **options)
        bt = bench.make_batch(cfg)
        return module(bt.pref, bt.unpref, **bt.dpo_kwargs).item()


FAMILY_CASES = [(loss, n) for loss, names in FAMILY_PROVIDERS.items() for n in sorted(names)]


@pytest.mark.parametrize("cfg", [TINY, RAGGED], ids=["full", "ragged"])
@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("loss,provider", FAMILY_CASES, ids=[n for _, n in FAMILY_CASES])
def test_every_family_provider_computes_the_loss_it_claims(loss, provider, mode, cfg, monkeypatch):
    """--loss orpo|cpo|simpo|kto: fastdpo's module, Liger's fused module (eager here: the same
    math as its compiled chunks) and TRL's trainer code each return the loss of fastdpo's
    module under the options the provider names, on the same models and sequences."""
    import fastdpo.bench.providers as providers

    monkeypatch.setattr(providers, "LIGER_COMPILED", False)
    cfg = dataclasses.replace(cfg, loss=loss)
    got = _loss(provider, "step", mode, cfg)
    spec = bench.PROVIDERS[provider]
    want = _family_loss(cfg, loss, spec.same_loss_as)
    assert got == pytest.approx(want, rel=1e-5), provider


def test_family_providers_differ_where_their_losses_do():
    """The check above can fail: the families' losses are different numbers on these
    sequences (ORPO and CPO, CPO and SimPO), so a provider wired to the wrong loss fails it.  (Not KTO's KL: in a batch of as many desirable as undesirable
    sequences its effect cancels to first order, 3e-5 relative at this size.)"""
    from fastdpo.bench import families

    cfg = dataclasses.replace(TINY, loss="orpo")
    assert _family_loss(cfg, "orpo", families.ORPO_TRL) != pytest.approx(_loss("fastdpo-cpo", "step", "forward", cfg), rel=1e-3)
    assert _family_loss(cfg, "cpo", families.CPO_TRL) != pytest.approx(_family_loss(cfg, "simpo", families.SIMPO_TRL), rel=1e-3)


@pytest.mark.parametrize("loss", bench.LOSSES)
def test_body_plan_runs_what_each_loss_cannot_avoid(loss):
    """The floor and the body of each --loss: DPO's reference and policy; ORPO, CPO and SimPO
    the policy alone (ORPO's rows add the chosen prompts); KTO the reference, both models on
    the KL sequences without gradient, then the policy.  Forward mode differentiates nothing."""
    from fastdpo.bench.inputs import body_plan

    cfg = dataclasses.replace(TINY, loss=loss)
    bt = bench.make_batch(cfg)
    plan = body_plan(cfg, "forward+backward")
    grads = [g for *_, g in plan]
    assert grads[-1] and not any(grads[:-1])
    assert not any(g for *_, g in body_plan(cfg, "forward"))
    runs = {"dpo": 2, "orpo": 1, "cpo": 1, "simpo": 1, "kto": 4}[loss]
    assert len(plan) == runs
    completion_rows = int(bt.mask_target.sum())
    if loss == "orpo":
        assert plan[0][2] == completion_rows + int((bt.prompt_mask[:, 1:]).sum())  # full lengths: every prompt
    elif loss == "dpo":
        assert plan[-1][2] == int(bt.mask.sum())  # x-transformers' input-aligned mask
    elif loss != "kto":
        assert plan[-1][2] == completion_rows
    step = bench.PROVIDERS["floor"].build("step", "forward+backward", cfg)
    assert step() is None


def test_loss_option_of_the_cli(capsys):
    """--loss picks the loss's providers (its floor, its body and fastdpo's DPO step always),
    the step workload only, and names a provider of another loss or the head workload as errors."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)

    def fails(*argv):
        args = parser.parse_args(list(argv))
        with pytest.raises(SystemExit) as e:
            bench.main_from_args(args, error=lambda msg: (_ for _ in ()).throw(SystemExit(msg)))
        return str(e.value)

    assert "not measured with --loss orpo" in fails("--loss", "orpo", "--providers", "liger")
    assert "step workload only" in fails("--loss", "kto", "--workload", "head")
    with pytest.raises(ValueError, match="step workload only"):
        bench.run([dataclasses.replace(TINY, loss="orpo")], workloads=["head"], memory=False, progress=False)
    rows = bench.run([dataclasses.replace(TINY, loss="simpo")], workloads=["step"], modes=["forward"],
                     providers=["fastdpo-simpo"], repeats=1, warmup=0, memory=False, progress=False,
                     isolation="shuffle")
    assert {r["provider"] for r in rows} == {"floor", "body", "fastdpo-torch", "fastdpo-simpo"}
    assert {r["loss"] for r in rows} == {"simpo"} and all(r["status"] == "ok" for r in rows), rows
    ours = next(r for r in rows if r["provider"] == "fastdpo-simpo")
    dpo = next(r for r in rows if r["provider"] == "fastdpo-torch")
    assert ours["vs_dpo"] == pytest.approx(ours["median_ms"] / dpo["median_ms"]) and ours["vs_xt"] is None
    table = bench.format_table(rows)
    assert "loss simpo" in table and "vs DPO" in table and "mem vs x-t" not in table
    assert "simpo training step" not in bench.summary(rows)  # forward only here
    assert "simpo evaluation step (no_grad): fastdpo-simpo" in bench.summary(rows)


def test_head_providers_agree():
    ref = _loss("x-transformers", "head")
    for name in ("torch", "fastdpo-torch"):
        assert _loss(name, "head") == pytest.approx(ref, rel=1e-6), name
    bt = bench.make_batch(TINY)
    logits = bench.head_logits(TINY).detach().double()
    lp = logits.log_softmax(-1).gather(-1, bt.tgt.unsqueeze(-1)).squeeze(-1)
    assert _loss("trl", "head") == pytest.approx((lp * bt.mask_target).sum().item(), rel=1e-6)


@pytest.mark.parametrize("workload", bench.WORKLOADS)
def test_backward_mode_leaves_no_gradients(workload):
    step = bench.PROVIDERS["x-transformers"].build(workload, "forward+backward", TINY)
    step()
    cell_objects = [c.cell_contents for c in step.__closure__ or ()]
    params = next(x for x in cell_objects if isinstance(x, list))
    assert params and all(p.grad is None for p in params)


def test_fastdpo_triton_is_unavailable_on_cpu():
    with pytest.raises(bench.Unavailable, match="CUDA"):
        bench.PROVIDERS["fastdpo-triton"].build("step", "forward", TINY)


def test_cpu_peak_memory_counts_the_live_buffers():
    """x-transformers' head holds 3 (2B, L-1, V) float32 buffers at its peak (log_softmax, the
    gather's gradient, the log_softmax gradient), the floor 1: what the fresh-process RSS shows
    once glibc returns freed blocks (the fixed mmap threshold)."""
    cfg = bench.Config(batch=2, seq_len=65, vocab=4096, dim=32, depth=1, heads=2)
    buf = 2 * cfg.batch * (cfg.seq_len - 1) * cfg.vocab * 4
    with bench.WorkerServer(timeout=120) as server:
        xt = server.measure("head", "x-transformers", "forward+backward", cfg)
        floor = server.measure("head", "floor", "forward+backward", cfg)
        unknown = server.measure("head", "no-such-provider", "forward", cfg)
    assert xt["peak_extra_bytes"] / buf == pytest.approx(3, abs=0.2)
    assert floor["peak_extra_bytes"] / buf == pytest.approx(1, abs=0.2)
    assert "not registered" in unknown["error"]


def _row(provider, workload="step", mode="forward", median=None, peak=None, **kw):
    r = dict(provider=provider, workload=workload, mode=mode, status="ok", reason="", median_ms=median,
             peak_mib=peak, dtype="float32", device="cpu", **{k: getattr(TINY, k) for k in bench.SIZE_FIELDS})  # fmt: skip
    r.update(kw)
    return r


def test_ratios_and_head_memory():
    rows = [
        _row("floor", median=10.0, peak=30.0),
        _row("body", median=5.0, peak=20.0),
        _row("x-transformers", median=40.0, peak=60.0),
        _row("fastdpo-torch", median=20.0, peak=30.0),
        _row("liger", status="failed", reason="boom"),
        _row("x-transformers", "head", median=4.0, peak=8.0),
        _row("fastdpo-torch", "head", median=2.0, peak=2.0),
        _row("fastdpo-torch", mode="forward+backward", median=3.0, peak=25.0),  # no references there
    ]
    bench.add_ratios(rows)
    by = {(r["provider"], r["workload"], r["mode"]): r for r in rows}
    ours = by["fastdpo-torch", "step", "forward"]
    assert ours["vs_xt"] == 0.5 and ours["vs_floor"] == 2.0 and ours["mem_vs_xt"] == 0.5
    assert ours["body_mib"] == 20.0 and ours["head_mib"] == 10.0 and ours["head_mem_vs_xt"] == 0.25
    assert by["body", "step", "forward"]["head_mib"] == 0.0
    assert by["liger", "step", "forward"]["vs_xt"] is None
    head = by["fastdpo-torch", "head", "forward"]
    assert head["vs_xt"] == 0.5 and head["head_mib"] == 2.0 and head["body_mib"] is None and head["vs_floor"] is None
    lonely = by["fastdpo-torch", "step", "forward+backward"]
    assert lonely["vs_xt"] is None and lonely["head_mib"] is None
    assert all(set(bench.COLUMNS) <= set(r) for r in rows)

    table = bench.format_table(rows)
    assert "failed: boom" in table
    line = next(ln for ln in table.splitlines() if ln.startswith("fastdpo-torch       step     forward "))
    assert line.split()[3:] == ["20.00", "0.50x", "2.00x", "30.0", "10.0", "0.50x"]


def test_every_provider_drawn_has_its_own_colour(tmp_path, monkeypatch):
    """One colour per provider in the PNG, fastdpo's warm, nobody else's: every registered
    provider has its colour in the table, two more from a --provider-module get spare ones,
    and the bars (one size point) and lines (a sweep) drawn use them, no colour twice."""
    import colorsys

    import matplotlib
    from matplotlib.axes import Axes
    from matplotlib.colors import to_rgb

    from fastdpo.bench import report

    matplotlib.use("Agg")
    assert set(bench.PROVIDERS) <= set(report.PROVIDER_COLORS)
    for name, color in report.PROVIDER_COLORS.items():
        hue, light, sat = colorsys.rgb_to_hls(*to_rgb(color))
        warm = sat > 0.3 and (hue < 0.15 or hue > 0.85)
        assert warm == name.startswith("fastdpo"), (name, color)

    names = [*bench.PROVIDERS, "mine-b", "mine-a"]
    drawn: dict[str, set] = {}

    def spy(draw):
        def wrapped(self, *args, **kwargs):
            drawn.setdefault(kwargs["label"], set()).add(to_rgb(kwargs["color"]))
            return draw(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(Axes, "bar", spy(Axes.bar))
    monkeypatch.setattr(Axes, "plot", spy(Axes.plot))
    for vocabs in ([TINY.vocab], [256, 512]):
        drawn.clear()
        rows = [_row(p, median=1.0 + i, peak=2.0, vocab=v) for i, p in enumerate(names) for v in vocabs]
        bench.add_ratios(rows)
        bench.plot(rows, str(tmp_path / "p.png"))
        assert set(drawn) == set(names)
        assert all(len(c) == 1 for c in drawn.values()), drawn  # the same colour in every panel
        colors = [next(iter(c)) for c in drawn.values()]
        assert len(set(colors)) == len(colors), drawn


def test_write_rows_csv_and_json(tmp_path):
    rows = [_row("x-transformers", median=1.0, peak=2.0, extra="dropped")]
    bench.add_ratios(rows)
    bench.write_rows(rows, str(tmp_path / "r.csv"))
    bench.write_rows(rows, str(tmp_path / "r.json"))
    with open(tmp_path / "r.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        (got,) = list(reader)
    assert got["provider"] == "x-transformers" and float(got["vs_xt"]) == 1.0 and got["reason"] == ""
    (obj,) = json.loads((tmp_path / "r.json").read_text())
    assert tuple(obj) == bench.COLUMNS and obj["median_ms"] == 1.0


def test_sweep_parsing():
    assert bench._sweep("vocab=8192,16384") == ("vocab", [8192, 16384])
    assert bench._sweep("seq-len=64") == ("seq_len", [64])
    for bad in ("vocab", "dim=4", "vocab=", "vocab=a", "seq-len=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._sweep(bad)


def test_bfloat16_step_matches_float64_within_bfloat16_rounding(monkeypatch):
    """The bf16 step: fastdpo's loss is no further from the float64 loss of the same (bf16)
    weights than x-transformers' bf16 step is, plus bf16 slack (helpers.three_way), and
    x-transformers' bf16 step is within that slack of float64 too.  The policy is moved well
    away from the reference (seeded), so the loss is far from log 2: a step returning log 2,
    or one scoring the wrong model, is off by much more than bf16 rounding."""
    import fastdpo.bench.inputs as inputs
    import fastdpo.bench.providers as providers

    real = inputs.make_models

    def make_models(cfg):
        policy, ref = real(cfg)
        g = torch.Generator().manual_seed(cfg.seed + 7)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p))
        return policy, ref

    # every builder gets its models from here (_dpo looks make_models up in inputs)
    monkeypatch.setattr(inputs, "make_models", make_models)
    monkeypatch.setattr(providers, "make_models", make_models)
    cfg16 = bench.Config(**{**vars_of(TINY), "dtype": "bfloat16"})
    losses = {name: _loss(name, "step", "forward+backward", cfg16) for name in ("x-transformers", "fastdpo-torch")}

    from x_transformers.dpo import DPO as XDPO

    policy, ref = make_models(cfg16)
    truth_dpo = XDPO(policy.double(), beta=bench.BETA)
    truth_dpo.ref_model.load_state_dict(ref.double().state_dict())
    bt = bench.make_batch(cfg16)
    with torch.no_grad():
        truth = truth_dpo(bt.pref, bt.unpref, prompt_mask=bt.prompt_mask)
    assert abs(truth.item() - math.log(2)) > 10 * TOL[torch.bfloat16], truth  # a loss that says something
    xt, ours = (torch.tensor(losses[n], dtype=torch.float64) for n in ("x-transformers", "fastdpo-torch"))
    three_way(ours, xt, truth, torch.bfloat16, "fastdpo-torch bf16 step loss")
    three_way(xt, truth, truth, torch.bfloat16, "x-transformers bf16 step loss")


def test_floor_is_a_lower_bound():
    """The step floor does no more than the providers must: its head products cover the counted
    rows only, and fastdpo's are the same products, so its matmul FLOPs are never fewer.
    (A count, not a timing: timings belong to the bench, and providers that skip work the floor
    counts -- precomputed reference scores, a shared prompt, packed rows -- may rightly beat it.)"""
    flops = {}
    real_mm = torch.mm

    def counting_mm(a, b, *args, **kwargs):
        out = real_mm(a, b, *args, **kwargs)
        flops[current] += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return out

    for current in ("floor", "fastdpo-torch"):
        flops[current] = 0
        step = bench.PROVIDERS[current].build("step", "forward+backward", TINY)
        torch.mm = counting_mm
        try:
            step()
        finally:
            torch.mm = real_mm
    assert 0 < flops["floor"] <= flops["fastdpo-torch"], flops


def vars_of(cfg: bench.Config) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


# Two test-only providers: one leaves state behind in its process (as a compiled peer, a cache
# or the heap it freed does), the other fails when it finds that state.
NEIGHBOURS = """
from fastdpo import bench

STATE = {}


@bench.register("leaves-state", workloads=("head",))
def _leaves(workload, mode, cfg):
    def step():
        STATE["left"] = True
    return step


@bench.register("sees-state", workloads=("head",))
def _sees(workload, mode, cfg):
    def step():
        if STATE.get("left"):
            raise RuntimeError("ran after leaves-state in its process")
    return step
"""


@pytest.fixture
def neighbours(tmp_path):
    path = tmp_path / "neighbours.py"
    path.write_text(NEIGHBOURS)
    before = dict(bench.PROVIDERS)
    bench.load_provider_modules([str(path)])
    yield str(path)
    bench.PROVIDERS.clear()
    bench.PROVIDERS.update(before)


def _run_neighbours(path: str, isolation: str, seed: int) -> dict[str, dict]:
    bench.PROVIDERS["sees-state"].build.__globals__["STATE"].clear()  # this process: a fresh start
    rows = bench.run([TINY], workloads=["head"], modes=["forward"], providers=["leaves-state", "sees-state"],
                     repeats=3, warmup=1, memory=False, progress=False, provider_modules=[path],
                     isolation=isolation, seed=seed)  # fmt: skip
    return {r["provider"]: r for r in rows}


def test_each_provider_is_timed_in_a_fresh_process_of_its_own(neighbours):
    """The default on the CPU: no provider's time comes from a process another one ran in, so
    the state one leaves behind cannot reach the next (which it does in one process, below)."""
    assert bench.default_isolation("cpu") == "process"
    rows = _run_neighbours(neighbours, "process", seed=1)
    assert rows["sees-state"]["status"] == "ok", rows["sees-state"]["reason"]
    pids = [r["pid"] for r in rows.values()]
    assert len(set(pids)) == len(pids) == 4 and os.getpid() not in pids
    assert all(r["isolation"] == "process" and r["seed"] == 1 and r["median_ms"] is not None for r in rows.values())


def test_shuffled_order_is_seeded_and_reported(neighbours):
    """In one process (--isolation shuffle) a provider's result can depend on the one before
    it; the order is drawn from the seed, written in each row, and the same seed repeats it."""
    seen = set()
    for seed in (0, 1, 2, 3):
        rows = _run_neighbours(neighbours, "shuffle", seed)
        again = _run_neighbours(neighbours, "shuffle", seed)
        assert {n: r["order"] for n, r in rows.items()} == {n: r["order"] for n, r in again.items()}
        assert sorted(r["order"] for r in rows.values()) == [1, 2, 3, 4]
        assert {r["pid"] for r in rows.values()} == {os.getpid()} and {r["seed"] for r in rows.values()} == {seed}
        after = rows["leaves-state"]["order"] < rows["sees-state"]["order"]
        assert (rows["sees-state"]["status"] == "failed") == after, (seed, rows["sees-state"])
        seen.add(after)
    assert seen == {True, False}  # both orders came up: the test shows what the processes prevent


def test_ragged_batches():
    """--lengths ragged: long-tailed prompt and completion lengths, right padding to the
    longest sequence, prompts shared, token counts as the summary uses them."""
    bt = bench.make_batch(dataclasses.replace(RAGGED, batch=16, seq_len=256))
    prompts = bt.prompt_mask.sum(1)
    assert bt.pref.shape[1] <= 256 and bool((bt.pref_mask | bt.unpref_mask)[:, -1].any())  # padded to the longest
    assert len(set(prompts.tolist())) > 8 and len(set(bt.pref_mask.sum(1).tolist())) > 8  # ragged
    assert torch.equal(bt.pref[bt.prompt_mask], bt.unpref[bt.prompt_mask])
    assert not bt.pref[~bt.pref_mask].any() and bool(bt.pref[bt.pref_mask].all())  # pad id 0 exactly at padding
    for m in (bt.pref_mask, bt.unpref_mask):  # right padding
        assert torch.equal(m, torch.arange(m.shape[1])[None] < m.sum(1, keepdim=True))
    padded, packed = bt.tokens
    assert padded == 32 * bt.pref.shape[1]
    assert packed == int(bt.pref_mask.sum() + bt.unpref_mask.sum() - prompts.sum()) < padded
