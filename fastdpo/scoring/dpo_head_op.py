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

import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import _checks
from ..losses.pairwise import LossConfig, pair_losses
from ..losses.weighting import wpo_weights
from . import rows as chunks
from .autograd_inside_op import autograd_inside_op
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


# The op's arguments: its tensors (OpInputs, the first five required), the options' leaves, then
# who needs a gradient (Needs).
_REQUIRED = ("hidden", "weight", "targets", "mask", "count")
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
    tensors = tuple(f"Tensor{'' if name in _REQUIRED else '?'} {name}" for name in OpInputs._fields)
    args = ", ".join(tensors + tuple(options) + tuple(f"bool need_{name}" for name in Needs._fields))
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


# ----------------------------------------------------------------------------- the op's body


class OpInputs(NamedTuple):
    """The op's tensor arguments, by name (:func:`dpo_head` says what each holds)."""

    hidden: Tensor
    weight: Tensor
    targets: Tensor
    mask: Tensor
    count: Tensor
    token_weights: Tensor | None
    ref_hidden: Tensor | None
    ref_weight: Tensor | None
    ref_scores: Tensor | None
    bias: Tensor | None
    ref_bias: Tensor | None


class Needs(NamedTuple):
    """Which of the policy's inputs want a gradient (the op makes only those)."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


@dataclass
class Group:
    """Consecutive whole pairs scored and differentiated together: their indices, the row
    spans of their chosen then rejected counted rows, and how many of those rows keep their
    logits between the two passes (the rest are recomputed)."""

    pairs: list[int]
    spans: list[slice]
    keep: int


class _Step:
    """One call of the op: the counted rows (the step's one host sync), the fold, the budgets and
    the buffer every chunk loop reuses (:class:`fastdpo.scoring.rows.Scratch`)."""

    def __init__(self, inputs: OpInputs, opts: HeadOptions):
        self.opts, self.count = opts, inputs.count
        self.n2 = inputs.hidden.shape[0]
        self.b, self.device = self.n2 // 2, inputs.hidden.device
        self.plan = chunks.plan_rows(inputs.mask)  # the step's one host sync
        self.fold = chunks.FOLDS[opts.impl]
        self.chunk_bytes = chunks.chunk_bytes(self.device, opts.chunk_bytes)
        self.targets = self.plan.take(inputs.targets).long()
        # (M,) LD-DPO weights of the counted rows' log-probs, or None
        self.weights = self.plan.take(inputs.token_weights) if inputs.token_weights is not None else None
        self.scratch = chunks.Scratch()
        self.with_wpo = opts.use_weighting  # WPO: each policy row's log sum_v p_v^2, folded with its log-probs
        self.tokens = inputs.mask.sum(-1) if self.with_wpo else None

    def weighted(self, logp: Tensor) -> Tensor:
        return logp if self.weights is None else logp * self.weights

    def plan_groups(self, weight: Tensor) -> list[Group]:
        """The groups of whole pairs, and the held buffer made as large as the largest group's
        kept logits (the reference's chunks then reuse it).  A loss that couples the pairs (aot
        sorts the batch's margins) needs every pair's scores for any gradient: the batch is one
        group, logits beyond the keep budget recomputed, the buffer recomputing takes counted in
        that budget."""
        v, zdtype = weight.shape[0], self.fold.dtype(weight)
        self.v, self.zdtype = v, zdtype
        self.rows_per_chunk = chunks.rows_per_chunk(v, zdtype.itemsize, self.chunk_bytes)
        group_bytes = chunks.group_bytes(self.device, self.opts.group_bytes)
        coupled = self.opts.loss.couples_pairs
        budget = group_bytes if not coupled else float("inf")
        groups = []
        for pairs, spans in pair_groups(self.plan.bounds, self.b, v * zdtype.itemsize, budget):
            m = sum(s.stop - s.start for s in spans)
            keep = min(m, group_bytes // (v * zdtype.itemsize))  # the first `keep` rows keep their logits
            if coupled and keep < m:
                keep = max(0, keep - self.rows_per_chunk)
            groups.append(Group(pairs, spans, keep))
        self.scratch.rows(max(g.keep for g in groups), v, zdtype, self.device)
        return groups

    def reference_scores(self, inputs: OpInputs) -> Tensor:
        """The reference's (2B,) scores in ``opts.reduction``: scored from its hidden states, as
        given, or a zero reference."""
        opts = self.opts
        if inputs.ref_hidden is not None:
            _, ref_logp, _, _ = chunks.score_rows(
                self.plan.take(inputs.ref_hidden), self.targets, inputs.ref_weight, opts.ref_scale, self.fold,
                self.chunk_bytes, softcap=opts.ref_softcap, bias=inputs.ref_bias, scratch=self.scratch,
            )
            ref_sums = self.plan.sequence_sums(self.weighted(ref_logp))
            return ref_sums / self.count if opts.reduction == "mean" else ref_sums
        if inputs.ref_scores is not None:
            return inputs.ref_scores
        return torch.zeros(self.n2, dtype=torch.float32, device=self.device)  # reference-free

    def forward_only(self, h: Tensor, inputs: OpInputs, ref_scores: Tensor, hits: Tensor):
        """The loss, sums and hits without gradients: every chunk scored once, nothing kept."""
        opts = self.opts
        _, logp, hit, log_sum_sq = chunks.score_rows(
            h, self.targets, inputs.weight, opts.scale, self.fold, self.chunk_bytes, hits=opts.count_hits,
            with_wpo=self.with_wpo, softcap=opts.softcap, bias=inputs.bias, scratch=self.scratch,
        )
        sums = self.plan.sequence_sums(self.weighted(logp))
        if hit is not None:
            hits.index_add_(0, self.plan.seq, hit.long())
        pair_w = None
        if self.with_wpo:
            plain = sums if self.weights is None else self.plan.sequence_sums(logp)
            pair_w = wpo_weights(plain, self.plan.sequence_sums(log_sum_sq), self.tokens)
        loss = pair_losses(sums, ref_scores, self.count, opts.loss, opts.reduction, weights=pair_w).mean()
        return loss, sums, ref_scores, hits, None, None, None

    def kept(self, group: Group) -> Tensor:
        """The (keep, V) rows of the held buffer where the group's kept logits live between the
        passes (the same view each time it is asked for, until the buffer is remade)."""
        return self.scratch.rows(group.keep, self.v, self.zdtype, self.device)

    def score_group(self, hg: Tensor, yg: Tensor, seq: Tensor, group: Group, inputs: OpInputs,
                    hits: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Pass 1: the group's rows scored, its kept rows' logits left in :meth:`kept` (as the
        fold leaves them: probabilities or logits); (row stats, log-probs, WPO's log sum_v p_v^2)."""
        opts, m, keep = self.opts, hg.shape[0], group.keep
        kept = self.kept(group)
        # The kept rows in one product (the more rows a product has, the less each costs, see
        # chunks.chunk_slices) where it needs no temporary; the rest in chunks.
        whole = keep > 0 and chunks.direct_product(self.zdtype, inputs.weight)
        parts = [slice(0, keep)] if whole else chunks.chunk_slices(keep, self.rows_per_chunk)
        parts += chunks.chunk_slices(m, self.rows_per_chunk, keep)
        chunk_buffer = None
        row_stats = torch.empty(2, m, dtype=torch.float32, device=self.device)
        logp = torch.empty(m, dtype=torch.float32, device=self.device)
        log_sum_sq = torch.empty(m, dtype=torch.float32, device=self.device) if self.with_wpo else None
        for c in parts:
            if c.stop <= keep:
                z = kept[c]
            else:
                if chunk_buffer is None:
                    chunk_buffer = chunks.rows_buffer(self.rows_per_chunk, self.v, self.zdtype, self.device)
                z = chunk_buffer[: c.stop - c.start]
            chunks.logits_into(z, hg[c], inputs.weight, opts.scale, inputs.bias)
            if opts.count_hits:  # before the fold may turn kept logits into probabilities
                hits.index_add_(0, seq[c], (z.argmax(-1) == yg[c]).long())
            row_stats[:, c], logp[c] = self.fold.stats(
                z, yg[c], keep=c.stop <= keep, sq_out=log_sum_sq[c] if self.with_wpo else None, softcap=opts.softcap
            )
        return row_stats, logp, log_sum_sq

    def group_losses(self, sums: Tensor, index: Tensor, both: Tensor, ref_scores: Tensor, wpo64: Tensor | None,
                     weighted: bool) -> Tensor:
        """The group's per-pair losses of its sequences' sums ``sums`` (WPO's pair weights from
        the scores themselves when unweighted: ``wpo_weights`` detaches them)."""
        opts, pair_w = self.opts, None
        if self.with_wpo:
            plain = sums if not weighted else wpo64[1].float()[both]  # rounded as sums is
            pair_w = wpo_weights(plain, wpo64[0][both], self.tokens[both])
        return pair_losses(sums, ref_scores[both], self.count[both], opts.loss, opts.reduction, pairs=index,
                           batch_count=self.count, weights=pair_w)

    def loss_gradient(self, group: Group, sums64: Tensor, ref_scores: Tensor, wpo64: Tensor | None,
                      weighted: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(the group's pair indices, their losses, d(mean loss)/d(sum) of each of the batch's
        sequences, zero outside the group): from the group's scores alone, by autograd."""
        index = torch.arange(group.pairs[0], group.pairs[-1] + 1, device=self.device)  # consecutive: no host copy
        both = torch.cat((index, index + self.b))
        with autograd_inside_op():
            leaf = sums64.float()[both].detach().requires_grad_()
            losses = self.group_losses(leaf, index, both, ref_scores, wpo64, weighted)
            (dsums,) = torch.autograd.grad(losses.sum() * (1.0 / self.b), leaf)
        g_of_seq = torch.zeros(self.n2, dtype=torch.float32, device=self.device)
        g_of_seq[both] = dsums.float()
        return index, losses.detach(), g_of_seq

    def group_grads(self, group: Group, hg: Tensor, yg: Tensor, row_stats: Tensor, g: Tensor, inputs: OpInputs,
                    needs: Needs, grad_w, grad_b) -> Tensor | None:
        """Pass 2: the kept rows meet the two gradient products (chunks.kept_grads); the rest are
        recomputed chunk by chunk, in the held buffer once the kept rows are done with it.
        Returns the group's rows of d hidden (None: not needed)."""
        opts, keep, m = self.opts, group.keep, hg.shape[0]
        grad_h = torch.empty_like(hg) if needs.hidden else None
        kept = self.kept(group)
        if keep:
            chunks.kept_grads(
                kept, row_stats[:, :keep], yg[:keep], g[:keep], hg[:keep], inputs.weight, opts.scale, self.fold,
                grad_h[:keep] if grad_h is not None else None, grad_w, opts.softcap, grad_b,
            )
        del kept  # (no view of the buffer outlives the kept rows: recomputing may remake it)
        if keep < m:
            rest = chunks.row_grads(
                hg[keep:], yg[keep:], inputs.weight, opts.scale, self.fold, row_stats[:, keep:], g[keep:],
                self.chunk_bytes, grad_w, needs.hidden, opts.softcap, inputs.bias, grad_b, self.scratch,
            )
            if grad_h is not None:
                grad_h[keep:] = rest
        return grad_h


def dpo_head_impl(inputs: OpInputs, opts: HeadOptions, needs: Needs):
    """The op's body; see :func:`dpo_head` for the arguments and results: the reference scored,
    then, without gradients, the policy scored once; with them, group by group, the policy's
    rows scored (their logits kept), the group's loss gradient taken, and the kept logits made
    into the head's gradients."""
    step = _Step(inputs, opts)
    groups = step.plan_groups(inputs.weight) if needs.any else None
    ref_scores = step.reference_scores(inputs)
    h = step.plan.take(inputs.hidden)
    hits = torch.zeros(step.n2 if opts.count_hits else 0, dtype=torch.int64, device=step.device)
    if not needs.any:
        return step.forward_only(h, inputs, ref_scores, hits)
    grad_rows = torch.empty_like(h) if needs.hidden else None
    grad_w = chunks.WeightGrad(inputs.weight) if needs.weight else None
    grad_b = chunks.BiasGrad(inputs.bias) if needs.bias else None
    sums64 = torch.zeros(step.n2, dtype=torch.float64, device=step.device)  # see RowPlan.sequence_sums
    # WPO: per sequence, sum_t log sum_v p_v^2 and (with LD weights) the unweighted sum_t log p_t
    wpo64 = torch.zeros(2, step.n2, dtype=torch.float64, device=step.device) if step.with_wpo else None
    losses = torch.empty(step.b, dtype=torch.float32, device=step.device)
    for group in groups:
        spans = group.spans
        hg, yg, seq = _cat_rows(h, spans), _cat_rows(step.targets, spans), _cat_rows(step.plan.seq, spans)
        wg = _cat_rows(step.weights, spans) if step.weights is not None else None
        row_stats, logp, log_sum_sq = step.score_group(hg, yg, seq, group, inputs, hits)
        sums64.index_add_(0, seq, (logp if wg is None else logp * wg).double())
        if step.with_wpo:
            wpo64[0].index_add_(0, seq, log_sum_sq.double())
            if wg is not None:
                wpo64[1].index_add_(0, seq, logp.double())
        index, group_losses, g_of_seq = step.loss_gradient(group, sums64, ref_scores, wpo64, wg is not None)
        losses[index] = group_losses
        g = g_of_seq.index_select(0, seq)
        if wg is not None:
            g = g * wg
        grad_h = step.group_grads(group, hg, yg, row_stats, g, inputs, needs, grad_w, grad_b)
        if grad_rows is not None:
            start = 0
            for s in spans:
                grad_rows[s] = grad_h[start : start + s.stop - s.start]
                start += s.stop - s.start
    grad_hidden = step.plan.put(grad_rows).to(inputs.hidden.dtype) if grad_rows is not None else None
    grad_weight = None
    if grad_w is not None:
        grad_weight = grad_w.result() if grad_w.value is not None else torch.zeros_like(inputs.weight)
    grad_bias = grad_b.result() if grad_b is not None else None
    return losses.mean(), sums64.float(), ref_scores, hits, grad_hidden, grad_weight, grad_bias


# ----------------------------------------------------------------------------- custom op


def _split(args) -> tuple[OpInputs, HeadOptions, Needs]:
    """The op's positional arguments (its schema's order) by name."""
    n, k = len(OpInputs._fields), len(Needs._fields)
    return OpInputs(*args[:n]), from_op_args(args[n:-k]), Needs(*args[-k:])


def _dpo_head_body(*args) -> tuple[Tensor, ...]:
    inputs, opts, needs = _split(args)
    loss, sums, ref, hits, grad_h, grad_w, grad_b = dpo_head_impl(inputs, opts, needs)
    if inputs.ref_scores is not None and ref is inputs.ref_scores:
        ref = ref.clone()  # a custom op's outputs may not alias its inputs or each other
    like = inputs.hidden
    return loss, sums, ref, hits, _or_empty(grad_h, like), _or_empty(grad_w, like), _or_empty(grad_b, like)


_dpo_head_op = torch.library.custom_op("fastdpo::dpo_head", _dpo_head_body, mutates_args=(), schema=op_schema())


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0)


@_dpo_head_op.register_fake
def _(*args):
    inputs, opts, needs = _split(args)
    hidden = inputs.hidden
    n2 = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        torch.empty((), **f32),
        torch.empty(n2, **f32),
        torch.empty(n2, **f32),
        torch.empty(n2 if opts.count_hits else 0, dtype=torch.int64, device=hidden.device),
        torch.empty_like(hidden) if needs.hidden else hidden.new_empty(0),
        torch.empty_like(inputs.weight) if needs.weight else hidden.new_empty(0),
        torch.empty_like(inputs.bias) if needs.bias else hidden.new_empty(0),
    )


_POSITION = {name: i for i, name in enumerate(OpInputs._fields)}  # a tensor argument's place in the schema


def _setup_context(ctx, inputs, output):
    # save_for_backward keeps the gradients while the graph is retained (a second backward
    # after backward(retain_graph=True) sees them again) and frees them with the graph.
    ctx.save_for_backward(output[4], output[5], output[6])
    ctx.needs = Needs(*inputs[-len(Needs._fields):])
    ctx.inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    # Outputs nobody differentiates get None in backward, not zeros of their size (a zeros
    # tensor the size of the logits, or of the head weight, per step otherwise).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    grads = [None] * ctx.inputs
    if grad_loss is None:  # the loss took no part in what is differentiated
        return tuple(grads)
    # A new tensor even when grad_loss is 1: autograd may accumulate into what it is given.
    for name, g in (("hidden", grad_h), ("weight", grad_w), ("bias", grad_b)):
        i = _POSITION[name]
        if getattr(ctx.needs, name) and ctx.needs_input_grad[i]:
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
    inputs = OpInputs(hidden, weight, targets, mask, count, token_weights, ref_hidden, ref_weight, ref_scores, bias,
                      ref_bias)
    loss, sums, ref, hits, _, _, _ = _dpo_head_op(*inputs, *to_op_args(opts), *Needs(need_hidden, need_weight, need_bias))
    return loss, sums, ref, hits
