"""Scoring sequences with a model: one path for the policy and the reference.

Dimensions: N sequences (2B for B pairs), L tokens, T = L - 1 input positions, D hidden size,
V vocabulary.

A preference module (:class:`fastdpo.DPO`) turns token ids into a :class:`Batch` (inputs,
targets, the positions that count, their counts, a packed layout when prompts are shared),
then asks a :class:`Scorer` for each model's :class:`HeadInput` -- what the model's body (the
network below its output head) gives the head: its hidden states and head weight when the head
is fused, else its logits -- and for the per-sequence sums of target log-probs of one.  The
route from a model to its head input is decided once per model and device
(:meth:`Scorer.route`), one of :class:`RouteKind`:

* ``"dpo_head"`` -- the fused head with a loss that treats each pair on its own: the DPO
  module hands both models' head inputs to one op,
  :func:`fastdpo.scoring.dpo_head_op.run_dpo_head`, which scores the reference and makes the
  policy's loss and head gradients in forward;
* ``"fused"`` -- the fused head where the DPO head op does not apply (a loss that couples pairs,
  another family, the Triton GEMM kernels): :func:`fastdpo.linear_sequence_logprobs` scores
  each head input, then the loss is computed;
* ``"logits"`` -- a model whose head cannot be fused: :func:`fastdpo.sequence_logprobs`
  scores its logits without a log-softmax tensor.

A fused step small enough (:func:`fastdpo.scoring.logits_op.is_small`) builds its logits from
the hidden states and scores them as the logits route does: at that size the fused machinery
costs more than the work.

A head inferred for a model whose forward fastdpo has not read (``LinearHead.inferred``: a
Hugging Face class outside ``HEAD_RULES``) is checked against the model's own logits on its
first call (:func:`check_head`, :meth:`Scorer.checked_route`) before a fused route is trusted;
a failed check turns the route into ``"logits"``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from enum import Enum

import torch
from torch import Tensor, nn

from .. import _checks
from .._checks import YES, Verdict, no
from ..batching.batch import Batch, Padding
from ..batching.sequence_parallel import all_reduce_sum
from ..models import LinearHead, ModelAdapter, adapter_for, eval_mode, gathers, live_bias, live_weight
from . import logits_op as ops
from .linear_op import MATMULS, resolve_matmul, run_linear
from .logits_op import IMPLS, resolve_impl
from .options import ComputeOptions

REDUCTIONS = ("mean", "sum")
ALIGNMENTS = ("input", "target")
HEADS = ("auto", "fused", "logits")

# Autograd nodes that do not keep their output for their own backward: logits produced by one
# of these (a linear head, a scale, the multiply that ends a softcap) can take the gradient in
# place.  Anything else might keep them, so a separate gradient buffer is allocated then.
_OVERWRITABLE_GRAD_FNS = frozenset(
    {
        "UnsafeViewBackward0",
        "ViewBackward0",
        "ReshapeAliasBackward0",
        "MmBackward0",
        "BmmBackward0",
        "AddmmBackward0",
        "MulBackward0",
        "DivBackward0",
        "AddBackward0",
        "ToCopyBackward0",
    }
)


class RouteKind(str, Enum):
    """How a model's outputs become scores (the module docstring says each).  The values before
    the names above (``"pair"`` for ``"dpo_head"``, ``"scores"`` for ``"fused"``) still compare
    equal, with a ``DeprecationWarning``, for one release."""

    DPO_HEAD = "dpo_head"
    FUSED = "fused"
    LOGITS = "logits"

    def __eq__(self, other):
        if isinstance(other, str) and not isinstance(other, RouteKind) and other in _EARLIER_KINDS:
            warnings.warn(f"route kind {other!r} is now {_EARLIER_KINDS[other]!r}", DeprecationWarning, stacklevel=2)
            other = _EARLIER_KINDS[other]
        return self.value == (other.value if isinstance(other, RouteKind) else other)

    def __ne__(self, other):
        return not self == other

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


_EARLIER_KINDS = {"pair": "dpo_head", "scores": "fused"}


@dataclass(frozen=True)
class Route:
    """How one model's outputs become scores on one device."""

    kind: RouteKind
    adapter: ModelAdapter  # the model's family (fastdpo.models)
    impl: str  # "torch" or "triton"
    matmul: str  # fused routes: who multiplies, "torch" or "triton"
    head: LinearHead | None  # the fused head, None on the logits route
    reason: str  # why the head is not fused ("" when it is)

    @property
    def family(self) -> str:
        return self.adapter.family


