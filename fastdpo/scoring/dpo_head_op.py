"""The DPO step's head: reference scores and the policy's loss and head gradients in one op.

Dimensions: B pairs; 2B sequences (B chosen, then their B rejected); T positions; D hidden
size; V vocabulary; M counted rows.

A pair's loss depends on its own four scores only, so once a group of whole pairs is scored
the loss gradient of each of its sequences is known (a loss that couples the pairs, ``aot``,
makes the whole batch one group), while the group's logits are still in
memory: they meet ``weight`` and ``hidden`` right away (:func:`fastdpo.scoring.rows.kept_grads`).
The policy's head then costs one product forward and two backward (the floor); backward
merely scales the gradients made in forward.  A group whose logits exceed the keep budget
(:func:`fastdpo.scoring.rows.group_bytes`; one pair is always a group) recomputes the chunks beyond
it.  Only counted rows are multiplied.  The elementwise work is a fold of
:mod:`fastdpo.scoring.rows` (torch on CPU, Triton kernels on CUDA), the products are ``torch.mm``.

LD-DPO's token weights (a tensor input) weigh each row's log-prob in its sequence's sum and its
gradient; with WPO (``opts.use_weighting``) the fold also returns each policy row's ``log
sum_v p_v^2``, and each group's pair weights (:func:`fastdpo.losses.weighting.wpo_weights`) multiply
its losses before their gradient is taken (:mod:`fastdpo.losses.weighting`).

Everything runs inside one ``torch.library`` custom op, ``fastdpo::dpo_head``, so that
``torch.compile`` sees one opaque node (with a fake implementation) instead of the
data-dependent row gathering, and so that the step's one host sync (the counted rows, see
:func:`fastdpo.scoring.rows.plan_rows`) is shared by the reference and the policy.  Without
gradients (``no_grad``, ``inference_mode``, a frozen policy) it scores forward only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import typing
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _checks
from ..losses.pairwise import LossConfig, pair_losses
from ..losses.weighting import wpo_weights
from . import rows as chunks
from .linear_op import check_linear_inputs


@dataclass(frozen=True)
class HeadOptions:
    """The op's non-tensor options, declared once: :func:`op_schema` derives the custom op's
    arguments from these fields (and :class:`~fastdpo.losses.pairwise.LossConfig`'s, nested as
    ``loss``), :func:`to_op_args` and :func:`from_op_args` convert, so nothing else lists them."""

    impl: str  # "torch" | "triton": which fold of fastdpo.scoring.rows.FOLDS does the elementwise work
    scale: float | None  # the policy head's logit scale (tied embedding)
    ref_scale: float | None
    reduction: str  # the DPO module's logprob_reduction: "mean" | "sum"
    loss: LossConfig
    count_hits: bool = False  # count scored positions whose target is the argmax (metrics)
    use_weighting: bool = False  # WPO: fold the policy's log sum_v p_v^2, weight each pair's loss
    softcap: float | None = None  # the policy head's tanh cap of its logits (Gemma 2)
    ref_softcap: float | None = None
    chunk_bytes: int = 0  # 0: the device's default, fastdpo.scoring.rows.chunk_bytes
    group_bytes: int = 0  # 0: the device's default, fastdpo.scoring.rows.group_bytes


# The op's tensor inputs, then the options' leaves, then who needs a gradient.
_TENSORS = ("Tensor hidden", "Tensor weight", "Tensor targets", "Tensor mask", "Tensor count",
            "Tensor? token_weights", "Tensor? ref_hidden", "Tensor? ref_weight", "Tensor? ref_scores",
            "Tensor? bias", "Tensor? ref_bias")
_N_TENSORS = len(_TENSORS)
_BIAS = _N_TENSORS - 2  # the policy head bias's input position
_NEEDS = ("bool need_hidden", "bool need_weight", "bool need_bias")
# How each annotation reaches the schema (a custom op's schema takes no objects).  A field that
# may hold a tensor (bco_delta) becomes two arguments: the tensor, or None, and the number.
_SCHEMA_TYPES: dict = {
    str: ("str",), bool: ("bool",), int: ("int",), float: ("float",), float | None: ("float?",),
    tuple[str, ...]: ("str[]",), tuple[float, ...]: ("float[]",),
    float | str | Tensor: ("Tensor?", "float"),
}


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _leaves(cls=HeadOptions, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(field path, schema types) of every option leaf, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        kind = _hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            out += _leaves(kind, prefix + (f.name,))
        else:
            out.append((prefix + (f.name,), _SCHEMA_TYPES[kind]))
    return out


_LEAVES = _leaves()


def op_schema() -> str:
    """The ``fastdpo::dpo_head`` schema, from :class:`HeadOptions`' fields."""
    options = []
    for path, kinds in _LEAVES:
        name = path[-1]
        options += [f"{kinds[0]} {name}"] + [f"{k} {name}_value" for k in kinds[1:]]
    args = ", ".join(_TENSORS + tuple(options) + _NEEDS)
    return f"({args}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"


