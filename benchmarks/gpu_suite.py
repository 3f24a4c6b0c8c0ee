"""The GPU suite: fastdpo's correctness and speed on one CUDA GPU, in one command.

    python benchmarks/gpu_suite.py --out DIR            # on an H100/H200: at most ~6 minutes
    python benchmarks/gpu_suite.py --out DIR --dry-run  # every step at tiny sizes, CPU tensors,
                                                        # Triton interpreted (what CI runs)

Runs from the source tree (no install of fastdpo needed: the repository root goes on sys.path
and ``kernels/`` is found as ``fastdpo.kernels``); imports are checked first, and a missing
module stops the suite within seconds, naming every one (carry them as wheels:
benchmarks/README.md, "On a lent GPU machine").  Sections, in order of importance, each
skipped with a row that says so when the time budget (``--budget-s``) runs out:

1. ``roofline`` -- the two ceilings, measured here: a large device-to-device copy (bytes read +
   written per second) and a large bf16 ``torch.mm`` (FLOP/s).
2. ``correctness`` -- ``sequence_logprobs`` and ``linear_sequence_logprobs`` (every route;
   on the torch-product routes also with a head bias and a softcap, the cap's kernel variants)
   forward and backward against float64 on fresh random inputs (odd V, long rows, masked rows,
   ``-inf`` vocabulary blocks, fp32/bf16/fp16), with the caching allocator poisoned with NaN
   before each call so an unwritten element fails; ``DPO`` against x-transformers' DPO (fp32)
   on the CUDA default route and every selectable one; bitwise determinism over two runs;
   each peer adapter against float64.
3. ``kernels`` -- ``sequence_logprobs`` forward+backward at (16, 2048, 128256) bf16 against
   torch's log_softmax + gather and x-transformers' own formula (GB/s, % of the copy rate).
4. ``head`` -- the fused head forward+backward at a Llama-3-8B head (16384 counted rows,
   D=4096, V=128256, bf16): fastdpo's routes, TRL's ChunkedLogProbFunction, Liger's
   LigerFusedLinearDPOLoss, cut-cross-entropy's linear_cross_entropy and the naive product +
   log_softmax; TFLOP/s over the three products an exact implementation needs, % of the
   measured matrix rate, peak memory; and which route the timings favor against
   ``fastdpo.scoring.cost_model.choose_matmul``.
5. ``step`` -- one DPO training step of a ~1B-parameter bf16 TransformerWrapper (dim 2048,
   depth 12, V 128256, B=4 pairs, L=2048): fastdpo, x-transformers, Liger; ms per step and
   peak memory (an out-of-memory provider is a row that says so).

Writes DIR/gpu.json (every row, the device, driver, versions, date) and DIR/gpu.md (the
tables), and prints the short table last.  Exit status: 0 when every correctness check
passed, 1 otherwise, 2 when modules are missing.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Every module the suite imports besides the standard library: fastdpo (from this tree) and
# its kernels, the reference, and the peers.
REQUIRED = ("torch", "triton", "numpy", "fastdpo", "fastdpo.kernels.sequence_logprobs",
            "fastdpo.kernels.linear_sequence_logprobs", "x_transformers", "einx")
PEER_MODULES = ("liger_kernel", "trl", "cut_cross_entropy")

COLUMNS = ("section", "name", "status", "detail", "err", "bound", "ms", "gbps", "pct_bw", "tflops",
           "pct_mm", "peak_mib", "vs_fastdpo", "note")


# ----------------------------------------------------------------------------- sizes


ALL = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses: the real one for a GPU, a tiny one for the dry run."""

    copy_bytes: int
    mm_n: int
    seq_cases: tuple  # (N, T, V) of the sequence_logprobs checks
    lin_cases: tuple  # (N, T, D, V, dtypes) of the linear checks
    dpo_model: dict  # TransformerWrapper kwargs of the parity checks
    dpo_batch: tuple  # (B, L)
    kernel_shape: tuple  # (N, T, V) of the sequence_logprobs timing
    head_shape: tuple  # (N, T, D, V) of the fused-head timing, every row counted
    step_model: dict
    step_batch: tuple  # (B, L)
    warmup_ms: int
    rep_ms: int
    step_repeats: int


GPU = Sizes(
    copy_bytes=4 << 30, mm_n=8192,
    seq_cases=((4, 64, 50257), (2, 33, 128257), (1, 48, 262147), (3, 128, 128256)),
    # odd V (rows not 16-byte aligned), D = 4096, and one V % 16 == 0 case in bf16 only: each
    # (dtype, V alignment) is another build of every Triton GEMM kernel, seconds apiece.
    lin_cases=((2, 64, 256, 50257, ALL), (2, 40, 4096, 128257, ALL), (3, 33, 96, 32000, ("bfloat16",))),
    dpo_model=dict(num_tokens=50257, max_seq_len=128, dim=64, depth=2, heads=4),
    dpo_batch=(3, 96),
    kernel_shape=(16, 2048, 128256),
    head_shape=(16, 1024, 4096, 128256),
    step_model=dict(num_tokens=128256, max_seq_len=2048, dim=2048, depth=12, heads=16),
    step_batch=(4, 2048),
    warmup_ms=50, rep_ms=300, step_repeats=5,
)
DRY = Sizes(
    copy_bytes=8 << 20, mm_n=256,
    seq_cases=((2, 5, 1031), (1, 4, 4099), (2, 3, 300)),
    lin_cases=((2, 5, 32, 1031, ALL), (2, 4, 48, 512, ("bfloat16", "float32"))),
    dpo_model=dict(num_tokens=517, max_seq_len=32, dim=32, depth=1, heads=2),
    dpo_batch=(2, 12),
    kernel_shape=(2, 8, 1031),
    head_shape=(4, 8, 32, 1031),
    step_model=dict(num_tokens=517, max_seq_len=32, dim=32, depth=1, heads=2),
    step_batch=(2, 16),
    warmup_ms=0, rep_ms=0, step_repeats=2,
)