@dataclass(frozen=True)
class HeadInput:
    """What a model's body (the network below its output head) gives the head for a batch."""

    route: Route
    out: Tensor  # (N, T, D) hidden states when ``weight`` is set, else (N, T, V) logits
    weight: Tensor | None  # the fused head's weight as it is now (FSDP2: gathered)
    aux: Tensor | None = None  # the MoE router's load-balancing loss, when asked (Scorer.head_input)
    bias: Tensor | None = None  # the fused head's bias as it is now (with ``weight``; None: none)
    gathered: bool = False  # ``weight`` is a whole copy gathered from shards for this input (FSDP2)

    @property
    def takes_dpo_head(self) -> bool:
        """Whether the DPO head op scores this input (a fused head on the ``"dpo_head"`` route)."""
        return self.weight is not None and self.route.kind is RouteKind.DPO_HEAD


# The first-call check of an inferred head (check_head): a slice of the batch's first sequence,
# and how far the fused logits may be from the model's own, relative to the largest of them.
CHECK_TOKENS = 16
CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
CHECK_TOL_LOW = 2e-2  # bfloat16, float16: a few ulps of the largest logit


def check_head(adapter: ModelAdapter, head: LinearHead, src: Tensor, padding: Padding | None = None) -> Verdict:
    """Whether ``head`` makes ``adapter``'s model's own logits (to rounding).

    The model's own forward and the fused computation run on the first :data:`CHECK_TOKENS`
    positions of the first sequence of ``src`` (with the batch's ``padding``, the first real
    tokens of its first sequence that has any, unpadded), in eval mode (every module's mode
    restored after), under ``no_grad``: the model's ``logits``, and ``head.logits`` of its
    hidden states.  What it cannot see: a forward whose transform depends on the batch's
    content or length, on training mode, or on positions past the slice; ``head="logits"`` opts
    out of fusing."""
    tokens = src[:1, :CHECK_TOKENS]
    if padding is not None:
        real = padding.mask.bool()
        row = int(real.any(1).long().argmax())  # (a batch of padding alone keeps the first slice)
        if real[row].any():
            tokens = src[row, real[row]][None, :CHECK_TOKENS]
    with torch.no_grad(), eval_mode(adapter.model):
        own = adapter.logits(tokens).float()
        hidden = adapter.hidden(tokens)
        fused = head.logits(hidden, live_weight(head, hidden.dtype), live_bias(head, hidden.dtype)).float()
    if fused.shape != own.shape:
        return no(f"the fused head's logits have shape {tuple(fused.shape)}, the model's {tuple(own.shape)}")
    tol = CHECK_TOL.get(hidden.dtype, CHECK_TOL_LOW)
    err = float((fused - own).abs().max() / own.abs().max().clamp(min=1e-6))
    if not err <= tol:  # NaN too
        return no(f"its first call's own logits differ from {head.inferred} by {err:.2g} of the largest "
                  f"logit (more than {tol:g}): its forward does something else to them")
    return YES


def _own_logits(logits: Tensor) -> bool:
    fn = logits.grad_fn
    return fn is not None and type(fn).__name__ in _OVERWRITABLE_GRAD_FNS


