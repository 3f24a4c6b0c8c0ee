"""Benchmark suite: fastdpo against x-transformers, plain torch, TRL-style and Liger DPO losses.

``fastdpo bench`` (see ``fastdpo bench --help`` and ``benchmarks/README.md``) measures every
*provider* on every *workload* it applies to, in two *modes*, at one or more sizes:

workloads
    ``step``  one DPO step on an x-transformers ``TransformerWrapper``: the reference model
              (no_grad) and the policy on the 2B preferred + unpreferred sequences, the loss,
              and in ``forward+backward`` mode the backward pass through the policy.
    ``head``  the loss head alone: given (2B, L-1, V) logits (a leaf tensor), the per-sequence
              masked log-probs and their gradient w.r.t. the logits.
modes
    ``forward`` (the loss, autograd recording) and ``forward+backward`` (plus ``backward``).
providers (the :data:`PROVIDERS` registry)
    ``floor``           the work no implementation avoids.  step: the model bodies
                        (``return_embeddings=True``) plus the four head products
                        (2B(L-1), D) x (D, V) -- reference forward, policy forward, two
                        policy backward -- as plain ``torch.mm``; head: one ``logsumexp`` over
                        the logits, plus writing the softmax-sized gradient once.
    ``body``            step only: the model bodies alone, no head.  Its peak memory is what
                        the ``head MiB`` column subtracts.
    ``x-transformers``  ``x_transformers.dpo.DPO`` (step), its ``log_softmax`` + ``einx``
                        gather + ``masked_mean`` (head).
    ``torch``           plain torch with x-transformers' numbers: one batch of 2B,
                        ``log_softmax`` + ``gather`` + masked sum / count.
    ``trl``             TRL's convention, written here (no trl dependency): one batch of 2B,
                        ``log_softmax`` + ``gather``, the mask aligned with the *target*
                        (``mask[:, 1:]``), the *sum* of token log-probs.
    ``liger``           step only: Liger-Kernel's ``LigerFusedLinearDPOLoss`` on the body's
                        hidden states and the head weight (Liger never builds logits, so it has
                        no head-workload form).  Liger's chunked loss computes the gradient
                        inside its forward, so its ``forward`` mode already pays for it.
    ``fastdpo-torch``   ``fastdpo.DPO`` / ``sequence_logprobs`` with ``impl="torch"``.
    ``fastdpo-triton``  the same with ``impl="triton"``: CUDA only (a row says so elsewhere).

A provider is a builder ``(workload, mode, cfg) -> step`` registered with :func:`register`;
``step()`` runs one iteration and returns the loss (or ``None``).  A builder that cannot run
here raises :class:`Unavailable` (reported as ``unavailable``); any other exception, in the
builder, a step or the memory measurement, is reported as ``failed`` with a one-line reason,
and the suite goes on.

Time: the median over ``--repeats`` calls after ``--warmup`` calls (CUDA events on a GPU,
``time.perf_counter`` on the CPU), every provider of a (size, workload, mode) built up front
and called in turn, so machine noise hits them alike; ratios to ``x-transformers`` and to
``floor`` come from the same run.

Peak memory.  CUDA: ``torch.cuda.max_memory_allocated`` during one call, above what was
allocated before it (after the warm-up), in the timing process.  CPU: one fresh process per
provider, workload, mode and size (forked from a server that has only imported the modules,
to skip a 4 s import per measurement); it builds the step, calls it once (compilation, lazy
caches), returns freed heap to the kernel (``malloc_trim``), resets the peak-RSS watermark
(``/proc/self/clear_refs``), calls it again and reports ``VmHWM`` minus the resident size
before that call.  glibc's default malloc keeps large freed blocks for reuse, so a peak would
carry whatever the previous call freed (on the step workload, the model body's activations);
the worker fixes the mmap threshold (``mallopt(M_MMAP_THRESHOLD)``) so every tensor above it
is returned to the kernel when freed, and the RSS tracks live tensors.  For the step workload
the ``head MiB`` column is a provider's peak minus the ``body`` peak (same mode): the memory
its loss head adds to the model.  For the head workload it is the whole peak.

Output columns (the CSV header and the JSON keys, :data:`COLUMNS`): see
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

# Presets.  ``small`` is what scripts/bench.sh runs: every provider, both workloads, both
# modes, under 3 minutes on 2 CPU cores; V = 8192 keeps the head a large share of the step.
SIZES: dict[str, dict] = {
    "tiny": dict(batch=1, seq_len=32, vocab=512, dim=32, depth=1, heads=2, repeats=1),
    "small": dict(batch=2, seq_len=128, vocab=8192, dim=128, depth=2, heads=4, repeats=5),
    "medium": dict(batch=4, seq_len=512, vocab=32000, dim=256, depth=2, heads=4, repeats=5),
    # A GPU size: x-transformers' step holds ~5 (2B(L-1), V) float32 buffers, ~9 GiB here.
    "large": dict(batch=8, seq_len=1024, vocab=32000, dim=512, depth=4, heads=8, repeats=10),
}
SIZE_FIELDS = ("batch", "seq_len", "vocab", "dim", "depth", "heads")
WORKLOADS = ("step", "head")
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEPABLE = ("vocab", "seq_len")
BETA = 0.1

# The ratios' denominators: always measured, whatever --providers says.
REFERENCES = ("floor", "x-transformers")

COLUMNS = (
    "provider", "workload", "mode", "status", "reason",
    "median_ms", "min_ms", "repeats", "vs_xt", "vs_floor",
    "peak_mib", "body_mib", "head_mib", "mem_vs_xt", "head_mem_vs_xt",
    *SIZE_FIELDS, "dtype", "device", "device_name",
    "torch", "triton", "x_transformers", "liger_kernel", "fastdpo", "threads", "date",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One size point: the model, the batch, the dtype and the device."""

    batch: int
    seq_len: int
    vocab: int
    dim: int
    depth: int
    heads: int
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ----------------------------------------------------------------------------- registry


