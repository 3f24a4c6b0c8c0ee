"""The built-in providers, registered on import (see :mod:`fastdpo.bench`).

Each builder returns ``step()``; ``same_loss_as`` names the ``fastdpo.DPO`` conventions whose
loss the step returns (x-transformers': mean of token log-probs over an input-aligned mask,
``{}``; TRL's: sum over a target-aligned mask), so tests/test_bench.py can check that every
provider computes what it claims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import BETA, LOSSES, Config
from .inputs import (
    _dpo,
    _logprobs_logsoftmax,
    _pair_loss,
    counted_runs,
    body_plan,
    head_logits,
    make_batch,
    make_models,
    make_step,
)
from .registry import Builder, Step, Unavailable, register

XT = {}  # x-transformers' conventions: fastdpo.DPO's defaults
TRL = {"logprob_reduction": "sum", "mask_alignment": "target"}


# ----------------------------------------------------------------------------- the floor


@register(
    "floor", losses=LOSSES,
    help="the work every exact implementation does: the bodies + the head products over counted rows "
    "+ one pass over those logits (step; per loss: inputs.body_plan); one read of the counted rows' "
    "logits, + a read and the gradient write (head)",
)
def _floor(workload: str, mode: str, cfg: Config) -> Step:
    """The cheapest torch ops that do exactly the unavoidable work, so that "vs floor" says how
    close a provider is to perfect (one faster than its floor is a bug in the floor: a test
    checks it at tiny size).

    head, forward: one read of the counted rows' logits (a max over each row: a reduction
    that is memory-bound).  head, forward+backward: that read, one more read of them, and the
    gradient written once in full (counted rows computed, the others zeroed): the logits'
    gradient buffer is what every implementation hands autograd.

    step: the model bodies the loss runs (:func:`~fastdpo.bench.inputs.body_plan`; DPO: the
    reference forward, the policy forward and, with backward, its backward) plus, after each,
    the head's products over its counted rows -- forward, and with backward the two gradient
    products -- plus one pass over those logits (a max over the rows; with backward, the
    policy's is an in-place pass that writes the gradient operand)."""
    bt = make_batch(cfg)
    dt, dev = cfg.torch_dtype, cfg.device
    g = torch.Generator(device=dev).manual_seed(cfg.seed + 2)
    runs = counted_runs(bt.mask)
    if workload == "head":
        logits = head_logits(cfg).detach()
        uncovered = torch.ones(bt.mask.shape, dtype=torch.bool, device=dev)
        for i, a, b in runs:
            uncovered[i, a:b] = False
        rows = uncovered.reshape(-1).nonzero().squeeze(1)

        def step():
            for i, a, b in runs:
                logits[i, a:b].amax(-1)  # the forward's one read
            if mode != "forward":
                grad = torch.empty_like(logits)
                for i, a, b in runs:
                    torch.mul(logits[i, a:b], 0.5, out=grad[i, a:b])  # one more read, the write
                grad.view(-1, grad.shape[-1]).index_fill_(0, rows, 0.0)  # the other rows: zeros
            return None

        return step

    # Each body run of the loss (inputs.body_plan), its head products over its counted rows at
    # once, into one (M, V) buffer allocated here, outside the timed call: the cheapest way to do
    # the work, whatever it costs in memory.  A floor in chunks through a reused buffer is not a
    # floor: fastdpo's backward products take a whole pair's rows at once and beat it
    # (docs/performance.md, "Floors: what the floor is").
    plan = body_plan(cfg, mode)
    top = max([1] + [m for _, _, m, _ in plan])
    hidden = torch.randn(top, cfg.dim, generator=g, device=dev, dtype=dt)
    weight = torch.randn(cfg.vocab, cfg.dim, generator=g, device=dev, dtype=dt)
    buf = torch.empty(top, cfg.vocab, device=dev, dtype=dt)

    def head(m: int, grad: bool) -> None:
        z = torch.mm(hidden[:m], weight.T, out=buf[:m])
        if not grad:
            z.amax(-1)  # the one read
            return
        z.mul_(0.5)  # the one pass: the logits become the gradient operand in place
        torch.mm(z, weight)  # d hidden
        z.T.mm(hidden[:m])  # d weight

    return _plan_step(plan, head)


def _plan_step(plan, head=None) -> Step:
    """The step running ``plan``'s bodies in order (and after each, ``head(rows, grad)``): the
    runs without gradient under ``no_grad``, the differentiated one followed by its backward."""

    def step():
        for model, src, m, grad in plan:
            if not grad:
                with torch.no_grad():
                    model(src, return_embeddings=True)
                    if head is not None:
                        head(m, False)
                continue
            emb = model(src, return_embeddings=True)
            if head is not None:
                head(m, True)  # one product forward, two backward
            emb.backward(torch.ones_like(emb))
            model.zero_grad(set_to_none=True)
        return None

    return step


@register("body", workloads=("step",), losses=LOSSES,
          help="the model bodies alone, no head (the head-memory baseline): the loss's body runs (inputs.body_plan)")
def _body(workload: str, mode: str, cfg: Config) -> Step:
    return _plan_step(body_plan(cfg, mode))


# ----------------------------------------------------------------------------- the reference


@register("x-transformers", same_loss_as=XT,
          help="x_transformers.dpo.DPO (step); its log_softmax + gather + masked_mean (head)")
def _xtransformers(workload: str, mode: str, cfg: Config) -> Step:
    bt = make_batch(cfg)
    if workload == "step":
        from x_transformers.dpo import DPO

        dpo = _dpo(DPO, cfg)
        return make_step(lambda: dpo(bt.pref, bt.unpref, **bt.dpo_kwargs), mode, dpo.parameters())

    import einx
    from x_transformers.dpo import masked_mean

    logits = head_logits(cfg)

    def loss():
        lp = einx.get_at("b n [l], b n -> b n", logits.log_softmax(dim=-1), bt.tgt)
        return masked_mean(lp, bt.mask).sum()

    return make_step(loss, mode, [logits])


# ----------------------------------------------------------------------------- plain torch


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


@register("torch", same_loss_as=XT,
          help="plain torch, x-transformers' numbers: one 2B batch, log_softmax + gather + masked sum / count")
def _plain_torch(workload: str, mode: str, cfg: Config) -> Step:
    return _scores_provider(workload, mode, cfg, _logprobs_logsoftmax, "mask", mean=True)


@register("trl", same_loss_as=TRL,
          help="TRL's convention in plain torch: one 2B batch, log_softmax + gather, target-aligned mask, sum")
def _trl(workload: str, mode: str, cfg: Config) -> Step:
    return _scores_provider(workload, mode, cfg, _logprobs_logsoftmax, "mask_target", mean=False)


# ----------------------------------------------------------------------------- peers' fused heads


def _hidden_provider(mode: str, cfg: Config, scores, mask_name: str, mean: bool) -> Step:
    """A step provider from ``scores(hidden, weight, tgt, mask) -> (N,) masked sums`` on the
    bodies' hidden states and head weights (no logits from the model)."""
    bt = make_batch(cfg)
    mask = getattr(bt, mask_name)
    count = mask.sum(-1).clamp(min=1e-5) if mean else None
    model, ref = make_models(cfg)

    def reduce(s):
        return s / count if mean else s

    def loss():
        with torch.no_grad():
            ref_scores = reduce(scores(ref(bt.src, return_embeddings=True), ref.to_logits.weight, bt.tgt, mask))
        hidden = model(bt.src, return_embeddings=True)
        return _pair_loss(reduce(scores(hidden, model.to_logits.weight, bt.tgt, mask)), ref_scores)

    return make_step(loss, mode, model.parameters())


def _peer(module: str, package: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- any failure: the peer cannot run here
        raise Unavailable(f"{package} not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


@register("trl-fused", workloads=("step",), same_loss_as=TRL,
          help="TRL 1.16's fused LM head (trl.kernels.chunked_logprob.ChunkedLogProbFunction) on the bodies' "
               "hidden states, TRL's conventions and sigmoid loss")
def _trl_fused(workload: str, mode: str, cfg: Config) -> Step:
    _peer("trl", "trl")
    from . import peers

    return _hidden_provider(mode, cfg, peers.trl_head, "mask_target", mean=False)


@register("cce", workloads=("step",), same_loss_as=TRL,
          help="cut-cross-entropy's linear_cross_entropy (reduction='none') on the bodies' hidden states, "
               "TRL's conventions (its Triton kernels on CUDA, its torch.compile implementation elsewhere)")
def _cce(workload: str, mode: str, cfg: Config) -> Step:
    _peer("cut_cross_entropy", "cut-cross-entropy")
    from . import peers

    if not cfg.device.startswith("cuda") and peers._cpu_compiler() is None:
        raise Unavailable("unavailable on cpu: cut-cross-entropy's CPU implementation is torch.compile, which needs a C compiler")
    return _hidden_provider(mode, cfg, peers.cce_head, "mask_target", mean=False)


# Liger's default, torch.compile of its per-chunk step (C++ through Inductor on the CPU: 10-20 s
# of compilation in the warm-up calls, not timed).
LIGER_COMPILED = True


@register("liger", workloads=("step",), same_loss_as=XT,
          help="Liger-Kernel LigerFusedLinearDPOLoss on the body's hidden states + head weight (torch.compile'd chunks)")
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


@register("liger-eager", workloads=("step",), same_loss_as=XT,
          help="as liger, with its chunks run eagerly (compiled=False)")
def _liger_eager(workload: str, mode: str, cfg: Config) -> Step:
    return _liger(workload, mode, cfg, compiled=False)


@register("torch-lce", workloads=("step",), same_loss_as=XT,
          help="torch's chunked F.linear_cross_entropy (reduction='none') on the body's hidden states")
def _torch_lce(workload: str, mode: str, cfg: Config) -> Step:
    lce = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if lce is None or options is None:
        raise Unavailable(f"torch {torch.__version__} has no chunked F.linear_cross_entropy (torch >= 2.13)")
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


# ----------------------------------------------------------------------------- fastdpo


def _fastdpo(impl: str) -> Builder:
    def build(workload: str, mode: str, cfg: Config) -> Step:
        if impl == "triton" and not cfg.device.startswith("cuda"):
            raise Unavailable(f"unavailable on {cfg.device}: the Triton kernels need CUDA")
        from fastdpo import DPO, sequence_logprobs

        if workload == "step":
            bt = make_batch(cfg)
            dpo = _dpo(DPO, cfg, impl=impl)
            return make_step(lambda: dpo(bt.pref, bt.unpref, **bt.dpo_kwargs), mode, dpo.parameters())
        return _scores_provider(
            workload, mode, cfg, lambda lg, t, m: sequence_logprobs(lg, t, m, impl=impl), "mask", mean=True
        )

    return build


for _impl in ("torch", "triton"):
    register(f"fastdpo-{_impl}", same_loss_as=XT, losses=LOSSES if _impl == "torch" else ("dpo",),
             help=f"fastdpo.DPO (default head='auto': fused for this model) / sequence_logprobs, impl={_impl!r}")(_fastdpo(_impl))


@register("fastdpo-logits", workloads=("step",), same_loss_as=XT,
          help="fastdpo.DPO(head='logits', impl='torch'): the model's logits, scored without a log-softmax")
def _fastdpo_logits(workload: str, mode: str, cfg: Config) -> Step:
    from fastdpo import DPO

    bt = make_batch(cfg)
    dpo = _dpo(DPO, cfg, impl="torch", head="logits")
    return make_step(lambda: dpo(bt.pref, bt.unpref, **bt.dpo_kwargs), mode, dpo.parameters())


def _fastdpo_packing(packing: str) -> Builder:
    def build(workload: str, mode: str, cfg: Config) -> Step:
        from fastdpo import DPO

        bt = make_batch(cfg)
        dpo = _dpo(DPO, cfg, packing=packing)
        return make_step(lambda: dpo(bt.pref, bt.unpref, **bt.dpo_kwargs), mode, dpo.parameters())

    return build


register("fastdpo-shared", workloads=("step",), same_loss_as=XT,
         help="fastdpo.DPO(packing='pair'): each pair as one packed sequence, the prompt run once")(_fastdpo_packing("pair"))
register("fastdpo-packed", workloads=("step",), same_loss_as=XT,
         help="fastdpo.DPO(packing='batch'): whole pairs packed into rows, each prompt once, no padding")(_fastdpo_packing("batch"))


@register("fastdpo-precomputed", workloads=("step",), same_loss_as=XT,
          help="fastdpo.DPO (impl='torch') with precomputed reference scores: no reference model run")
def _fastdpo_precomputed(workload: str, mode: str, cfg: Config) -> Step:
    from fastdpo import DPO

    bt = make_batch(cfg)
    dpo = _dpo(DPO, cfg, impl="torch")
    ref_w, ref_l = dpo.reference_scores(bt.pref, bt.unpref, **bt.dpo_kwargs)
    dpo.ref_model = None  # a run with precomputed scores can drop it

    def loss():
        return dpo(bt.pref, bt.unpref, **bt.dpo_kwargs,
                   ref_preferred_logprob=ref_w, ref_unpreferred_logprob=ref_l)

    return make_step(loss, mode, dpo.parameters())