def to_op_args(opts: HeadOptions) -> list:
    """``opts`` as the op's option arguments, in :func:`op_schema`'s order."""
    out = []
    for path, kinds in _LEAVES:
        value = opts
        for name in path:
            value = getattr(value, name)
        if isinstance(value, tuple):
            value = list(value)
        if len(kinds) == 2:  # a tensor, or a number
            if isinstance(value, str) and "bco_pair" in opts.loss.loss_type:
                raise ValueError(f"{path[-1]}={value!r} couples the pairs of a batch: the DPO head op cannot take it")
            if isinstance(value, str):  # bco_delta="batch" without bco_pair: never read
                value = 0.0
            tensor = isinstance(value, Tensor)
            out += [value if tensor else None, 0.0 if tensor else float(value)]
        else:
            out.append(value)
    return out


def from_op_args(args) -> HeadOptions:
    """The inverse of :func:`to_op_args`."""
    values: dict[tuple[str, ...], object] = {}
    i = 0
    for path, kinds in _LEAVES:
        value = args[i] if len(kinds) == 1 or args[i] is not None else args[i + 1]
        values[path] = tuple(value) if isinstance(value, list) else value
        i += len(kinds)
    return _build(HeadOptions, values)


def _build(cls, values: dict, prefix: tuple[str, ...] = ()):
    kw = {}
    for f in dataclasses.fields(cls):
        kind, path = _hints(cls)[f.name], prefix + (f.name,)
        kw[f.name] = _build(kind, values, path) if dataclasses.is_dataclass(kind) else values[path]
    return cls(**kw)


@contextlib.contextmanager
def _autograd_inside_op():
    """Let autograd record again inside the custom op's body, for the group's tiny loss.

    A custom op's implementation runs below autograd: its dispatch keys are excluded from
    the thread's dispatch, so no graph is recorded even under ``torch.enable_grad()``.  The
    loss gradient of a group (a few scalars per pair, any loss type) is taken with autograd
    itself rather than a second, hand-written derivative of every loss, so this guard
    removes the autograd keys from the excluded set for the duration (torch.func's vjp would
    do it too, but breaks under dispatch modes such as FlopCounterMode).  Never used under
    ``inference_mode``: without gradients the op does not take the loss's gradient."""
    c = torch._C
    autograd = (
        c.DispatchKeySet(c.DispatchKey.AutogradFunctionality)
        | c.DispatchKeySet(c.DispatchKey.AutogradOther)
        | c.DispatchKeySet(c.DispatchKey.AutogradNestedTensor)
    )
    excluded = c._dispatch_tls_local_exclude_set()
    with c._ForceDispatchKeyGuard(c._dispatch_tls_local_include_set(), excluded - autograd), torch.enable_grad():
        yield


def pair_groups(bounds: list[int], b: int, row_bytes: int, budget: int):
    """Consecutive pairs whose counted rows' logits (``row_bytes`` each) fit ``budget`` (at
    least one pair).  Yields (pair indices, row slices of their chosen then rejected rows)."""
    start = 0
    while start < b:
        stop, rows = start, 0
        while stop < b:
            size = (bounds[stop + 1] - bounds[stop]) + (bounds[b + stop + 1] - bounds[b + stop])
            if stop > start and (rows + size) * row_bytes > budget:
                break
            rows += size
            stop += 1
        yield list(range(start, stop)), [slice(bounds[start], bounds[stop]), slice(bounds[b + start], bounds[b + stop])]
        start = stop