class Unavailable(Exception):
    """A provider cannot run in this setting (device, missing package): a row, not a failure."""


Step = Callable[[], "torch.Tensor | None"]
Builder = Callable[[str, str, Config], Step]


@dataclass(frozen=True)
class Provider:
    name: str
    build: Builder
    workloads: tuple[str, ...]
    help: str


PROVIDERS: dict[str, Provider] = {}


def register(name: str, *, workloads: Iterable[str] = WORKLOADS, help: str = ""):
    """Decorator adding ``builder(workload, mode, cfg) -> step`` to :data:`PROVIDERS`.

    ``step()`` runs one iteration of ``mode`` (``forward`` or ``forward+backward``) and
    returns the loss or ``None``; the builder allocates everything ``step`` needs (model,
    inputs) so that only the iteration is timed, and raises :class:`Unavailable` when the
    provider cannot run with ``cfg`` (e.g. on this device).
    """
    workloads = tuple(workloads)
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"workloads must be among {WORKLOADS}, got {sorted(unknown)}")

    def deco(builder: Builder) -> Builder:
        PROVIDERS[name] = Provider(name, builder, workloads, help)
        return builder

    return deco


# ----------------------------------------------------------------------------- inputs
# make_models, make_batch, head_logits and make_step are what a provider's builder uses, so
# every provider sees the same weights and tokens.