# Norm-wise relative error against float64 that each check must stay under.  The kernels'
# arithmetic is float32 whatever the input dtype, so scores (sums of float32 log-probs) are
# held to float32 bounds; a gradient element is rounded once to the input dtype (and, on the
# fused head, the softmax-gradient tile too): half an ulp of bf16 is 2^-9, of fp16 2^-12.
SCORE_BOUND = 1e-5
GRAD_BOUND = {"float32": 1e-5, "bfloat16": 8e-3, "float16": 1e-3}
# DPO against x-transformers (fp32, the same model): the loss and every gradient.
DPO_LOSS_BOUND, DPO_GRAD_BOUND = 1e-5, 1e-4


# ----------------------------------------------------------------------------- set-up


def check_imports(need_peers: bool) -> list[str]:
    """Import every module the suite needs; return those that fail (all of them, not the first)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    bench_dir = str(ROOT / "benchmarks")
    if bench_dir not in sys.path:
        sys.path.insert(0, bench_dir)
    missing = []
    for name in REQUIRED + (PEER_MODULES if need_peers else ()):
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 -- any failure means the suite cannot use it
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    return missing


# ----------------------------------------------------------------------------- the run


@dataclass
class Suite:
    device: object
    sizes: Sizes
    budget_s: float
    dry_run: bool
    start: float = field(default_factory=time.perf_counter)
    rows: list = field(default_factory=list)
    roof: dict = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def add(self, section: str, name: str, status: str, **values) -> dict:
        row = {c: None for c in COLUMNS}
        row.update(section=section, name=name, status=status, **values)
        self.rows.append(row)
        mark = {"pass": ".", "ok": ".", "fail": "F", "failed": "E"}.get(status, "s")
        detail = f" {row['detail']}" if row.get("detail") else ""
        print(f"[{self.elapsed():6.1f}s] {section:11s} {mark} {name}{detail}", flush=True)
        return row

    def section(self, name: str, needs_s: float, fn) -> None:
        """Run one section, or record that the budget left no time for it."""
        if self.left() < needs_s:
            self.add(name, "(section)", "skipped", detail=f"time budget: {self.left():.0f} s left, needs ~{needs_s:.0f} s")
            return
        try:
            fn(self)
        except Exception as e:  # noqa: BLE001 -- a broken section is a result, the rest still runs
            self.add(name, "(section)", "failed", detail=_one_line(e), note=traceback.format_exc(limit=6))
        finally:
            _free(self.device)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(suite: Suite, fn) -> float:
    """Median milliseconds of ``fn()``: triton.testing.do_bench (CUDA events) on a GPU, a few
    perf_counter calls in the dry run."""
    if suite.device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=suite.sizes.warmup_ms, rep=suite.sizes.rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def peak_mib(suite: Suite, fn) -> float | None:
    """Peak device memory of one ``fn()`` above what was allocated before it, MiB (CUDA only)."""
    import torch

    if suite.device.type != "cuda":
        return None
    _free(suite.device)
    before = torch.cuda.memory_allocated(suite.device)
    torch.cuda.reset_peak_memory_stats(suite.device)
    fn()
    torch.cuda.synchronize(suite.device)
    return (torch.cuda.max_memory_allocated(suite.device) - before) / 2**20


def poison(device, nbytes: int) -> None:
    """Fill the caching allocator's free blocks with 0xFF bytes (NaN in every float dtype) so a
    kernel output that is allocated but never written reads NaN: a large block the outputs are
    carved from, and small-pool blocks (allocations under 1 MiB come from their own segments)."""
    import torch

    if device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(device)
    big = torch.empty(max(1 << 20, min(nbytes, free // 2)), dtype=torch.uint8, device=device).fill_(255)
    small = [torch.empty(256 << 10, dtype=torch.uint8, device=device).fill_(255) for _ in range(64)]
    del big, small


def rel(a, b) -> float:
    """Norm-wise relative error of ``a`` against ``b`` (float64); inf when ``a`` has a NaN."""
    import torch

    a, b = a.double(), b.double()
    if not torch.isfinite(a).all() and torch.isfinite(b).all():
        return math.inf
    d = b.norm().item()
    return (a - b).norm().item() / (d if d > 0 else 1.0)


def _gen(device, seed):
    import torch

    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- 1. roofline


def roofline(suite: Suite) -> None:
    import torch

    dev, s = suite.device, suite.sizes
    src = torch.empty(s.copy_bytes, dtype=torch.uint8, device=dev).fill_(7)
    dst = torch.empty_like(src)
    ms = bench_ms(suite, lambda: dst.copy_(src))
    gbps = 2 * s.copy_bytes / ms / 1e6  # read + write
    suite.roof["bandwidth_gbps"] = gbps
    suite.add("roofline", f"device-to-device copy, {s.copy_bytes / 2**30:.2f} GiB", "ok", ms=ms, gbps=gbps)
    src = dst = None  # free the copy buffers before the product
    n = s.mm_n
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, generator=_gen(dev, 1), device=dev).to(dtype)
    b = torch.randn(n, n, generator=_gen(dev, 2), device=dev).to(dtype)
    ms = bench_ms(suite, lambda: torch.mm(a, b))
    tflops = 2 * n**3 / ms / 1e9
    suite.roof["mm_tflops"] = tflops
    suite.add("roofline", f"{n}^3 {str(dtype).removeprefix('torch.')} torch.mm on random data", "ok", ms=ms, tflops=tflops)


# ----------------------------------------------------------------------------- 2. correctness




def _seq_inputs(dev, n, t, v, dtype, seed):
    import torch

    g = _gen(dev, seed)
    logits = (torch.randn(n, t, v, generator=g, device=dev) * 3).to(dtype)
    targets = torch.randint(0, v, (n, t), generator=g, device=dev)
    mask = torch.rand(n, t, generator=g, device=dev) > 0.3
    mask[-1, :] = False  # a sequence with no scored position
    if t > 2:
        mask[0, :2] = True
        # a -inf vocabulary block in a scored row (its target outside the block)
        lo, hi = v // 4, v // 4 + max(1, v // 8)
        logits[0, 1, lo:hi] = float("-inf")
        targets[0, 1] = hi % v
    targets[~mask] = -100  # never read at masked positions
    return logits, targets, mask


def _float64_scores(logits, targets, mask):
    import torch

    lp = logits.double().log_softmax(-1).gather(-1, torch.where(mask, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, lp, 0.0).sum(-1)


def check_sequence_logprobs(suite: Suite) -> None:
    import torch

    from fastdpo import sequence_logprobs

    dev = suite.device
    for n, t, v in suite.sizes.seq_cases:
        for name in ALL:
            dtype = getattr(torch, name)
            logits, targets, mask = _seq_inputs(dev, n, t, v, dtype, seed=n * t + v)
            upstream = torch.randn(n, generator=_gen(dev, 3), device=dev)
            x64 = logits.double().requires_grad_()
            truth = _float64_scores(x64, targets, mask)
            truth.backward(upstream.double())
            for inplace in (False, True):
                z = logits.clone().requires_grad_() if not inplace else logits.clone()
                poison(dev, 3 * logits.numel() * logits.element_size())
                if inplace:  # the DPO module's case: logits it made, overwritten by the gradient
                    leaf = torch.zeros((), device=dev, requires_grad=True)
                    z = z + leaf * 0  # an AddBackward node: the op may overwrite it
                    scores = sequence_logprobs(z, targets, mask, impl="triton", inplace_backward=True)
                    scores.backward(upstream)
                    grad = z  # overwritten in place
                else:
                    scores = sequence_logprobs(z, targets, mask, impl="triton")
                    scores.backward(upstream)
                    grad = z.grad
                err_s = rel(scores, truth)
                err_g = rel(grad, x64.grad)
                zero_rows = bool((grad[~mask] == 0).all())
                ok = err_s <= SCORE_BOUND and err_g <= GRAD_BOUND[name] and zero_rows
                suite.add("correctness", f"sequence_logprobs N={n} T={t} V={v} {name}{' in-place' if inplace else ''}",
                          "pass" if ok else "fail", err=max(err_s, err_g), bound=GRAD_BOUND[name],
                          detail=f"scores {err_s:.1e}, grad {err_g:.1e}, masked rows zero: {zero_rows}")
            # bitwise determinism over two runs
            a = sequence_logprobs(logits, targets, mask, impl="triton")
            b = sequence_logprobs(logits, targets, mask, impl="triton")
            if name == "bfloat16":
                suite.add("correctness", f"sequence_logprobs N={n} T={t} V={v} deterministic",
                          "pass" if torch.equal(a, b) else "fail")
            del logits, x64, truth
            _free(dev)


def _lin_inputs(dev, n, t, d, v, dtype, seed):
    import torch

    g = _gen(dev, seed)
    hidden = torch.randn(n, t, d, generator=g, device=dev).to(dtype)
    weight = (torch.randn(v, d, generator=g, device=dev) * (3 / d**0.5)).to(dtype)
    targets = torch.randint(0, v, (n, t), generator=g, device=dev)
    mask = torch.rand(n, t, generator=g, device=dev) > 0.3
    mask[-1, :] = False
    targets[~mask] = -100
    return hidden, weight, targets, mask


LINEAR_ROUTES = (("torch", "torch"), ("triton", "torch"), ("triton", "triton"))
# A head with a bias and a softcap (Phi's bias, Gemma 2's cap, both at once): the routes that
# multiply with torch (the Triton GEMM kernels take neither), the cap's kernel variants compiled
# for the first time here.  A cap of 5 on these logits (~3 standard deviations wide) bends far
# into the tanh, where Gemma 2's default 30 would barely touch them.
CAP = 5.0


def check_linear(suite: Suite) -> None:
    import torch

    dev = suite.device
    for n, t, d, v, dtypes in suite.sizes.lin_cases:
        for name in dtypes:
            dtype = getattr(torch, name)
            hidden, weight, targets, mask = _lin_inputs(dev, n, t, d, v, dtype, seed=d + v)
            bias = torch.randn(v, generator=_gen(dev, 5), device=dev).to(dtype)
            upstream = torch.randn(n, generator=_gen(dev, 4), device=dev)
            cases = [(impl, matmul, None, None) for impl, matmul in LINEAR_ROUTES]
            cases += [(impl, matmul, bias, CAP) for impl, matmul in LINEAR_ROUTES[:2]]
            for impl, matmul, b, cap in cases:
                if suite.dry_run and matmul == "triton" and name == "bfloat16":
                    continue  # triton's interpreter multiplies bf16 wrongly (a known interpreter bug)
                _check_linear_case(suite, hidden, weight, b, cap, targets, mask, upstream, impl, matmul, name)


def _check_linear_case(suite, hidden, weight, bias, cap, targets, mask, upstream, impl, matmul, name) -> None:
    import torch
    import torch.nn.functional as F

    from fastdpo import linear_sequence_logprobs

    dev = suite.device
    n, t, d = hidden.shape
    v = weight.shape[0]
    # The truth: float64 from the product as each route rounds it -- in the inputs' dtype for
    # the torch-product routes (the model's own head, its bias added by the product), exact
    # (fp32 accumulation, never rounded) for the Triton GEMM kernels; then the cap in float64.
    if matmul == "torch":
        z = F.linear(hidden, weight, bias).double()
    else:
        z = hidden.double() @ weight.double().T
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    b64 = bias.double().requires_grad_() if bias is not None else None
    z64 = F.linear(h64, w64, b64)
    z64 = z64 + (z - z64).detach()  # the value of z, the gradient of the exact product
    if cap is not None:
        z64 = torch.tanh(z64 / cap) * cap
    truth = _float64_scores(z64, targets, mask)
    truth.backward(upstream.double())
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if bias is not None else None
    poison(dev, 2 * (h.numel() + w.numel()) * h.element_size())
    scores = linear_sequence_logprobs(h, w, targets, mask, impl=impl, matmul=matmul, bias=b, softcap=cap)
    scores.backward(upstream)
    errs = [rel(scores, truth), rel(h.grad, h64.grad), rel(w.grad, w64.grad)]
    if b is not None:
        errs.append(rel(b.grad, b64.grad))
    zero_rows = bool((h.grad[~mask] == 0).all())
    bound = GRAD_BOUND[name]
    ok = errs[0] <= SCORE_BOUND and max(errs[1:]) <= bound and zero_rows
    extra = f" bias softcap={cap:g}" if bias is not None else ""
    detail = f"scores {errs[0]:.1e}, d hidden {errs[1]:.1e}, d weight {errs[2]:.1e}"
    detail += f", d bias {errs[3]:.1e}" if b is not None else ""
    suite.add("correctness", f"linear {impl}/{matmul}{extra} N={n} T={t} D={d} V={v} {name}",
              "pass" if ok else "fail", err=max(errs), bound=bound, detail=detail)
    del z, z64, h64, w64, truth
    _free(dev)


def _dpo_models(suite: Suite):
    import torch
    from x_transformers import Decoder, TransformerWrapper

    cfg = dict(suite.sizes.dpo_model)
    dims = {k: cfg.pop(k) for k in ("dim", "depth", "heads")}
    torch.manual_seed(0)
    with torch.device(suite.device):
        return TransformerWrapper(**cfg, attn_layers=Decoder(**dims))


DPO_ROUTES = (
    ("default (auto)", dict()),
    ("fused, impl=triton, matmul=triton", dict(impl="triton", matmul="triton")),
    ("fused, impl=torch", dict(impl="torch")),
    ("logits, impl=triton", dict(head="logits", impl="triton")),
    ("logits, impl=torch", dict(head="logits", impl="torch")),
)


def check_dpo(suite: Suite) -> None:
    import copy

    import torch
    from x_transformers.dpo import DPO as XDPO

    from fastdpo import DPO

    dev = suite.device
    b, l = suite.sizes.dpo_batch
    v = suite.sizes.dpo_model["num_tokens"]
    g = _gen(dev, 5)
    pref = torch.randint(1, v, (b, l), generator=g, device=dev)
    unpref = torch.randint(1, v, (b, l), generator=g, device=dev)
    prompt_mask = torch.arange(l, device=dev)[None] < torch.randint(1, l // 2, (b, 1), generator=g, device=dev)
    unpref[prompt_mask] = pref[prompt_mask]
    pref[0, -3:] = 0  # padding (pad_id=0)
    unpref[-1, -5:] = 0

    x = XDPO(_dpo_models(suite), beta=0.1, pad_id=0)
    with torch.no_grad():
        for p in x.policy_model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, device=dev))

    def run(dpo):
        dpo.policy_model.zero_grad(set_to_none=True)
        loss = dpo(pref, unpref, prompt_mask=prompt_mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in dpo.policy_model.named_parameters() if p.grad is not None}

    def body_pass(dpo):
        seq = torch.cat((pref, unpref))[:, :-1]
        with torch.no_grad():
            dpo.ref_model(seq, return_embeddings=True)
        dpo.policy_model(seq, return_embeddings=True).sum().backward()
        dpo.policy_model.zero_grad(set_to_none=True)

    lx, gx = run(x)
    truth = copy.deepcopy(x).double()
    lt, gt = run(truth)
    del truth
    for label, kwargs in DPO_ROUTES:
        ours = DPO(_dpo_models(suite), beta=0.1, pad_id=0, **kwargs)
        ours.policy_model.load_state_dict(x.policy_model.state_dict())
        ours.ref_model.load_state_dict(x.ref_model.state_dict())
        route = ours.route(ours.policy_model, dev)
        poison(dev, 1 << 30)
        lo, go = run(ours)
        poison(dev, 1 << 30)
        lo2, go2 = run(ours)
        err_loss = abs(lo.item() - lx.item()) / abs(lx.item())
        err_grad = max(rel(go[k], gx[k]) for k in gx)
        # three-way: no further from float64 than x-transformers, plus float32 slack
        closer = abs(lo.item() - lt.item()) <= abs(lx.item() - lt.item()) + 1e-6 * abs(lt.item()) and all(
            rel(go[k], gt[k]) <= rel(gx[k], gt[k]) + 1e-5 for k in gt)
        same_keys = go.keys() == gx.keys()
        ok = err_loss <= DPO_LOSS_BOUND and err_grad <= DPO_GRAD_BOUND and closer and same_keys
        suite.add("correctness", f"DPO vs x-transformers: {label}", "pass" if ok else "fail",
                  err=max(err_loss, err_grad), bound=DPO_GRAD_BOUND,
                  detail=f"route {route.kind}/{route.impl}/{route.matmul}: loss {err_loss:.1e}, grads {err_grad:.1e}, "
                         f"three-way {'ok' if closer else 'FAILED'}")
        same = torch.equal(lo, lo2) and all(torch.equal(go[k], go2[k]) for k in go)
        suite.add("correctness", f"DPO deterministic: {label}", "pass" if same else "fail")
        if label.startswith("default") and dev.type == "cuda":
            step_syncs, body_syncs = count_syncs(lambda: run(ours)), count_syncs(lambda: body_pass(ours))
            extra = step_syncs - body_syncs
            suite.add("correctness", "DPO default route: host syncs per step beyond the bodies'",
                      "pass" if extra <= 1 else "fail", err=float(extra), bound=1.0,
                      detail=f"step {step_syncs}, model bodies alone {body_syncs} (torch.cuda sync debug mode)")
        ours = None
        _free(dev)


def count_syncs(fn) -> int:
    """Host-device synchronizations ``fn()`` makes, as torch's sync debug mode reports them."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def check_peers(suite: Suite) -> None:
    import torch

    from fastdpo.bench import peers as gpu_peers

    dev = suite.device
    n, t, d, v = 4, 16, 64, 1031
    hidden, weight, targets, mask = _lin_inputs(dev, n, t, d, v, torch.float32, seed=11)
    h64, w64 = hidden.double(), weight.double()
    truth = _float64_scores(h64 @ w64.T, targets, mask)
    for name in ("trl", "cut-cross-entropy"):
        fn = gpu_peers.PEERS[name][0]
        try:
            got = fn(hidden, weight, targets, mask)
            err = rel(got, truth)
            suite.add("correctness", f"peer {name}: summed log-probs vs float64", "pass" if err <= 1e-4 else "fail",
                      err=err, bound=1e-4)
        except Exception as e:  # noqa: BLE001
            suite.add("correctness", f"peer {name}: summed log-probs vs float64", "unavailable", detail=_one_line(e))
    b = n // 2
    name = "peer liger: DPO loss (no reference) vs float64"
    try:
        got = gpu_peers.liger_dpo_loss(hidden, weight, targets, mask, None, None, 0.1, compiled=not suite.dry_run)
        expected = -torch.nn.functional.logsigmoid(0.1 * (truth[:b] - truth[b:])).mean()
        err = abs(got.item() - expected.item()) / abs(expected.item())
        suite.add("correctness", name, "pass" if err <= 1e-4 else "fail", err=err, bound=1e-4)
    except Exception as e:  # noqa: BLE001
        suite.add("correctness", name, "unavailable", detail=_one_line(e))