class Scorer:
    """Routes (cached per model and device), bodies and sums, for every model of a module.

    Args: ``compute`` the module's :class:`~fastdpo.scoring.options.ComputeOptions` (checked here;
    the budgets kept as ints, 0 for the device's default, for the ops); ``independent_pairs``: whether the
    module's loss lets the DPO head run (each pair's loss depends on its own scores only);
    ``with_wpo``: whether the policy's ``log sum_v p_v^2`` is needed (WPO), which the Triton GEMM
    kernels do not compute: ``matmul="auto"`` then multiplies with torch, ``matmul="triton"`` is
    a ``ValueError``.
    """

    def __init__(self, compute: ComputeOptions, *, independent_pairs: bool, with_wpo: bool = False):
        self.head = _checks.choice("head", compute.head, HEADS)
        self.impl = _checks.choice("impl", compute.impl, IMPLS)
        self.matmul = _checks.choice("matmul", compute.matmul, MATMULS)
        if with_wpo and compute.matmul == "triton":
            raise ValueError(
                "matmul='triton' (the Triton GEMM kernels) cannot compute log sum_v p_v^2, which "
                "use_weighting=True (WPO) needs: use matmul='auto' or 'torch'"
            )
        self.inplace_backward = bool(compute.inplace_backward)
        self.chunk_bytes = _checks.byte_budget("chunk_bytes", compute.chunk_bytes)
        self.group_bytes = _checks.byte_budget("group_bytes", compute.group_bytes)
        self.independent_pairs = independent_pairs
        self.with_wpo = with_wpo
        self.routes: dict[tuple[int, str], tuple[nn.Module, Route]] = {}
        # inferred heads checked on a first call: (id(model), device, dtype) -> (model, why)
        self.checked: dict[tuple[int, str, torch.dtype], tuple[nn.Module, Verdict]] = {}

    def route(self, model: nn.Module, device: torch.device | str) -> Route:
        """``model``'s :class:`Route` on ``device``, decided on the first call there and kept
        (``head="fused"`` raises on any call whose model cannot be fused)."""
        device = torch.device(device)
        if torch.compiler.is_compiling():  # traced: decided again, folded into the graph
            return self._decide(model, device)
        key = (id(model), str(device))
        cached = self.routes.get(key)
        if cached is not None and cached[0] is model:
            return cached[1]
        decided = self._decide(model, device)
        self.routes[key] = (model, decided)
        return decided

    def forget(self, model: nn.Module) -> None:
        """Drop what is cached for ``model`` (its routes hold it, through their adapter): a
        module whose reference model is dropped (precomputed scores) lets it be freed."""
        for cache in (self.routes, self.checked):
            for key in [k for k, (m, _) in cache.items() if m is model]:
                del cache[key]

    def _decide(self, model: nn.Module, device: torch.device) -> Route:
        impl = resolve_impl(self.impl, device)
        adapter = adapter_for(model)
        if self.head == "logits":
            return Route(RouteKind.LOGITS, adapter, impl, "torch", None, "head='logits' was asked for")
        head, why = adapter.head()
        if head is None:
            if self.head == "fused":
                raise ValueError(f"head='fused' but the model's head cannot be fused: {why}")
            return Route(RouteKind.LOGITS, adapter, impl, "torch", None, why)
        matmul = "torch" if self.with_wpo else resolve_matmul(self.matmul, impl, head.weight, head.softcap, head.has_bias)
        kind = RouteKind.DPO_HEAD if matmul == "torch" and self.independent_pairs else RouteKind.FUSED
        return Route(kind, adapter, impl, matmul, head, "")

    @staticmethod
    def small(route: Route, batch: Batch) -> bool:
        """Whether a fused head's step is small enough to build its logits and score them as
        the logits route does (:func:`fastdpo.scoring.logits_op.is_small`, on the torch path)."""
        return route.impl == "torch" and ops.is_small(batch.src.numel() * route.head.weight.shape[0])

    def uses_dpo_head(self, route: Route, batch: Batch) -> bool:
        """Whether the DPO head op scores this route's inputs of ``batch`` (:attr:`HeadInput.takes_dpo_head`)."""
        return route.kind is RouteKind.DPO_HEAD and not self.small(route, batch)

    def checked_route(self, model: nn.Module, batch: Batch) -> Route:
        """``model``'s :meth:`route` for ``batch``, an inferred head (``head.inferred``) checked
        first (:meth:`_checked`): what :meth:`head_input` runs, and what decides whether the DPO head op
        can take the policy."""
        route = self.route(model, batch.src.device)
        if route.head is not None and route.head.inferred:
            route = self._checked(model, route, batch)
        return route

    def _checked(self, model: nn.Module, route: Route, batch: Batch) -> Route:
        """``route`` once its inferred head (``head.inferred``) has passed :func:`check_head` on
        this model, device and dtype (checked here on the first call, outside a compiled
        graph); the logits route when it failed, or when a compiled graph meets it unchecked
        (``head="fused"``: a ``ValueError``)."""
        head = route.head
        key = (id(model), str(batch.src.device), head.weight.dtype)
        done = self.checked.get(key)
        if done is not None and done[0] is model:
            fused = done[1]
        elif torch.compiler.is_compiling():
            fused = no("its inferred head is checked on an eager first call, and this one is compiled")
        else:
            fused = check_head(route.adapter, head, batch.src, batch.padding)
            self.checked[key] = (model, fused)
            if not fused and self.head != "fused":
                warnings.warn(f"fastdpo will score this model's logits: {fused.why_not}; pass head='logits' to "
                              f"silence this", stacklevel=4)
        if fused:
            return route
        if self.head == "fused":
            raise ValueError(f"head='fused' but the model's head cannot be fused: {fused.why_not}")
        fallback = replace(route, kind=RouteKind.LOGITS, matmul="torch", head=None, reason=fused.why_not)
        if not torch.compiler.is_compiling():
            self.routes[(id(model), str(batch.src.device))] = (model, fallback)
        return fallback

    def head_input(self, model: nn.Module, batch: Batch, router: bool = False) -> HeadInput:
        """``model``'s :class:`HeadInput` of ``batch`` (on the packed layout when it has one; told of
        its padding when it carries one, :attr:`Batch.padding`).

        With ``router`` (an MoE model, :meth:`~fastdpo.models.ModelAdapter.router`; unpacked
        batches) the model runs as TRL 1.16 runs it for its router's load-balancing loss: on
        the whole sequences (N, L) with the attention mask of their real tokens (and their
        positions), asked for ``output_router_logits``; ``HeadInput.aux`` is the forward's
        ``aux_loss`` and the head input the first L - 1 positions' (a causal model's are the same)."""
        route = self.checked_route(model, batch)
        adapter, head = route.adapter, route.head
        fused = head is not None
        if router:
            if batch.packed is not None:
                raise ValueError("the router's load-balancing loss is computed on unpacked batches")
            seq = batch.seq
            real = batch.real if batch.real is not None else torch.ones_like(seq, dtype=torch.bool)
            aux: list = []
            run = adapter.hidden if fused else adapter.logits
            out = run(seq, padding=Padding.of(real), aux=aux)[:, :-1]
            return self._with_head(route, batch, out, aux[0])
        if batch.shard is not None:  # this process's slots of the packed rows: (s, D) or (s, V), as they are
            sh = batch.shard
            out = (adapter.hidden(sh.tokens, sh) if fused else adapter.logits(sh.tokens, sh))[0]
        elif batch.packed is not None:  # run on the packed rows, gathered back to the unpacked ones
            out = adapter.hidden(batch.packed.tokens, batch.packed) if fused else adapter.logits(batch.packed.tokens, batch.packed)
            out = out.reshape(-1, out.shape[-1])[batch.packed.rows[: batch.src.shape[0]]]
        else:  # told of the padding only when it asked to be (a family that never asks takes no such argument)
            told = {} if batch.padding is None else {"padding": batch.padding}
            out = adapter.hidden(batch.src, **told) if fused else adapter.logits(batch.src, **told)
        return self._with_head(route, batch, out)

    def _with_head(self, route: Route, batch: Batch, out: Tensor, aux: Tensor | None = None) -> HeadInput:
        """The :class:`HeadInput` of a model's output ``out``: logits as they are; hidden states with
        the head's live weight, or made into logits when the step is small."""
        head = route.head
        if head is None:
            return HeadInput(route, out, None, aux)
        weight, bias = live_weight(head, out.dtype), live_bias(head, out.dtype)
        if self.small(route, batch):
            return HeadInput(route, head.logits(out, weight, bias), None, aux)
        return HeadInput(route, out, weight, aux, bias, gathered=gathers(head))

    def sums(
        self, inputs: HeadInput, batch: Batch, *, count_hits: bool = False, inplace: bool = True, with_wpo: bool = False
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(N,) float32 sums of target log-probs (weighted by ``batch.token_weights``) of a head input
        that the DPO head op does not score; with ``count_hits``, the (N,) number of scored targets
        that are the argmax of their logits (not on the Triton GEMM route, whose logits never
        leave the kernels); with ``with_wpo``, WPO's (2, N) detached sums (``sum_t log sum_v p_v^2``,
        the unweighted ``sum_t log p_t``).  ``inplace=False`` keeps the logits intact in
        backward (for logits another op reads), whatever ``inplace_backward`` says."""
        if batch.shard is not None:
            return self._shard_sums(inputs, batch, count_hits, inplace, with_wpo)
        route = inputs.route
        w = batch.token_weights
        if inputs.weight is not None:
            head = route.head
            sums, wpo = run_linear(inputs.out, inputs.weight, batch.tgt, batch.mask, head.scale, route.impl, route.matmul,
                                   w, with_wpo, softcap=head.softcap, bias=inputs.bias, chunk_bytes=self.chunk_bytes)
            return sums, None, wpo
        hits = None
        if count_hits:  # before backward may overwrite the logits
            with torch.no_grad():
                hits = ((inputs.out.argmax(-1) == batch.tgt) & batch.mask).sum(-1)
        # (a compiled graph cannot look at grad_fn: it takes a fresh gradient buffer)
        inplace = inplace and self.inplace_backward and not torch.compiler.is_compiling() and _own_logits(inputs.out)
        targets, mask = ops.check_logprob_inputs(inputs.out, batch.tgt, batch.mask)
        sums, wpo = ops.run_logprobs(inputs.out, targets, mask, route.impl, inplace, w, with_wpo)
        return sums, hits, wpo

    def _shard_sums(self, inputs: HeadInput, batch: Batch, count_hits: bool, inplace: bool, with_wpo: bool):
        """:meth:`sums` under sequence parallelism: this process scores the targets of its own
        slots (each a sequence of one position), adds them up per sequence, and the sums (hits,
        WPO's sums) are summed over the group (:func:`~fastdpo.batching.sequence_parallel.all_reduce_sum`).
        A process with no target to score still joins every collective, forward and backward."""
        sh = batch.shard
        n, t = batch.tgt.shape
        mine, slot = sh.scored(batch.mask)
        seq = mine // t
        weights = batch.token_weights
        # this process's targets, each its own sequence of one position (src: never run)
        targets = batch.tgt.reshape(-1)[mine][:, None]
        local = Batch(targets, targets, torch.ones_like(targets, dtype=torch.bool),
                      torch.ones(targets.shape[0], device=targets.device),
                      token_weights=None if weights is None else weights.reshape(-1)[mine][:, None])
        sums = inputs.out.new_zeros(n, dtype=torch.float32)
        if inputs.out.requires_grad:  # tie to the graph even with nothing to score, so backward reaches the collectives
            sums = sums + 0.0 * inputs.out.sum().float()
        hits = wpo = None
        if mine.numel():
            part = replace(inputs, out=inputs.out.index_select(0, slot)[:, None])
            got, got_hits, got_wpo = self.sums(part, local, count_hits=count_hits, inplace=inplace, with_wpo=with_wpo)
            sums = sums.index_add(0, seq, got)
            hits = None if got_hits is None else torch.zeros(n, dtype=got_hits.dtype, device=seq.device).index_add(0, seq, got_hits)
            wpo = None if got_wpo is None else got_wpo.new_zeros(2, n).index_add(1, seq, got_wpo)
        if count_hits and hits is None and inputs.weight is None:
            hits = torch.zeros(n, dtype=torch.long, device=seq.device)
        if with_wpo and wpo is None:
            wpo = sums.new_zeros(2, n)
        group = sh.group
        return (all_reduce_sum(sums, group), None if hits is None else all_reduce_sum(hits, group),
                None if wpo is None else all_reduce_sum(wpo, group))