def _model(cfg: Config):
    """The benchmark's TransformerWrapper, the same weights for every provider (seeded)."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(cfg.seed)
    model = TransformerWrapper(
        num_tokens=cfg.vocab,
        max_seq_len=cfg.seq_len,
        attn_layers=Decoder(dim=cfg.dim, depth=cfg.depth, heads=cfg.heads),
    )
    return model.to(device=cfg.device, dtype=cfg.torch_dtype)


def make_models(cfg: Config):
    """(policy, reference): the reference a frozen copy of the policy, nudged as if the policy
    had trained a little, so the loss is not log 2 and providers can be checked against each
    other (tests/test_bench.py)."""
    policy = _model(cfg)
    ref = deepcopy(policy)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    with torch.no_grad():
        for p in ref.parameters():
            p.requires_grad = False
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
    return policy, ref.eval()


def _dpo(cls, cfg: Config, **kwargs):
    """``cls(policy, beta=BETA, **kwargs)`` (x-transformers' or fastdpo's DPO) with the
    reference of :func:`make_models`."""
    policy, ref = make_models(cfg)
    dpo = cls(policy, beta=BETA, **kwargs)
    dpo.ref_model.load_state_dict(ref.state_dict())
    return dpo


@dataclass
class Batch:
    pref: torch.Tensor  # (B, L) token ids
    unpref: torch.Tensor  # (B, L)
    prompt_mask: torch.Tensor  # (B, L) bool, True on the prompt
    src: torch.Tensor  # (2B, L-1) model inputs
    tgt: torch.Tensor  # (2B, L-1) targets
    mask: torch.Tensor  # (2B, L-1) x-transformers' mask: input-aligned, keep[:, :-1]
    mask_target: torch.Tensor  # (2B, L-1) TRL's mask: target-aligned, keep[:, 1:]


def make_batch(cfg: Config) -> Batch:
    """Seeded token ids with a shared prompt of L/8 to L/2 tokens, no padding, and both masks."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    b, l, v = cfg.batch, cfg.seq_len, cfg.vocab
    pref = torch.randint(0, v, (b, l), generator=g)
    unpref = torch.randint(0, v, (b, l), generator=g)
    prompt_lens = torch.randint(max(1, l // 8), max(2, l // 2), (b, 1), generator=g)
    prompt_mask = torch.arange(l)[None] < prompt_lens
    unpref[prompt_mask] = pref[prompt_mask]  # a shared prompt
    seq = torch.cat((pref, unpref))
    keep = ~prompt_mask.repeat(2, 1)
    out = Batch(pref, unpref, prompt_mask, seq[:, :-1], seq[:, 1:], keep[:, :-1], keep[:, 1:])
    for name, x in vars(out).items():
        setattr(out, name, x.to(cfg.device))
    return out


def _pair_loss(scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """Mean DPO loss from (2B,) policy and reference scores, preferred first."""
    b = scores.shape[0] // 2
    logits = (scores[:b] - scores[b:]) - (ref_scores[:b] - ref_scores[b:])
    return -F.logsigmoid(BETA * logits).mean()


def make_step(loss_fn: Callable[[], torch.Tensor], mode: str, params) -> Step:
    """The step callable: ``loss_fn()``, then in forward+backward its backward."""
    params = list(params)
    if mode == "forward":

        def step():
            return loss_fn().detach()

    else:

        def step():
            loss = loss_fn()
            loss.backward()
            for p in params:
                p.grad = None
            return loss.detach()

    return step


def _logprobs_logsoftmax(logits, tgt, mask):
    """Masked sum of token log-probs the plain way: a full (N, T, V) log-softmax, gather."""
    lp = logits.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


# ----------------------------------------------------------------------------- providers


@register("floor", help="model bodies + the four head matmuls (step); one logsumexp + one gradient write (head)")
def _floor(workload: str, mode: str, cfg: Config) -> Step:
    bt = make_batch(cfg)
    dt, dev = cfg.torch_dtype, cfg.device
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    if workload == "head":
        logits = head_logits(cfg)

        def step():
            lse = torch.logsumexp(logits, -1)
            if mode != "forward":
                torch.sub(logits, lse.unsqueeze(-1)).exp_()  # the gradient, written once
            return None

        return step

    model, ref = make_models(cfg)
    m = bt.src.numel()
    hidden = torch.randn(m, cfg.dim, generator=g, device=dev, dtype=dt)
    weight = torch.randn(cfg.vocab, cfg.dim, generator=g, device=dev, dtype=dt)
    grad_logits = torch.randn(m, cfg.vocab, generator=g, device=dev, dtype=dt)

    def step():
        with torch.no_grad():
            ref(bt.src, return_embeddings=True)
            torch.mm(hidden, weight.T)  # reference head
        emb = model(bt.src, return_embeddings=True)
        torch.mm(hidden, weight.T)  # policy head, forward
        if mode != "forward":
            torch.mm(grad_logits, weight)  # d hidden
            torch.mm(hidden.T, grad_logits)  # d weight (transposed: no copy of grad_logits)
            emb.backward(torch.ones_like(emb))
            model.zero_grad(set_to_none=True)
        return None

    return step


@register("body", workloads=("step",), help="the model bodies alone, no head (the head-memory baseline)")
def _body(workload: str, mode: str, cfg: Config) -> Step:
    bt = make_batch(cfg)
    model, ref = make_models(cfg)

    def step():
        with torch.no_grad():
            ref(bt.src, return_embeddings=True)
        emb = model(bt.src, return_embeddings=True)
        if mode != "forward":
            emb.backward(torch.ones_like(emb))
            model.zero_grad(set_to_none=True)
        return None

    return step


@register("x-transformers", help="x_transformers.dpo.DPO (step); its log_softmax + gather + masked_mean (head)")
def _xtransformers(workload: str, mode: str, cfg: Config) -> Step:
    bt = make_batch(cfg)
    if workload == "step":
        from x_transformers.dpo import DPO

        dpo = _dpo(DPO, cfg)
        return make_step(lambda: dpo(bt.pref, bt.unpref, prompt_mask=bt.prompt_mask), mode, dpo.parameters())

    import einx
    from x_transformers.dpo import masked_mean

    logits = head_logits(cfg)

    def loss():
        lp = einx.get_at("b n [l], b n -> b n", logits.log_softmax(dim=-1), bt.tgt)
        return masked_mean(lp, bt.mask).sum()

    return make_step(loss, mode, [logits])


def _scores_provider(workload: str, mode: str, cfg: Config, scores, mask_name: str, mean: bool) -> Step:
    """A provider from ``scores(logits, tgt, mask) -> (N,) masked sums`` on one 2B batch."""
    bt = make_batch(cfg)
    mask = getattr(bt, mask_name)
    count = mask.sum(-1).clamp(min=1e-5) if mean else None

    def reduce(s):
        return s / count if mean else s

    if workload == "head":
        logits = head_logits(cfg)
        return make_step(lambda: reduce(scores(logits, bt.tgt, mask)).sum(), mode, [logits])

    model, ref = make_models(cfg)

    def loss():
        with torch.no_grad():
            ref_scores = reduce(scores(ref(bt.src), bt.tgt, mask))
        return _pair_loss(reduce(scores(model(bt.src), bt.tgt, mask)), ref_scores)

    return make_step(loss, mode, model.parameters())


@register("torch", help="plain torch, x-transformers' numbers: one 2B batch, log_softmax + gather + masked sum / count")
def _plain_torch(workload: str, mode: str, cfg: Config) -> Step:
    return _scores_provider(workload, mode, cfg, _logprobs_logsoftmax, "mask", mean=True)


@register("trl", help="TRL's convention: one 2B batch, log_softmax + gather, target-aligned mask, sum")
def _trl(workload: str, mode: str, cfg: Config) -> Step:
    return _scores_provider(workload, mode, cfg, _logprobs_logsoftmax, "mask_target", mean=False)


# Liger's default, torch.compile of its per-chunk step (C++ through Inductor on the CPU: 10-20 s
# of compilation in the warm-up calls, not timed).
LIGER_COMPILED = True


@register("liger", workloads=("step",), help="Liger-Kernel LigerFusedLinearDPOLoss on the body's hidden states + head weight (torch.compile'd chunks)")
def _liger(workload: str, mode: str, cfg: Config, compiled: bool = True) -> Step:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel not importable ({e})") from None
    bt = make_batch(cfg)
    model, ref = make_models(cfg)
    # Liger's masking is ignore_index on the targets; x-transformers' input-aligned mask and
    # masked mean (average_log_prob) make its loss equal x-transformers'.
    target = bt.tgt.masked_fill(~bt.mask, -100)
    loss_fn = LigerFusedLinearDPOLoss(
        beta=BETA, average_log_prob=True, ignore_index=-100, compiled=LIGER_COMPILED and compiled
    )

    def loss():
        with torch.no_grad():
            ref_hidden = ref(bt.src, return_embeddings=True)
        hidden = model(bt.src, return_embeddings=True)
        out = loss_fn(model.to_logits.weight, hidden, target, ref_input=ref_hidden, ref_weight=ref.to_logits.weight)
        return out[0] if isinstance(out, tuple) else out

    return make_step(loss, mode, model.parameters())


@register("liger-eager", workloads=("step",), help="as liger, with its chunks run eagerly (compiled=False)")
def _liger_eager(workload: str, mode: str, cfg: Config) -> Step:
    return _liger(workload, mode, cfg, compiled=False)


def _fastdpo(impl: str) -> Builder:
    def build(workload: str, mode: str, cfg: Config) -> Step:
        if impl == "triton" and not cfg.device.startswith("cuda"):
            raise Unavailable(f"unavailable on {cfg.device}: the Triton kernels need CUDA")
        from fastdpo import DPO, sequence_logprobs

        if workload == "step":
            bt = make_batch(cfg)
            dpo = _dpo(DPO, cfg, impl=impl)
            return make_step(lambda: dpo(bt.pref, bt.unpref, prompt_mask=bt.prompt_mask), mode, dpo.parameters())
        return _scores_provider(
            workload, mode, cfg, lambda lg, t, m: sequence_logprobs(lg, t, m, impl=impl), "mask", mean=True
        )

    return build


for _impl in ("torch", "triton"):
    register(f"fastdpo-{_impl}", help=f"fastdpo.DPO (default head='auto': fused for this model) / sequence_logprobs, impl={_impl!r}")(_fastdpo(_impl))


@register("fastdpo-logits", workloads=("step",), help="fastdpo.DPO(head='logits', impl='torch'): the model's logits, scored without a log-softmax")
def _fastdpo_logits(workload: str, mode: str, cfg: Config) -> Step:
    from fastdpo import DPO

    bt = make_batch(cfg)
    dpo = _dpo(DPO, cfg, impl="torch", head="logits")
    return make_step(lambda: dpo(bt.pref, bt.unpref, prompt_mask=bt.prompt_mask), mode, dpo.parameters())


@register("fastdpo-precomputed", workloads=("step",), help="fastdpo.DPO (impl='torch') with precomputed reference scores: no reference model run")
def _fastdpo_precomputed(workload: str, mode: str, cfg: Config) -> Step:
    from fastdpo import DPO

    bt = make_batch(cfg)
    dpo = _dpo(DPO, cfg, impl="torch")
    ref_w, ref_l = dpo.reference_scores(bt.pref, bt.unpref, prompt_mask=bt.prompt_mask)
    dpo.ref_model = None  # a run with precomputed scores can drop it

    def loss():
        return dpo(bt.pref, bt.unpref, prompt_mask=bt.prompt_mask,
                   ref_preferred_logprob=ref_w, ref_unpreferred_logprob=ref_l)

    return make_step(loss, mode, dpo.parameters())


@register("torch-lce", workloads=("step",), help="torch's chunked F.linear_cross_entropy (reduction='none') on the body's hidden states")
def _torch_lce(workload: str, mode: str, cfg: Config) -> Step:
    lce = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if lce is None or options is None:
        raise Unavailable(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
    bt = make_batch(cfg)
    model, ref = make_models(cfg)
    target = bt.tgt.masked_fill(~bt.mask, -100).reshape(-1)
    count = bt.mask.sum(-1).clamp(min=1e-5)
    opts = options()

    def scores(m):
        hidden = m(bt.src, return_embeddings=True)
        nll = lce(hidden.reshape(-1, cfg.dim), m.to_logits.weight, target,
                  reduction="none", ignore_index=-100, options=opts)
        return -nll.view(bt.tgt.shape).sum(-1) / count

    def loss():
        with torch.no_grad():
            ref_scores = scores(ref)
        return _pair_loss(scores(model), ref_scores)

    return make_step(loss, mode, model.parameters())


def head_logits(cfg: Config) -> torch.Tensor:
    """The head workload's input: (2B, L-1, V) logits, a leaf that wants a gradient."""
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 3)
    shape = (2 * cfg.batch, cfg.seq_len - 1, cfg.vocab)
    logits = torch.randn(shape, generator=g, device=cfg.device, dtype=torch.float32)
    return logits.to(cfg.torch_dtype).requires_grad_()


def load_provider_modules(modules: Iterable[str]) -> None:
    """Import modules that call :func:`register` (``--provider-module``): dotted names or
    ``.py`` paths.  The CPU memory workers import them too, so their providers are measured
    like the built-in ones."""
    import importlib
    import importlib.util

    for name in modules:
        if not name.endswith(".py"):
            importlib.import_module(name)
            continue
        path = os.path.abspath(name)
        mod_name = f"_fastdpo_bench_providers_{abs(hash(path))}"
        if mod_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]
            raise


def applicable(workload: str, names: Iterable[str]) -> list[str]:
    """The providers among ``names`` that have a form for ``workload``, in registry order."""
    names = set(names)
    return [n for n, p in PROVIDERS.items() if n in names and workload in p.workloads]


# ----------------------------------------------------------------------------- measuring


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


def time_interleaved(
    steps: dict[str, Step], device: str, repeats: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per call of each step, the steps taking turns so drift hits them alike.

    Returns (times, errors): a step that raises is dropped from the rotation and its one-line
    reason recorded in ``errors``.
    """
    live = dict(steps)
    errors: dict[str, str] = {}

    def call(name, fn, timed):
        try:
            t = _timed_call(fn, device) if timed else (fn(), _sync(device))
        except Exception as e:  # noqa: BLE001 -- a failing provider is a result
            errors[name] = _one_line(e)
            del live[name]
            return None
        return t

    for name, fn in list(live.items()):
        for _ in range(warmup):
            if name in live:
                call(name, fn, timed=False)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, fn in list(live.items()):
            t = call(name, fn, timed=True)
            if t is not None:
                times[name].append(t)
    return times, errors


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def peak_extra_bytes(fn: Step, device: str) -> int:
    """Peak memory of one call of ``fn`` above what was held before it (after a warm-up call)."""
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


def _measure_request(req: dict) -> dict:
    """In a fresh process: build one provider and measure its CPU peak (see the module doc)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    provider = req["provider"]
    if provider not in PROVIDERS:
        raise KeyError(f"provider {provider!r} is not registered in a fresh process")
    cfg = Config(**req["cfg"])
    torch.set_num_threads(req.get("threads") or torch.get_num_threads())
    try:
        fn = PROVIDERS[provider].build(req["workload"], req["mode"], cfg)
    except Unavailable as e:
        return dict(unavailable=str(e))
    return dict(peak_extra_bytes=peak_extra_bytes(fn, cfg.device))


# What the memory server imports once, before it forks its first worker.
_PRELOAD = ("torch", "x_transformers", "einx", "fastdpo", "liger_kernel.chunked_loss")


def _memory_server(provider_modules: list[str]) -> None:
    """Serve measurement requests (JSON lines on stdin), each in a process forked afresh.

    Started by :class:`MemoryServer`.  This process imports the modules (and the modules
    registering extra providers) and never runs a tensor op, so every forked worker starts
    from an untouched heap and a single thread, and pays no import (4 s with torch and
    x-transformers).  Per request it prints the worker's pid, then the result (or how the
    worker died), one JSON line each.
    """
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    load_provider_modules(provider_modules)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(r)
            os.dup2(2, 1)  # keep stray prints off the protocol pipe
            try:
                result = _measure_request(req)
            except BaseException as e:  # noqa: BLE001 -- reported, not raised
                result = dict(error=_one_line(e))
            os.write(w, json.dumps(result).encode())
            os._exit(0)
        os.close(w)
        out.write(json.dumps(dict(pid=pid)) + "\n")
        out.flush()
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if data:
            result = json.loads(data)
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            why = " (out of memory?)" if sig == signal.SIGKILL else ""
            result = dict(error=f"memory worker killed by {signal.Signals(sig).name}{why}")
        else:
            result = dict(error=f"memory worker exited with code {os.waitstatus_to_exitcode(status)} and no result")
        out.write(json.dumps(result) + "\n")
        out.flush()


class MemoryServer:
    """Measures CPU peaks in fresh processes forked by one :func:`_memory_server`."""

    def __init__(self, timeout: float | None = None, provider_modules: Iterable[str] = ()):
        self.timeout = timeout
        self.provider_modules = list(provider_modules)
        self.proc = None

    def _start(self):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from fastdpo.bench import _memory_server; _memory_server(sys.argv[1:])",
             *self.provider_modules],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self._buf = b""

    def _readline(self, timeout: float | None) -> str:
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
                raise EOFError("the memory server died")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def measure(self, workload: str, provider: str, mode: str, cfg: Config) -> dict:
        """``{"peak_extra_bytes": n}``, ``{"error": one line}`` or ``{"unavailable": reason}``."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        req = dict(workload=workload, provider=provider, mode=mode, cfg=asdict(cfg), threads=torch.get_num_threads())
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            pid = json.loads(self._readline(None))["pid"]
            try:
                return json.loads(self._readline(self.timeout))
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._readline(None)
                return dict(error=f"memory worker timed out after {self.timeout} s")
        except (OSError, EOFError, ValueError) as e:
            self.close()
            return dict(error=f"memory server: {_one_line(e)}")

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def measure_memory_cuda(fn: Step) -> dict:
    try:
        return dict(peak_extra_bytes=peak_extra_bytes(fn, "cuda"))
    except Exception as e:  # noqa: BLE001 -- an OOM is a result
        return dict(error=_one_line(e))
    finally:
        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the suite


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


def environment(device: str) -> dict:
    """What the rows are tagged with: machine, versions, date."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"{_cpu_model() or platform.machine()}, {os.cpu_count()} cores"
    return dict(
        device_name=name,
        torch=torch.__version__,
        triton=_version("triton"),
        x_transformers=_version("x-transformers"),
        liger_kernel=_version("liger-kernel"),
        fastdpo=_version("fastdpo"),
        threads=torch.get_num_threads(),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    )


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
    warmup: int = 1,
    memory: bool = True,
    progress: bool = True,
    timeout: float | None = None,
    provider_modules: Iterable[str] = (),
) -> list[dict]:
    """Measure every (size, workload, mode, provider); returns one row per combination.

    ``providers=None`` means every registered one; :data:`REFERENCES` (and ``body`` for the
    step workload) are always added.  ``provider_modules`` are the modules that registered
    extra providers (imported again by the CPU memory workers).
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
    times, errors = time_interleaved(steps, cfg.device, repeats, warmup)
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


def _ratio(a, b):
    if a is None or b is None or not b or (isinstance(b, float) and math.isnan(b)):
        return None
    return a / b


def add_ratios(rows: list[dict]) -> None:
    """Fill vs_xt, vs_floor, body_mib, head_mib, mem_vs_xt, head_mem_vs_xt in place."""

    def key(r):
        return (tuple(r[k] for k in SIZE_FIELDS), r["dtype"], r["workload"], r["mode"])

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
        r["vs_floor"] = _ratio(r["median_ms"], floor.get("median_ms"))
        r["mem_vs_xt"] = _ratio(r["peak_mib"], xt.get("peak_mib"))
        r["head_mem_vs_xt"] = _ratio(r["head_mib"], xt_head) if xt_head and xt_head > 0 else None


# ----------------------------------------------------------------------------- output


def format_table(rows: list[dict]) -> str:
    """The printed table: one block per size point."""

    def f(x, spec, suffix=""):
        return "-" if x is None else format(x, spec) + suffix

    cols = [("provider", 19, "<"), ("workload", 8, "<"), ("mode", 16, "<"), ("median ms", 10, ">"),
            ("vs x-t", 7, ">"), ("vs floor", 8, ">"), ("peak MiB", 9, ">"), ("head MiB", 9, ">"),
            ("mem vs x-t", 10, ">")]  # fmt: skip
    head = " ".join(f"{name:{al}{w}}" for name, w, al in cols)
    out = []
    points = []
    for r in rows:
        p = (tuple(r[k] for k in SIZE_FIELDS), r["dtype"], r["device"])
        if p not in points:
            points.append(p)
    for p in points:
        sizes = dict(zip(SIZE_FIELDS, p[0]))
        out.append("")
        out.append(
            f"B={sizes['batch']} L={sizes['seq_len']} V={sizes['vocab']} D={sizes['dim']} "
            f"depth={sizes['depth']} heads={sizes['heads']} {p[1]} on {p[2]}"
        )
        out += [head, "-" * len(head)]
        for r in rows:
            if (tuple(r[k] for k in SIZE_FIELDS), r["dtype"], r["device"]) != p:
                continue
            cells = [
                r["provider"], r["workload"], r["mode"], f(r["median_ms"], ".2f"), f(r["vs_xt"], ".2f", "x"),
                f(r["vs_floor"], ".2f", "x"), f(r["peak_mib"], ".1f"), f(r["head_mib"], ".1f"),
                f(r["mem_vs_xt"], ".2f", "x"),
            ]  # fmt: skip
            line = " ".join(f"{c:{al}{w}}" for c, (_, w, al) in zip(cells, cols))
            if r["status"] != "ok":
                line += f"  {r['status']}: {r['reason']}"
            out.append(line.rstrip())
    return "\n".join(out[1:])


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


def plot(rows: list[dict], path: str, x: str = "vocab") -> None:
    """A PNG of median time, peak memory and head memory against ``x`` (vocab or seq_len)."""
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
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(4.5 * len(panels), 3.2 * len(metrics) + 1.0), squeeze=False)
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    for j, (workload, mode) in enumerate(panels):
        for i, (col, label) in enumerate(metrics):
            ax = axes[i][j]
            for p in providers:
                pts = sorted(
                    (r[x], r[col]) for r in rows
                    if r["provider"] == p and (r["workload"], r["mode"]) == (workload, mode) and r[col] is not None
                )  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=p, color=colors[p])
            if len(xs) > 1 and xs[-1] >= 4 * xs[0]:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.minorticks_off()
            if i == 0:
                ax.set_title(f"{workload}, {mode}")
            if j == 0:
                ax.set_ylabel(label)
            if i == len(metrics) - 1:
                ax.set_xlabel("vocabulary size" if x == "vocab" else "sequence length")
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(l, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 8), frameon=False)
    r0 = rows[0]
    fig.suptitle(
        f"fastdpo bench on {r0['device_name']} ({r0['device']}), {r0['dtype']}, B={r0['batch']}, "
        f"D={r0['dim']}, depth={r0['depth']}; torch {r0['torch']}, {str(r0['date'])[:10]}",
        fontsize=10,
    )
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1 - 0.35 / height))  # inches for the legend, the title
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- arguments


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
        raise argparse.ArgumentTypeError(f"expected vocab=V1,V2,... or seq-len=L1,L2,..., got {text!r}")
    try:
        vals = [_positive(v) for v in values.split(",") if v.strip()]
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
        p.add_argument(f"--{flag}", dest=name, type=_positive, default=None, metavar="N",
                       help=f"override the preset's {flag}")  # fmt: skip
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model and logits dtype (default float32)")
    p.add_argument("--workload", type=_choice_or_all(WORKLOADS), default=list(WORKLOADS),
                   help="step, head, or all (default; comma-separated also works)")  # fmt: skip
    p.add_argument("--mode", type=_choice_or_all(MODES), default=list(MODES),
                   help="forward, forward+backward, or all (default)")  # fmt: skip
    p.add_argument("--providers", type=_provider_list, default=None, metavar="A,B,...",
                   help=f"comma-separated subset of: {', '.join(PROVIDERS)} (default: all; "
                        f"{' and '.join(REFERENCES)} are always measured, for the ratios)")  # fmt: skip
    p.add_argument("--provider-module", dest="provider_modules", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: its fastdpo.bench.register calls add providers (repeatable)")  # fmt: skip
    p.add_argument("--sweep", type=_sweep, default=None, metavar="vocab=V1,V2|seq-len=L1,L2",
                   help="run every size point of one swept dimension")  # fmt: skip
    p.add_argument("--repeats", type=_positive, default=None, help="timed calls per provider (default: the preset's)")
    p.add_argument("--warmup", type=_non_negative, default=1, help="untimed calls per provider first (default 1)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="torch CPU threads (default: torch's, one per core); 1 is steadier on a busy machine")  # fmt: skip
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurements")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--timeout", type=_positive, default=None, metavar="S",
                   help="seconds before a CPU memory worker is killed (default: none)")  # fmt: skip
    p.add_argument("--out", default=None, metavar="PATH", help="write the rows to PATH (.csv or .json)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of time and memory vs the swept size")


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
    return [Config(**s, dtype=args.dtype, device=device) for s in points]


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
    """``fastdpo bench``: run the suite, print the table, write --out and --plot."""
    error = error or (lambda msg: sys.exit(f"fastdpo bench: error: {msg}"))
    for name in args.provider_modules:
        try:
            load_provider_modules([name])
        except Exception as e:  # noqa: BLE001 -- a usage error, in one line
            error(f"--provider-module {name}: {_one_line(e)}")
    unknown = [n for n in args.providers or () if n not in PROVIDERS]
    if unknown:
        error(f"argument --providers: unknown provider {', '.join(map(repr, unknown))} (known: {', '.join(PROVIDERS)})")
    if args.out and not args.out.endswith((".csv", ".json")):
        error(f"--out must end in .csv or .json, got {args.out!r}")
    if args.plot and not args.plot.endswith(".png"):
        error(f"--plot must end in .png, got {args.plot!r}")
    cfgs = configs_from_args(args, error)
    repeats = args.repeats or SIZES[args.size]["repeats"]
    if args.threads:
        torch.set_num_threads(args.threads)
    _warn_if_busy(cfgs[0].device)
    env = environment(cfgs[0].device)
    print(
        f"fastdpo bench --size {args.size}: {env['device_name']}, {cfgs[0].dtype}, torch {env['torch']}, "
        f"triton {env['triton']}, x-transformers {env['x_transformers']}, liger-kernel {env['liger_kernel']}, "
        f"{env['threads']} threads, {repeats} repeats, {env['date']}",
        flush=True,
    )
    rows = run(
        cfgs, workloads=args.workload, modes=args.mode, providers=args.providers, repeats=repeats,
        warmup=args.warmup, memory=args.memory, progress=args.progress, timeout=args.timeout,
        provider_modules=args.provider_modules,
    )  # fmt: skip
    print(format_table(rows))
    print("ratios: median time and peak memory over x-transformers' and the floor's, same run; "
          "head MiB (step) = peak - the body-only peak")  # fmt: skip
    if args.out:
        write_rows(rows, args.out)
        print(f"rows written to {args.out}")
    if args.plot:
        plot(rows, args.plot, x=args.sweep[0] if args.sweep else "vocab")
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    from .cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