def correctness(suite: Suite) -> None:
    for fn in (check_sequence_logprobs, check_linear, check_dpo, check_peers):
        try:
            fn(suite)
        except Exception as e:  # noqa: BLE001 -- a crash is a failed check, not the end of the suite
            suite.add("correctness", fn.__name__, "fail", detail=_one_line(e), note=traceback.format_exc(limit=6))
        _free(suite.device)


# ----------------------------------------------------------------------------- 3. kernels


def kernels(suite: Suite) -> None:
    """sequence_logprobs forward+backward on big bf16 logits: bytes moved over time."""
    import einx
    import torch
    from x_transformers.dpo import masked_mean

    from fastdpo import sequence_logprobs

    dev = suite.device
    n, t, v = suite.sizes.kernel_shape
    dtype = torch.bfloat16
    g = _gen(dev, 21)
    logits = torch.randn(n, t, v, generator=g, device=dev, dtype=torch.float32).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n, t), generator=g, device=dev)
    mask = torch.ones(n, t, dtype=torch.bool, device=dev)  # every row: the bandwidth case
    upstream = torch.randn(n, device=dev)
    nbytes = logits.numel() * logits.element_size()
    minimum = 3 * nbytes  # read forward, read backward, write the gradient

    def fastdpo_step():
        sequence_logprobs(logits, targets, mask, impl="triton").backward(upstream)
        logits.grad = None

    def fastdpo_fwd():
        with torch.no_grad():
            sequence_logprobs(logits, targets, mask, impl="triton")

    def torch_step():
        lp = torch.log_softmax(logits, -1, dtype=torch.float32).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (lp * mask).sum(-1).backward(upstream)
        logits.grad = None

    def xt_step():
        lp = einx.get_at("b n [l], b n -> b n", logits.log_softmax(dim=-1), targets)
        masked_mean(lp, mask).backward(upstream)
        logits.grad = None

    results = {}
    for name, fn, moved in (
        ("fastdpo sequence_logprobs (Triton), forward", fastdpo_fwd, nbytes),
        ("fastdpo sequence_logprobs (Triton), forward+backward", fastdpo_step, minimum),
        ("torch log_softmax(float32) + gather, forward+backward", torch_step, minimum),
        ("x-transformers log_softmax + einx.get_at + masked_mean, forward+backward", xt_step, minimum),
    ):
        try:
            ms = bench_ms(suite, fn)
            peak = peak_mib(suite, fn)
            gbps = moved / ms / 1e6
            results[name] = ms
            bw = suite.roof.get("bandwidth_gbps")
            suite.add("kernels", name, "ok", ms=ms, gbps=gbps, pct_bw=100 * gbps / bw if bw else None, peak_mib=peak,
                      detail=f"N={n} T={t} V={v} bf16, {moved / 1e9:.1f} GB counted")
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: a row that says so
            suite.add("kernels", name, "failed", detail=_one_line(e))
        _free(dev)
    ours = results.get("fastdpo sequence_logprobs (Triton), forward+backward")
    for r in suite.rows:
        if r["section"] == "kernels" and r["ms"] and ours and "forward+backward" in r["name"]:
            r["vs_fastdpo"] = r["ms"] / ours