def _cat_rows(x: Tensor, spans: list[slice]) -> Tensor:
    parts = [x[s] for s in spans if s.stop > s.start]
    if not parts:
        return x[:0]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def dpo_head_impl(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    count: Tensor,
    token_weights: Tensor | None,
    ref_hidden: Tensor | None,
    ref_weight: Tensor | None,
    ref_scores: Tensor | None,
    bias: Tensor | None,
    ref_bias: Tensor | None,
    opts: HeadOptions,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """The op's body; see :func:`dpo_head` for the arguments and results."""
    n2, t, d = hidden.shape
    b = n2 // 2
    dev = hidden.device
    plan = chunks.plan_rows(mask)  # the step's one host sync
    fold = chunks.FOLDS[opts.impl]
    chunk_bytes = chunks.chunk_bytes(dev, opts.chunk_bytes)
    y = plan.take(targets).long()
    w = plan.take(token_weights) if token_weights is not None else None  # (M,) LD-DPO weights

    def weighted(logp: Tensor) -> Tensor:
        return logp if w is None else logp * w

    # One buffer serves every chunk loop of the call (see chunks.Scratch); with gradients it
    # is made at once as large as the largest group's kept logits, which the reference's chunk
    # then reuses.
    scratch = chunks.Scratch()
    cfg = opts.loss
    need_grad = need_hidden or need_weight or need_bias
    if need_grad:
        v = weight.shape[0]
        zdtype = fold.dtype(weight)
        rows_per_chunk = chunks.rows_per_chunk(v, zdtype.itemsize, chunk_bytes)
        group_bytes = chunks.group_bytes(dev, opts.group_bytes)
        # A loss that couples the pairs (aot sorts the batch's margins) needs every pair's
        # scores for any gradient: the batch is one group, logits beyond the keep budget
        # recomputed, the chunk buffer recomputing takes counted in that budget.  (CPU, medium
        # preset: the head 1.18x sigmoid's time and +32 MiB of peak, against 1.26x and -34 MiB
        # on the scores route.)
        coupled = cfg.couples_pairs
        budget = group_bytes if not coupled else float("inf")
        groups = []
        for pairs, spans in pair_groups(plan.bounds, b, v * zdtype.itemsize, budget):
            m = sum(s.stop - s.start for s in spans)
            # The first `keep` rows keep their logits between the passes; the rest are recomputed.
            keep = min(m, group_bytes // (v * zdtype.itemsize))
            if coupled and keep < m:
                keep = max(0, keep - rows_per_chunk)
            groups.append((pairs, spans, keep))
        scratch.rows(max(keep for _, _, keep in groups), v, zdtype, dev)

    if ref_hidden is not None:
        _, ref_logp, _, _ = chunks.score_rows(
            plan.take(ref_hidden), y, ref_weight, opts.ref_scale, fold, chunk_bytes, softcap=opts.ref_softcap,
            bias=ref_bias, scratch=scratch,
        )
        ref_sums = plan.sequence_sums(weighted(ref_logp))
        ref_scores = ref_sums / count if opts.reduction == "mean" else ref_sums
    elif ref_scores is None:  # reference-free: a zero reference
        ref_scores = torch.zeros(n2, dtype=torch.float32, device=dev)
    with_wpo = opts.use_weighting  # WPO: the policy's log sum_v p_v^2 per row, folded with its log-probs
    tokens = mask.sum(-1) if with_wpo else None
    h = plan.take(hidden)
    hits = torch.zeros(n2 if opts.count_hits else 0, dtype=torch.int64, device=dev)

    if not need_grad:
        _, logp, hit, log_sum_sq = chunks.score_rows(
            h, y, weight, opts.scale, fold, chunk_bytes, hits=opts.count_hits, with_wpo=with_wpo, softcap=opts.softcap, bias=bias,
            scratch=scratch,
        )
        sums = plan.sequence_sums(weighted(logp))
        if hit is not None:
            hits.index_add_(0, plan.seq, hit.long())
        pair_w = None
        if with_wpo:
            plain = sums if w is None else plan.sequence_sums(logp)
            pair_w = wpo_weights(plain, plan.sequence_sums(log_sum_sq), tokens)
        loss = pair_losses(sums, ref_scores, count, cfg, opts.reduction, weights=pair_w).mean()
        return loss, sums, ref_scores, hits, None, None, None

    grad_rows = torch.empty_like(h) if need_hidden else None
    grad_w = chunks.WeightGrad(weight) if need_weight else None
    grad_b = chunks.BiasGrad(bias) if need_bias else None
    sums64 = torch.zeros(n2, dtype=torch.float64, device=dev)  # see RowPlan.sequence_sums
    # WPO: per sequence, sum_t log sum_v p_v^2 and (with LD weights) the unweighted sum_t log p_t
    wpo64 = torch.zeros(2, n2, dtype=torch.float64, device=dev) if with_wpo else None
    losses = torch.empty(b, dtype=torch.float32, device=dev)
    for pairs, spans, keep in groups:
        hg, yg, seq = _cat_rows(h, spans), _cat_rows(y, spans), _cat_rows(plan.seq, spans)
        wg = _cat_rows(w, spans) if w is not None else None
        m = hg.shape[0]
        kept = scratch.rows(keep, v, zdtype, dev)
        # The kept rows in one product (the more rows a product has, the less each costs, see
        # chunks.chunk_slices) where it needs no temporary; the rest in chunks.
        whole = keep > 0 and chunks.direct_product(zdtype, weight)
        parts = [slice(0, keep)] if whole else chunks.chunk_slices(keep, rows_per_chunk)
        parts += chunks.chunk_slices(m, rows_per_chunk, keep)
        chunk_buffer = None
        row_stats = torch.empty(2, m, dtype=torch.float32, device=dev)
        logp = torch.empty(m, dtype=torch.float32, device=dev)
        log_sum_sq = torch.empty(m, dtype=torch.float32, device=dev) if with_wpo else None
        # Pass 1: score the group's rows.
        for c in parts:
            if c.stop <= keep:
                z = kept[c]
            else:
                chunk_buffer = chunk_buffer if chunk_buffer is not None else chunks.rows_buffer(rows_per_chunk, v, zdtype, dev)
                z = chunk_buffer[: c.stop - c.start]
            chunks.logits_into(z, hg[c], weight, opts.scale, bias)
            if opts.count_hits:  # before the fold may turn kept logits into probabilities
                hits.index_add_(0, seq[c], (z.argmax(-1) == yg[c]).long())
            row_stats[:, c], logp[c] = fold.stats(
                z, yg[c], keep=c.stop <= keep, sq_out=log_sum_sq[c] if with_wpo else None, softcap=opts.softcap
            )
        sums64.index_add_(0, seq, (logp if wg is None else logp * wg).double())
        if with_wpo:
            wpo64[0].index_add_(0, seq, log_sum_sq.double())
            if wg is not None:
                wpo64[1].index_add_(0, seq, logp.double())
        chunk_buffer = None  # pass 2 recomputes in the scratch buffer, once the kept rows are done
        # The group's loss gradient per sequence, from its scores alone.
        index = torch.arange(pairs[0], pairs[-1] + 1, device=dev)  # consecutive: no host copy
        both = torch.cat((index, index + b))
        group_sums = sums64.float()[both]

        def group_loss(s: Tensor) -> Tensor:
            pair_w = None
            if with_wpo:  # from the scores themselves when unweighted: wpo_weights detaches them
                plain = s if wg is None else wpo64[1].float()[both]  # rounded as s is
                pair_w = wpo_weights(plain, wpo64[0][both], tokens[both])
            return pair_losses(
                s, ref_scores[both], count[both], cfg, opts.reduction, pairs=index, batch_count=count, weights=pair_w
            )

        with _autograd_inside_op():
            leaf = group_sums.detach().requires_grad_()
            group_losses = group_loss(leaf)
            (dsums,) = torch.autograd.grad(group_losses.sum() * (1.0 / b), leaf)
        losses[index] = group_losses.detach()
        g_of_seq = torch.zeros(n2, dtype=torch.float32, device=dev)
        g_of_seq[both] = dsums.float()
        g = g_of_seq.index_select(0, seq)
        if wg is not None:
            g = g * wg
        # Pass 2: the kept rows meet the two gradient products (chunks.kept_grads); the rest
        # are recomputed chunk by chunk.
        grad_h = torch.empty_like(hg) if need_hidden else None
        if keep:
            chunks.kept_grads(
                kept, row_stats[:, :keep], yg[:keep], g[:keep], hg[:keep], weight, opts.scale, fold,
                grad_h[:keep] if grad_h is not None else None, grad_w, opts.softcap, grad_b,
            )
        del kept
        if keep < m:
            rest = chunks.row_grads(
                hg[keep:], yg[keep:], weight, opts.scale, fold, row_stats[:, keep:], g[keep:],
                chunk_bytes, grad_w, need_hidden, opts.softcap, bias, grad_b, scratch,
            )
            if grad_h is not None:
                grad_h[keep:] = rest
        if grad_rows is not None:
            start = 0
            for s in spans:
                grad_rows[s] = grad_h[start : start + s.stop - s.start]
                start += s.stop - s.start
    grad_hidden = plan.put(grad_rows).to(hidden.dtype) if grad_rows is not None else None
    if grad_w is not None:
        grad_weight = grad_w.result() if grad_w.value is not None else torch.zeros_like(weight)
    else:
        grad_weight = None
    grad_bias = grad_b.result() if grad_b is not None else None
    return losses.mean(), sums64.float(), ref_scores, hits, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- custom op


def _dpo_head_body(*args) -> tuple[Tensor, ...]:
    tensors, options, needs = args[:_N_TENSORS], args[_N_TENSORS:-3], args[-3:]
    hidden, ref_scores = tensors[0], tensors[8]
    loss, sums, ref, hits, grad_h, grad_w, grad_b = dpo_head_impl(*tensors, from_op_args(options), *needs)
    if ref_scores is not None and ref is ref_scores:
        ref = ref.clone()  # a custom op's outputs may not alias its inputs or each other
    return loss, sums, ref, hits, _or_empty(grad_h, hidden), _or_empty(grad_w, hidden), _or_empty(grad_b, hidden)


_dpo_head_op = torch.library.custom_op("fastdpo::dpo_head", _dpo_head_body, mutates_args=(), schema=op_schema())


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0)


@_dpo_head_op.register_fake
def _(*args):
    hidden, weight, bias = args[0], args[1], args[_BIAS]
    count_hits = from_op_args(args[_N_TENSORS:-3]).count_hits
    need_hidden, need_weight, need_bias = args[-3:]
    n2 = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        torch.empty((), **f32),
        torch.empty(n2, **f32),
        torch.empty(n2, **f32),
        torch.empty(n2 if count_hits else 0, dtype=torch.int64, device=hidden.device),
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_weight else hidden.new_empty(0),
        torch.empty_like(bias) if need_bias else hidden.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    # save_for_backward keeps the gradients while the graph is retained (a second backward
    # after backward(retain_graph=True) sees them again) and frees them with the graph.
    ctx.save_for_backward(output[4], output[5], output[6])
    ctx.need = inputs[-3:]
    ctx.inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    # Outputs nobody differentiates get None in backward, not zeros of their size (a zeros
    # tensor the size of the logits, or of the head weight, per step otherwise).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.need
    grads = [None] * ctx.inputs
    if grad_loss is None:  # the loss took no part in what is differentiated
        return tuple(grads)
    # A new tensor even when grad_loss is 1: autograd may accumulate into what it is given.
    for i, need, g in ((0, need_hidden, grad_h), (1, need_weight, grad_w), (_BIAS, need_bias, grad_b)):
        if need and ctx.needs_input_grad[i]:
            grads[i] = g * grad_loss
    return tuple(grads)


_dpo_head_op.register_autograd(_backward, setup_context=_setup_context)


def dpo_head(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor,
    count: Tensor,
    opts: HeadOptions,
    *,
    ref_hidden: Tensor | None = None,
    ref_weight: Tensor | None = None,
    ref_scores: Tensor | None = None,
    token_weights: Tensor | None = None,
    bias: Tensor | None = None,
    ref_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Mean DPO loss over pairs of the policy's hidden states, with the head's gradients made
    in forward; also the reference's scores when its hidden states are given.

    Args:
        hidden: (2B, T, D) policy final hidden states, B chosen sequences then their B
            rejected ones (float32, bfloat16 or float16).
        weight: (V, D) the policy's head weight, hidden's dtype.
        targets: (2B, T) int64 ids, mask: (2B, T) bool (True = the position is scored),
            count: (2B,) float scored-token counts (clamped, as the DPO module makes them).
        opts: :class:`HeadOptions` (impl, scales and softcaps, the loss -- a tensor ``bco_delta`` in it
            travels as a tensor --, budgets).  With ``opts.use_weighting`` each pair's loss
            is weighted by WPO (:func:`fastdpo.losses.weighting.wpo_weights`), the policy's ``log
            sum_v p_v^2`` folded with its log-probs.
        ref_hidden, ref_weight: the reference model's hidden states and head weight, scored
            with the same row plan (the step's one host sync); or
        ref_scores: (2B,) precomputed reference scores in ``opts.reduction``; with neither, a
            zero reference.
        token_weights: (2B, T) floating weights of each position's log-prob in the policy's
            and the reference's sums (LD-DPO, :mod:`fastdpo.losses.weighting`); ``count`` is then the
            divisor of a mean score.
        bias, ref_bias: the policy's and the reference's (V,) head biases (``nn.Linear``'s), or
            None; the policy's is differentiated.

    Returns:
        (loss scalar, policy summed log-probs (2B,) float32, reference scores (2B,) float32,
        argmax hits (2B,) int64 or (0,) without ``opts.count_hits``); all but the loss detached.
    """
    targets, mask, _ = check_linear_inputs(hidden, weight, targets, mask, opts.scale, bias)
    n2 = hidden.shape[0]
    if n2 == 0:
        raise ValueError("hidden must hold at least one pair (2 sequences), got 0 sequences")
    if n2 % 2:
        raise ValueError(f"hidden must hold 2B sequences (chosen then rejected), got {n2}")
    _checks.tensor("count", count, ndim=1)
    if count.shape[0] != n2 or not count.is_floating_point():
        raise ValueError(f"count must be a float ({n2},) tensor, got {count.dtype} {tuple(count.shape)}")
    if ref_hidden is not None:
        check_linear_inputs(ref_hidden, ref_weight, targets, mask, opts.ref_scale, ref_bias)
        if ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"ref_hidden must be ({n2}, T, D') like hidden, got {tuple(ref_hidden.shape)}")
    if ref_scores is not None and (ref_scores.shape != (n2,) or ref_scores.dtype != torch.float32):
        raise ValueError(f"ref_scores must be a float32 ({n2},) tensor, got {ref_scores.dtype} {tuple(ref_scores.shape)}")
    _checks.choice("opts.impl", opts.impl, tuple(chunks.FOLDS))
    for name in ("softcap", "ref_softcap"):
        if getattr(opts, name) is not None:
            _checks.positive_finite(f"opts.{name}", getattr(opts, name))
    _checks.choice("opts.reduction", opts.reduction, ("mean", "sum"))
    token_weights = _checks.token_weights(token_weights, mask)
    return run_dpo_head(hidden, weight, targets, mask, count, opts, ref_hidden, ref_weight, ref_scores, token_weights,
                        bias, ref_bias)


def run_dpo_head(
    hidden, weight, targets, mask, count, opts: HeadOptions, ref_hidden=None, ref_weight=None, ref_scores=None,
    token_weights=None, bias=None, ref_bias=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op on checked inputs (what :class:`fastdpo.DPO` calls; ``torch.compile`` traces
    through it to the one opaque op)."""
    grad = torch.is_grad_enabled()
    need_hidden = grad and hidden.requires_grad
    need_weight = grad and weight.requires_grad
    need_bias = grad and bias is not None and bias.requires_grad
    loss, sums, ref, hits, _, _, _ = _dpo_head_op(
        hidden, weight, targets, mask, count, token_weights, ref_hidden, ref_weight, ref_scores, bias, ref_bias,
        *to_op_args(opts), need_hidden, need_weight, need_bias,
    )
    return loss, sums, ref, hits