# ----------------------------------------------------------------------------- 4. fused head


def head(suite: Suite) -> None:
    """The fused head at a Llama-3-8B shape, forward+backward, every provider on one input."""
    import torch

    from fastdpo.bench import peers as gpu_peers
    from fastdpo import check_loss_config, linear_sequence_logprobs
    from fastdpo.scoring import cost_model
    from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head

    dev = suite.device
    n, t, d, v = suite.sizes.head_shape
    dtype = torch.bfloat16 if not (suite.dry_run) else torch.float32
    g = _gen(dev, 31)
    hidden = (torch.randn(n, t, d, generator=g, device=dev)).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, device=dev) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n, t), generator=g, device=dev)
    mask = torch.ones(n, t, dtype=torch.bool, device=dev)
    count = mask.sum(-1).float()
    ref_scores = torch.randn(n, generator=g, device=dev) - 10 * t
    rows = n * t
    flops3 = 3 * 2 * rows * d * v  # forward product, two gradient products
    opts = HeadOptions(impl="triton", scale=None, ref_scale=None, reduction="sum", loss=check_loss_config("sigmoid", 0.1))

    def clear():
        hidden.grad = weight.grad = None

    def fastdpo_pair():
        loss, _, _, _ = dpo_head(hidden, weight, targets, mask, count, opts, ref_scores=ref_scores)
        loss.backward()
        clear()

    def linear(matmul):
        def step():
            linear_sequence_logprobs(hidden, weight, targets, mask, impl="triton", matmul=matmul).sum().backward()
            clear()
        return step

    def peer(name):
        fn = gpu_peers.PEERS[name][0]

        def step():
            fn(hidden, weight, targets, mask).sum().backward()
            clear()
        return step

    def liger():
        gpu_peers.liger_dpo_loss(hidden, weight, targets, mask, None, None, 0.1, compiled=not suite.dry_run).backward()
        clear()

    def naive():
        z = torch.mm(hidden.view(rows, d), weight.T)
        lp = torch.log_softmax(z, -1, dtype=torch.float32).gather(-1, targets.view(rows, 1))
        lp.sum().backward()
        clear()

    # In order of importance (the budget may cut the tail): Liger compiles its chunk function
    # with torch.compile first, tens of seconds on a fresh machine.
    providers = (
        ("fastdpo DPO head (default: torch products + Triton fold, pair fusion, 3 products)", fastdpo_pair),
        ("fastdpo linear_sequence_logprobs, matmul=torch (4 products)", linear("torch")),
        ("fastdpo linear_sequence_logprobs, matmul=triton (Triton GEMMs)", linear("triton")),
        ("TRL 1.16 ChunkedLogProbFunction", peer("trl")),
        ("cut-cross-entropy linear_cross_entropy", peer("cut-cross-entropy")),
        ("naive: mm + log_softmax(float32) + gather", naive),
        ("Liger LigerFusedLinearDPOLoss (no reference)", liger),
    )
    times = {}
    mm = suite.roof.get("mm_tflops")
    for name, fn in providers:
        if suite.left() < 20:
            suite.add("head", name, "skipped", detail="time budget")
            continue
        try:
            ms = bench_ms(suite, fn)
            peak = peak_mib(suite, fn)
            tflops = flops3 / ms / 1e9
            times[name] = ms
            suite.add("head", name, "ok", ms=ms, tflops=tflops, pct_mm=100 * tflops / mm if mm else None, peak_mib=peak,
                      detail=f"{rows} counted rows, D={d}, V={v}, {str(dtype).removeprefix('torch.')}")
        except Exception as e:  # noqa: BLE001
            suite.add("head", name, "failed", detail=_one_line(e))
        _free(dev)
    ours = times.get(providers[0][0])
    for r in suite.rows:
        if r["section"] == "head" and r["ms"] and ours:
            r["vs_fastdpo"] = r["ms"] / ours
    a, b = times.get(providers[0][0]), times.get(providers[2][0])  # what DPO would run on each route
    rule = cost_model.choose_matmul(d, v, dtype)
    if a and b:
        faster = "torch" if a <= b else "triton"
        predicted = {m: cost_model.predict(m, rows, rows, d, v, dtype)["policy"] * 1e3 for m in ("torch", "triton")}
        suite.add("head", "route rule: matmul='auto'", "pass" if faster == rule else "fail",
                  detail=f"rule picks {rule!r}; measured: torch products {a:.1f} ms, Triton GEMMs {b:.1f} ms "
                         f"(predicted {predicted['torch']:.1f} / {predicted['triton']:.1f} ms): the timings favor {faster!r}")


# ----------------------------------------------------------------------------- 5. DPO step


def step(suite: Suite) -> None:
    """One DPO training step of a ~1B-parameter bf16 TransformerWrapper."""
    import copy

    import torch
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.dpo import DPO as XDPO

    from fastdpo.bench import peers as gpu_peers
    from fastdpo import DPO

    dev = suite.device
    b, l = suite.sizes.step_batch
    cfg = dict(suite.sizes.step_model)
    dims = {k: cfg.pop(k) for k in ("dim", "depth", "heads")}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(dev):
        model = TransformerWrapper(**cfg, attn_layers=Decoder(**dims, attn_flash=True)).to(dtype)
    params = sum(p.numel() for p in model.parameters())
    v = cfg["num_tokens"]
    g = _gen(dev, 41)
    pref = torch.randint(1, v, (b, l), generator=g, device=dev)
    unpref = torch.randint(1, v, (b, l), generator=g, device=dev)
    # A ragged batch, as preference data comes (fastdpo.bench.inputs.ragged_lengths: long-tailed
    # prompts and completions, right padding), so packing='batch' has padding and repeated
    # prompts to skip.
    from fastdpo.bench.inputs import ragged_lengths

    lens = ragged_lengths(b, l, torch.Generator().manual_seed(42))
    ar = torch.arange(l, device=dev)[None]
    prompt_mask = ar < torch.tensor(lens[0], device=dev)[:, None]
    pref_mask = ar < torch.tensor([p + c for p, c in zip(lens[0], lens[1])], device=dev)[:, None]
    unpref_mask = ar < torch.tensor([p + r for p, r in zip(lens[0], lens[2])], device=dev)[:, None]
    unpref[prompt_mask] = pref[prompt_mask]
    pref, unpref = pref.masked_fill(~pref_mask, 0), unpref.masked_fill(~unpref_mask, 0)
    masks = dict(prompt_mask=prompt_mask, preferred_seq_mask=pref_mask, unpreferred_seq_mask=unpref_mask)
    tokens = f"{int(pref_mask.sum() + unpref_mask.sum() - prompt_mask.sum())} of {2 * b * l} padded tokens real"

    def dpo_step(dpo):
        def run():
            dpo(pref, unpref, **masks).backward()
            for p in dpo.policy_model.parameters():
                p.grad = None
        return run

    def liger_provider():
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        seq = torch.cat((pref, unpref))
        src, tgt = seq[:, :-1], seq[:, 1:]
        keep = (~prompt_mask.repeat(2, 1) & torch.cat((pref_mask, unpref_mask)))[:, :-1]

        def run():
            with torch.no_grad():
                ref_hidden = ref(src, return_embeddings=True)
            hidden = model(src, return_embeddings=True)
            loss = gpu_peers.liger_dpo_loss(hidden, model.to_logits.weight, tgt, keep, ref_hidden,
                                            ref.to_logits.weight, 0.1, average_log_prob=True,
                                            compiled=not suite.dry_run)
            loss.backward()
            for p in model.parameters():
                p.grad = None
        return run, ref

    providers = (  # in order of importance, as in head()
        ("fastdpo DPO (default route)", lambda: (dpo_step(DPO(model, beta=0.1)), None)),
        ("x-transformers DPO", lambda: (dpo_step(XDPO(model, beta=0.1)), None)),
        ("Liger LigerFusedLinearDPOLoss on the body's hidden states", liger_provider),
        # packed (fastdpo.batching.packing): whole pairs first-fit into rows, each prompt once, no
        # padding, attention by parts through FlexAttention block masks (fastdpo.batching.attention)
        ("fastdpo DPO, packing='batch'", lambda: (dpo_step(DPO(model, beta=0.1, packing="batch")), None)),
        ("fastdpo DPO, packing='pair'", lambda: (dpo_step(DPO(model, beta=0.1, packing="pair")), None)),
        ("fastdpo DPO, matmul=triton (Triton GEMMs)",
         lambda: (dpo_step(DPO(model, beta=0.1, impl="triton", matmul="triton")), None)),
    )
    times = {}
    for name, make in providers:
        if suite.left() < 25:
            suite.add("step", name, "skipped", detail="time budget")
            continue
        fn = keep = None
        try:
            fn, keep = make()
            fn()  # warm-up: compilation, cuBLAS handles, the allocator
            _sync(dev)
            samples = []
            for _ in range(suite.sizes.step_repeats):
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                samples.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(samples)
            peak = peak_mib(suite, fn)
            times[name] = ms
            suite.add("step", name, "ok", ms=ms, peak_mib=peak,
                      detail=f"{params / 1e9:.2f}B params, B={b} pairs, L={l} ({tokens}), V={v}, "
                             f"{str(dtype).removeprefix('torch.')}")
        except torch.OutOfMemoryError as e:
            suite.add("step", name, "failed", detail=f"out of memory: {_one_line(e)[:120]}")
        except Exception as e:  # noqa: BLE001
            suite.add("step", name, "failed", detail=_one_line(e))
        del fn, keep
        _free(dev)
    ours = times.get(providers[0][0])
    for r in suite.rows:
        if r["section"] == "step" and r["ms"] and ours:
            r["vs_fastdpo"] = r["ms"] / ours


# ----------------------------------------------------------------------------- output


def _fmt(x, spec=".3g"):
    if x is None:
        return ""
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return format(x, spec)
    return str(x)


def markdown(rows: list[dict], env: dict) -> str:
    out = [f"# fastdpo GPU suite: {env.get('device_name')}", ""]
    out.append(" | ".join(f"{k} {v}" for k, v in env.items() if v not in (None, "")))
    out.append("")
    for section, cols in (
        ("roofline", ("name", "ms", "gbps", "tflops")),
        ("correctness", ("name", "status", "err", "bound", "detail")),
        ("kernels", ("name", "status", "ms", "gbps", "pct_bw", "peak_mib", "vs_fastdpo", "detail")),
        ("head", ("name", "status", "ms", "tflops", "pct_mm", "peak_mib", "vs_fastdpo", "detail")),
        ("step", ("name", "status", "ms", "peak_mib", "vs_fastdpo", "detail")),
        ("sequence_parallel", ("name", "status", "err", "bound", "ms", "peak_mib", "vs_fastdpo", "detail")),
    ):
        these = [r for r in rows if r["section"] == section]
        if not these:
            continue
        out += [f"## {section}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in these:
            out.append("| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |")
        out.append("")
    return "\n".join(out)


def short_table(rows: list[dict]) -> str:
    checks = [r for r in rows if r["section"] == "correctness"]
    passed = sum(r["status"] == "pass" for r in checks)
    failed = [r["name"] for r in checks if r["status"] == "fail"]
    lines = [f"correctness: {passed}/{len(checks)} passed" + (f"; FAILED: {', '.join(failed[:6])}" if failed else "")]
    for r in rows:
        if r["section"] in ("roofline", "kernels", "head", "step", "sequence_parallel"):
            parts = [f"{r['section']:9s}", f"{r['name'][:70]:70s}", f"{r['status']:8s}"]
            for key, unit in (("ms", "ms"), ("gbps", "GB/s"), ("pct_bw", "% bw"), ("tflops", "TFLOP/s"),
                              ("pct_mm", "% mm"), ("peak_mib", "MiB"), ("vs_fastdpo", "x fastdpo")):
                if r.get(key) is not None:
                    parts.append(f"{_fmt(r[key], '.4g')} {unit}")
            if r["status"] not in ("ok",) and r.get("detail"):
                parts.append(r["detail"][:90])
            lines.append("  ".join(parts))
    rule = [r for r in rows if r["name"] == "route rule: matmul='auto'"]
    if rule:
        lines.append(f"route rule: {rule[0]['detail']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu.json and gpu.md (created)")
    p.add_argument("--dry-run", action="store_true",
                   help="every step at tiny sizes on CPU tensors, Triton interpreted (TRITON_INTERPRET=1)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds the whole suite may take; sections that would not fit are skipped "
                        "(default 330 on a GPU, 600 in the dry run)")
    p.add_argument("--sections", default="roofline,correctness,kernels,head,step,sequence_parallel",
                   help="comma-separated subset, in this order")
    p.add_argument("--allow-missing-peers", action="store_true",
                   help="run without liger-kernel / trl / cut-cross-entropy (their rows say unavailable)")
    args = p.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    t0 = time.perf_counter()
    missing = check_imports(need_peers=not args.allow_missing_peers)
    if missing:
        print("gpu_suite: cannot import:\n  " + "\n  ".join(missing), file=sys.stderr)
        print("carry them as wheels: bash scripts/gpu_wheels.sh here, then see benchmarks/README.md "
              "('On a lent GPU machine')", file=sys.stderr)
        return 2
    if not args.dry_run and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_suite: TRITON_INTERPRET is set: unset it to time compiled kernels (or pass --dry-run)",
              file=sys.stderr)
        return 2
    import torch

    if args.dry_run:
        device = torch.device("cpu")
        sizes = DRY
        budget = args.budget_s or 600.0
    else:
        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device (use --dry-run to check the suite on the CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        sizes = GPU
        budget = args.budget_s or 330.0
    # float32 products in IEEE float32 (no TF32), as the correctness bounds assume.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    suite = Suite(device=device, sizes=sizes, budget_s=budget, dry_run=args.dry_run)
    suite.start = t0
    from fastdpo.bench.measure import environment  # after check_imports put this tree on sys.path

    env = dict(device=str(device), **environment(device))
    print(f"gpu_suite on {env['device_name']} (torch {env['torch']}, triton {env['triton']}), "
          f"budget {budget:.0f} s, imports took {time.perf_counter() - t0:.1f} s", flush=True)
    from benchmarks.gpu_sequence_parallel import section as sequence_parallel

    sections = {"roofline": (roofline, 5), "correctness": (correctness, 30), "kernels": (kernels, 20),
                "head": (head, 40), "step": (step, 60), "sequence_parallel": (sequence_parallel, 45)}
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in wanted:
        if name not in sections:
            p.error(f"--sections: unknown section {name!r} (known: {', '.join(sections)})")
    for name in wanted:
        fn, needs = sections[name]
        suite.section(name, needs if not args.dry_run else 0, fn)

    env["elapsed_s"] = round(suite.elapsed(), 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(dict(environment=env, dry_run=args.dry_run, columns=COLUMNS,
                                                  rows=suite.rows, roofline=suite.roof), indent=1, default=str))
    (out / "gpu.md").write_text(markdown(suite.rows, env))
    print()
    print(short_table(suite.rows))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} in {suite.elapsed():.0f} s")
    failed = [r for r in suite.rows if r["status"] in ("fail",) or (r["section"] == "correctness" and r["status"] == "failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
