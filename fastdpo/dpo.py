"""The drop-in ``DPO`` module.

Data flows one way: (preferred, unpreferred, masks) -> one concatenated batch of 2B sequences
-> model (reference under no_grad, then policy) -> sequence log-probs -> pair loss -> scalar.

A :class:`Route` from the model to the scores is decided once per model and device
(:meth:`DPO.route`):

* ``"pair"`` -- the fused head (x-transformers ``TransformerWrapper`` with a plain linear or
  tied head, :mod:`fastdpo.heads`; Hugging Face causal LMs, :mod:`fastdpo.hf`) with a loss
  that each pair's own scores determine: the models run for their hidden states and one op,
  :func:`fastdpo.fused_pair.dpo_head`, scores the reference and makes the policy's loss and head gradients in forward; no
  (2B, L-1, V) logits ever exist;
* ``"scores"`` -- the fused head with a loss that couples pairs (BCO's batch shift), or with
  the Triton GEMM kernels (``matmul="triton"``): :func:`fastdpo.linear_sequence_logprobs`
  scores both models, the loss follows, backward recomputes the logits chunk by chunk;
* ``"logits"`` -- any other model: it returns logits and :func:`fastdpo.sequence_logprobs`
  scores them without a log-softmax tensor.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _checks, hf, ops, packing
from .fused_pair import call_dpo_head
from .heads import LinearHead, eval_mode, find_linear_head, live_weight
from .linear import MATMULS, linear_sequence_logprobs, resolve_matmul
from .losses import SIMPO_GAMMA, check_loss_config, pair_losses, reward_metrics
from .ops import IMPLS, resolve_impl, sequence_logprobs

REDUCTIONS = ("mean", "sum")
ALIGNMENTS = ("input", "target")
HEADS = ("auto", "fused", "logits")

# Autograd nodes that do not keep their output for their own backward: logits produced by one
# of these (a linear head, a scale) can take the gradient in place.  Anything else (a softcap's
# tanh, say) might, so DPO then allocates a separate gradient buffer.
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


def _remap_cell(cell: types.CellType, memo: dict[int, object]) -> types.CellType:
    try:
        value = cell.cell_contents
    except ValueError:  # an empty cell
        return types.CellType()
    return types.CellType(memo.get(id(value), value))


def deepcopy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also re-points closures over the original at the copy.

    ``copy.deepcopy`` copies a function attribute by reference, so a head stored as a closure
    over the original module (x-transformers' ``tie_embedding=True`` head is
    ``lambda t: t @ self.token_emb.emb.weight.t() * scale``) would keep reading the
    *original's* live weights from inside the copy: x-transformers' own DPO has that flaw,
    and its reference model drifts with the policy's embedding during training.  Function
    attributes of the copy's submodules are rebuilt over the copied objects.
    """
    memo: dict[int, object] = {}
    copy = deepcopy(model, memo)
    for module in copy.modules():
        for name, fn in list(vars(module).items()):
            if isinstance(fn, types.FunctionType) and fn.__closure__:
                cells = tuple(_remap_cell(c, memo) for c in fn.__closure__)
                rebuilt = types.FunctionType(
                    fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells
                )
                rebuilt.__kwdefaults__ = fn.__kwdefaults__
                setattr(module, name, rebuilt)
    return copy


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` sharing nothing with it (:func:`deepcopy_module`), frozen."""
    copy = deepcopy_module(model)
    for p in copy.parameters():
        p.requires_grad = False
    return copy


def _argmax_hits(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """(N,) count of scored positions whose target is the argmax of its logits."""
    with torch.no_grad():
        return ((logits.argmax(-1) == targets) & mask).sum(-1)


def _small_head(route: Route, src: Tensor) -> bool:
    """Whether a fused head's step is small enough that building its logits is cheaper than
    the fused op's machinery: the torch path, eagerly, at most ``fastdpo.ops.SMALL_ELEMENTS``
    logits per model (the threshold of sequence_logprobs' small-input path, which then scores
    them in a few plain autograd ops: at that size a step's head is dispatch, not work)."""
    return (
        route.head is not None
        and route.impl == "torch"
        and src.numel() * route.head.weight.shape[0] <= ops.SMALL_ELEMENTS
        and not torch.compiler.is_compiling()
    )


def _head_logits(hidden: Tensor, weight: Tensor, head: LinearHead) -> Tensor:
    """The logits the model's own head makes from its hidden states (product, then scale)."""
    z = torch.nn.functional.linear(hidden, weight)
    return z * head.scale if head.scale is not None else z


def _own_logits(logits: Tensor) -> bool:
    fn = logits.grad_fn
    return fn is not None and type(fn).__name__ in _OVERWRITABLE_GRAD_FNS


@dataclass(frozen=True)
class Route:
    """How :class:`DPO` turns one model's outputs into scores on one device."""

    kind: str  # "pair", "scores" or "logits" (see the module docstring)
    family: str  # "hf" (a Hugging Face model, fastdpo.hf) or "module" (any other)
    impl: str  # "torch" or "triton"
    matmul: str  # fused routes: who multiplies, "torch" or "triton"
    head: LinearHead | None  # the fused head, None on the logits route
    reason: str  # why the head is not fused ("" when it is)


class DPO(nn.Module):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) around a model.

    A drop-in for ``x_transformers.dpo.DPO``: same constructor, attributes and ``forward``,
    same loss and gradients by default, computed without any (2B, L, V) log-softmax and, for
    ``TransformerWrapper`` models, without any (2B, L, V) logits.

    Args:
        model: maps token ids (B, L) to logits (B, L, V), returned as a tensor or as an output
            with ``.logits``: an x-transformers ``TransformerWrapper`` (also inside
            ``torch.compile``), a Hugging Face causal LM or a ``peft`` model around one
            (:mod:`fastdpo.hf`; right padding only), any such module.  It becomes
            ``policy_model``; ``ref_model`` is a frozen deep copy (see :func:`frozen_copy`:
            unlike x-transformers' copy, it shares no weights with the policy, also when the
            head is tied to the embedding) -- except for a ``peft`` model, whose reference is
            itself with its adapters disabled (``ref_model`` is then None; see
            :meth:`has_reference`).
        beta: inverse temperature of the DPO loss, > 0.
        pad_id: when given, a missing sequence mask becomes ``seq != pad_id``.
        logprob_reduction: how token log-probs make a sequence score.  ``"mean"`` (default,
            x-transformers): masked mean, with the count clamped at 1e-5 so an empty completion
            scores 0.  ``"sum"`` (the DPO paper, TRL): masked sum.
        mask_alignment: which mask position decides whether the log-prob of target token
            ``seq[:, j + 1]`` counts.  ``"input"`` (default, x-transformers): the mask at input
            position j, i.e. ``mask[:, :-1]`` -- the first completion token is not scored and
            the token after the last unmasked one is.  ``"target"`` (the DPO paper, TRL): the
            mask at the target position, ``mask[:, 1:]``.
        head: ``"auto"`` (default) fuses the head product into the loss whenever
            :func:`fastdpo.heads.find_linear_head` can reproduce the model's head exactly, and
            scores logits otherwise (warning once with the reason); ``"fused"`` insists (a
            ``ValueError`` with the reason, at construction and at any call that cannot fuse);
            ``"logits"`` always scores the model's logits.  A model wrapped or changed after
            construction is looked at again on its first call on each device.  On the torch
            path, a fused step with at most ``fastdpo.ops.SMALL_ELEMENTS`` (65536) logits per
            model builds them from the hidden states (the same product and scale) and scores
            them with plain ops: at that size the step's head is dispatch, not work.
        impl: "auto" (Triton kernels for CUDA tensors, torch otherwise), "torch" or "triton",
            for every route (see :func:`fastdpo.sequence_logprobs` and
            :func:`fastdpo.linear_sequence_logprobs`).
        matmul: on the fused head with ``impl`` resolving to "triton": who multiplies,
            "torch" (the library's products, cuBLAS on CUDA, over completion rows, with
            Triton kernels for the elementwise work: three products a step), "triton" (the
            Triton GEMM kernels over every row, backward recomputing) or "auto"
            (:func:`fastdpo.cost_model.choose_matmul`).
        inplace_backward: on the logits route, let the policy's logits (created by this
            module's own call to the model) take their gradient in place, so the loss adds no
            (2B, L-1, V) buffer to them.  Used only when they come straight from a linear head.
        loss_type, label_smoothing, loss_weights, gamma, bco_delta: the pair loss, see
            :func:`fastdpo.losses.preference_loss` (default ``"sigmoid"`` with no smoothing:
            x-transformers' loss, bitwise).  With ``logprob_reduction="sum"`` the types
            defined on per-token averages (``ipo``, ``simpo``, ``sigmoid_norm``) get the token
            counts and normalize as their authors define them; ``sigmoid_norm`` needs that
            (with mean scores it would be plain ``sigmoid``).
        reference_free: score against a zero reference (TRL's ``reference_free``); no
            reference copy is made.  Reference-free loss types (``simpo``) make none either.
        share_prompt: run each pair as one packed sequence ``[prompt, chosen completion,
            rejected completion]`` (:mod:`fastdpo.packing`), so both models run the prompt
            once; the scores are the unpacked ones to float rounding.  Each pair's prompt must
            be a prefix, equal in both sequences, with right padding (else ``ValueError``
            naming the pair); a model that cannot pack raises at construction, or on its first
            call when packing changes its hidden states (:meth:`_check_packing`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.1,
        pad_id: int | None = None,
        logprob_reduction: str = "mean",
        mask_alignment: str = "input",
        head: str = "auto",
        impl: str = "auto",
        matmul: str = "auto",
        inplace_backward: bool = True,
        loss_type: str | list[str] = "sigmoid",
        label_smoothing: float = 0.0,
        loss_weights: list[float] | None = None,
        gamma: float = SIMPO_GAMMA,
        bco_delta: float | str | Tensor = 0.0,
        reference_free: bool = False,
        share_prompt: bool = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        hf.check_peft(model)
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        self.pad_id = pad_id
        self.logprob_reduction = _checks.choice("logprob_reduction", logprob_reduction, REDUCTIONS)
        self.mask_alignment = _checks.choice("mask_alignment", mask_alignment, ALIGNMENTS)
        self.head = _checks.choice("head", head, HEADS)
        self.impl = _checks.choice("impl", impl, IMPLS)
        self.matmul = _checks.choice("matmul", matmul, MATMULS)
        self.inplace_backward = bool(inplace_backward)
        if not isinstance(share_prompt, bool):
            raise TypeError(f"share_prompt must be a bool, got {type(share_prompt).__name__}")
        self.share_prompt = share_prompt
        if share_prompt:
            why = packing.check_model(model)
            if why:
                raise ValueError(f"share_prompt=True but this model cannot share its prompt: {why}")
        self._packing_checked: set[str] = set()
        if head != "logits":
            found, why = find_linear_head(model)
            if found is None and head == "fused":
                raise ValueError(f"head='fused' but the model's head cannot be fused: {why}")
            if found is None:  # said once, here, not at every step
                warnings.warn(
                    f"fastdpo.DPO will score this model's logits (no fused head, so (2B, L-1, V) "
                    f"logits are built): {why}; pass head='logits' to silence this",
                    stacklevel=2,
                )
        # Checks beta too (the one place it is checked).
        self.loss = check_loss_config(
            loss_type, beta, label_smoothing, loss_weights, gamma=gamma, bco_delta=bco_delta
        )
        self.beta = self.loss.beta
        if self.loss.needs_lengths and self.logprob_reduction != "sum":
            raise ValueError(
                "loss_type 'sigmoid_norm' length-normalizes summed log-probs: it needs "
                "logprob_reduction='sum' (with the default 'mean' it would be plain 'sigmoid')"
            )
        self.reference_free = bool(reference_free)
        self.policy_model = model
        needs_reference = self.loss.needs_reference and not self.reference_free
        # A peft policy's reference is itself with its adapters off: no copy (as TRL does).
        self._ref_is_base = needs_reference and hf.peft_model(model) is not None
        self.ref_model = frozen_copy(model) if needs_reference and not self._ref_is_base else None
        self._hf = hf.causal_lm(model) is not None
        self._routes: dict[tuple[int, str], tuple[nn.Module, Route]] = {}

    def parameters(self, recurse: bool = True):
        """The policy's parameters only (the reference model is frozen), as x-transformers;
        for a ``peft`` policy, its trainable parameters only (the adapters')."""
        if hf.peft_model(self.policy_model) is not None:
            return (p for p in self.policy_model.parameters(recurse) if p.requires_grad)
        return self.policy_model.parameters(recurse)

    # ------------------------------------------------------------------------- routes

    def route(self, model: nn.Module, device: torch.device | str) -> Route:
        """The :class:`Route` this module takes for ``model`` (its policy or reference) on
        ``device``: decided on the first call there and kept (``head="fused"`` raises on any
        call whose model cannot be fused)."""
        device = torch.device(device)
        if torch.compiler.is_compiling():  # traced: decided again, folded into the graph
            return self._decide_route(model, device)
        key = (id(model), str(device))
        cached = self._routes.get(key)
        if cached is not None and cached[0] is model:
            return cached[1]
        decided = self._decide_route(model, device)
        self._routes[key] = (model, decided)
        return decided

    def _decide_route(self, model: nn.Module, device: torch.device) -> Route:
        impl = resolve_impl(self.impl, device)
        family = "hf" if hf.causal_lm(model) is not None else "module"
        if self.head == "logits":
            return Route("logits", family, impl, "torch", None, "head='logits' was asked for")
        head, why = find_linear_head(model)
        if head is None:
            if self.head == "fused":
                raise ValueError(f"head='fused' but the model's head cannot be fused: {why}")
            return Route("logits", family, impl, "torch", None, why)
        matmul = resolve_matmul(self.matmul, impl, head.weight)
        pair = matmul == "torch" and self._pair_separable()
        return Route("pair" if pair else "scores", family, impl, matmul, head, "")

    # ------------------------------------------------------------------------- model calls

    @staticmethod
    def _hidden(model: nn.Module, route: Route, src: Tensor) -> Tensor:
        """What ``model``'s fused head consumes: its (N, T, D) hidden states."""
        if route.family == "hf":
            return hf.hidden_states(model, src)
        return hf.module_to_call(model)(src, return_embeddings=True)

    @staticmethod
    def _logits(model: nn.Module, route: Route, src: Tensor) -> Tensor:
        """``model``'s (N, T, V) logits."""
        if route.family == "hf":
            return hf.logits(model, src)
        return hf.logits_of(hf.module_to_call(model)(src))

    def _run(self, model: nn.Module, route: Route, src: Tensor, packed: packing.Packed | None,
             *, hidden: bool) -> Tensor:
        """``model``'s (2B, L-1, D) hidden states or (2B, L-1, V) logits of the batch, from
        the packed pairs with ``share_prompt`` (gathered back to the unpacked rows)."""
        if packed is None:
            return self._hidden(model, route, src) if hidden else self._logits(model, route, src)
        out = packing.run_packed(model, packed, embeddings=hidden)
        return out.reshape(-1, out.shape[-1])[packed.rows]

    def _check_packing(self, preferred, unpreferred, prompt_mask, pref_mask, unpref_mask) -> None:
        """On the first packed call per device: the policy's hidden states of the first pair,
        packed and unpacked, in eval mode, must agree (to float rounding); else
        share_prompt=True raises with what differs."""
        key = str(preferred.device)
        if key in self._packing_checked or torch.compiler.is_compiling():
            return
        one = slice(0, 1)
        masks = [m[one] if m is not None else None for m in (pref_mask, unpref_mask)]
        pk = packing.pack(preferred[one], unpreferred[one], prompt_mask[one], *masks)
        src = torch.cat((preferred[one], unpreferred[one]))[:, :-1]
        model = self.policy_model
        with torch.no_grad(), eval_mode(model):
            route = self.route(model, preferred.device)
            flat = packing.run_packed(model, pk, embeddings=True)
            got = flat.reshape(-1, flat.shape[-1])[pk.rows].float()
            want = self._hidden(model, route, src).float()
        real = torch.cat([m if m is not None else torch.ones_like(prompt_mask[one]) for m in masks])[:, :-1]
        err = ((got - want)[real].abs().max() / want[real].abs().max().clamp(min=1e-30)).item()
        tol = 1e-3 if want.dtype == torch.float32 and flat.dtype == torch.float32 else 3e-2
        if not err <= tol:
            raise ValueError(
                f"share_prompt=True but this model's hidden states change when a pair is packed "
                f"(relative difference {err:.3g} > {tol:g} on the first pair): a feature of the "
                f"model depends on where tokens sit in the sequence beyond their positions"
            )
        self._packing_checked.add(key)

    def has_reference(self) -> bool:
        """Whether a reference model scores the batches (a frozen copy, or a peft policy with
        its adapters off), as opposed to a zero reference or a loss that needs none."""
        return self.ref_model is not None or self._ref_is_base

    @contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The reference model, in eval mode, to call under ``no_grad``."""
        if self.ref_model is not None:
            self.ref_model.eval()
            yield self.ref_model
        else:
            with hf.adapters_disabled(self.policy_model) as ref:
                yield ref

    def _pair_separable(self) -> bool:
        """Whether each pair's loss depends on its own scores only (BCO's batch shift does not)."""
        return not ("bco_pair" in self.loss.loss_type and isinstance(self.loss.bco_delta, str))

    # ------------------------------------------------------------------------- inputs

    def _check_inputs(self, preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask):
        _checks.integer_tokens("preferred_seq", preferred_seq, ndim=2)
        _checks.integer_tokens("unpreferred_seq", unpreferred_seq, ndim=2)
        shape = tuple(preferred_seq.shape)
        if tuple(unpreferred_seq.shape) != shape:
            raise ValueError(
                f"unpreferred_seq must have the shape of preferred_seq {shape}, "
                f"got {tuple(unpreferred_seq.shape)}"
            )
        if shape[0] < 1 or shape[1] < 2:
            raise ValueError(
                f"sequences must be (B, L) with B >= 1 and L >= 2 (one input and one target "
                f"token), got {shape}"
            )
        _checks.bool_mask("prompt_mask", prompt_mask, shape, "True = a prompt position, not scored")
        for name, m in (("preferred_seq_mask", pref_mask), ("unpreferred_seq_mask", unpref_mask)):
            if m is not None:
                _checks.bool_mask(name, m, shape, "True = a real token, False = padding")
        _checks.same_device(
            preferred_seq=preferred_seq,
            unpreferred_seq=unpreferred_seq,
            prompt_mask=prompt_mask,
            preferred_seq_mask=pref_mask,
            unpreferred_seq_mask=unpref_mask,
        )
        high = hf.vocab_rows(self.policy_model) if self._hf else getattr(self.policy_model, "num_tokens", None)
        high = high if isinstance(high, int) else None
        _checks.token_range("preferred_seq", preferred_seq, high)
        _checks.token_range("unpreferred_seq", unpreferred_seq, high)

    def _batch(self, preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask):
        """(inputs (2B, L-1), targets (2B, L-1), score mask (2B, L-1), token counts (2B,),
        the packed pairs with ``share_prompt``, else None)."""
        self._check_inputs(preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask)
        if self.pad_id is not None:
            if pref_mask is None:
                pref_mask = preferred_seq != self.pad_id
            if unpref_mask is None:
                unpref_mask = unpreferred_seq != self.pad_id
        if self._hf:  # it gets no attention mask: padding must come last
            hf.check_right_padding("preferred_seq_mask", pref_mask)
            hf.check_right_padding("unpreferred_seq_mask", unpref_mask)
        seq = torch.cat((preferred_seq, unpreferred_seq))
        keep = ~prompt_mask.repeat(2, 1)
        if pref_mask is not None or unpref_mask is not None:
            ones = torch.ones_like(prompt_mask)
            seq_mask = torch.cat(
                (
                    pref_mask if pref_mask is not None else ones,
                    unpref_mask if unpref_mask is not None else ones,
                )
            )
            keep = keep & seq_mask
        mask = keep[:, :-1] if self.mask_alignment == "input" else keep[:, 1:]
        # x-transformers clamps the count at 1e-5, so an empty completion scores 0, not NaN.
        count = mask.sum(-1).clamp(min=1e-5)
        packed = None
        if self.share_prompt:
            packed = packing.pack(
                preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask,
                pad_token=self.pad_id if self.pad_id is not None else 0,
            )
            self._check_packing(preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask)
        return seq[:, :-1], seq[:, 1:], mask, count, packed

    def _reduce(self, sums: Tensor, count: Tensor) -> Tensor:
        return sums / count if self.logprob_reduction == "mean" else sums

    def _check_ref_scores(self, pref, unpref, b, like):
        if (pref is None) != (unpref is None):
            raise ValueError(
                "give both ref_preferred_logprob and ref_unpreferred_logprob, or neither"
            )
        for name, x in (("ref_preferred_logprob", pref), ("ref_unpreferred_logprob", unpref)):
            _checks.tensor(name, x, ndim=1)
            if x.shape[0] != b:
                raise ValueError(f"{name} must have shape ({b},), got {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
            _checks.same_device(preferred_seq=like, **{name: x})
        return torch.cat((pref, unpref)).detach().float()

    # ------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def _reference_scores(self, src: Tensor, tgt: Tensor, mask: Tensor, count: Tensor,
                          packed: packing.Packed | None) -> Tensor:
        """The reference's scores on their own (when they are not scored inside dpo_head)."""
        if not self.has_reference():
            # reference-free: a zero reference (what TRL's reference_free means)
            return torch.zeros(src.shape[0], dtype=torch.float32, device=src.device)
        with self._reference() as ref:
            route = self.route(ref, src.device)
            if route.head is not None:
                hidden = self._run(ref, route, src, packed, hidden=True)
                weight = live_weight(route.head, hidden.dtype)  # (FSDP2: gathered, freed on return)
            if _small_head(route, src):
                sums = sequence_logprobs(_head_logits(hidden, weight, route.head), tgt, mask, impl="torch")
            elif route.head is not None:
                sums = linear_sequence_logprobs(
                    hidden, weight, tgt, mask, scale=route.head.scale, impl=route.impl, matmul=route.matmul,
                )
            else:
                sums = sequence_logprobs(self._run(ref, route, src, packed, hidden=False), tgt, mask, impl=route.impl)
        return self._reduce(sums, count)

    def _head_options(self, route: Route, ref_scale: float | None, count_hits: bool) -> dict:
        """:class:`fastdpo.fused_pair.HeadOptions`' fields, as the op's keyword arguments."""
        delta = self.loss.bco_delta
        return dict(
            fold=route.impl,
            scale=route.head.scale,
            ref_scale=ref_scale,
            reduction=self.logprob_reduction,
            loss_type=",".join(self.loss.loss_type),
            beta=self.loss.beta,
            label_smoothing=self.loss.label_smoothing,
            loss_weights=self.loss.loss_weights,
            gamma=self.loss.gamma,
            bco_delta_value=0.0 if isinstance(delta, Tensor) else float(delta),
            count_hits=count_hits,
            chunk_bytes=0,
            group_bytes=0,
        )

    def forward(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
        ref_preferred_logprob: Tensor | None = None,
        ref_unpreferred_logprob: Tensor | None = None,
        return_metrics: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Mean DPO loss over B pairs.

        Args:
            preferred_seq, unpreferred_seq: (B, L) token ids, prompt followed by completion.
            prompt_mask: (B, L) bool, True on prompt positions (excluded from the scores).
            preferred_seq_mask, unpreferred_seq_mask: (B, L) bool, True on real (unpadded)
                tokens; default ``seq != pad_id`` when ``pad_id`` was given, else all True.
            ref_preferred_logprob, ref_unpreferred_logprob: optional precomputed (B,) reference
                scores (as :meth:`reference_scores` returns them, in this module's
                ``logprob_reduction``); given both, the reference model is not run.
            return_metrics: also return a dict of detached training metrics (below).

        Without gradients (``torch.no_grad()``, ``torch.inference_mode()``, or a policy with no
        trainable parameters) both models are scored forward only: an evaluation step costs
        about two reference passes.

        Returns:
            the scalar loss, ``mean_b loss_b`` (default: ``-log sigmoid(beta * ((pi_w - pi_l)
            - (ref_w - ref_l)))``); with ``return_metrics``, ``(loss, metrics)`` where
            metrics holds :func:`fastdpo.losses.reward_metrics`' ``rewards/chosen``,
            ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
            ``logps/chosen``, ``logps/rejected`` (on the scores in this module's
            ``logprob_reduction``), plus ``tokens/chosen`` and ``tokens/rejected`` (mean
            number of scored tokens per sequence) and, except on the Triton GEMM route,
            ``token_accuracy/chosen``: the fraction of scored chosen tokens whose target is
            the policy's argmax (ties go to the lowest token id, as ``torch.argmax``).
        """
        src, tgt, mask, count, packed = self._batch(
            preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask
        )
        b = preferred_seq.shape[0]
        route = self.route(self.policy_model, src.device)
        small = _small_head(route, src)  # then scored as the logits route scores
        kind = "logits" if small else route.kind
        ref_scores = ref_hidden = ref_head = ref_weight = None
        if ref_preferred_logprob is not None or ref_unpreferred_logprob is not None:
            ref_scores = self._check_ref_scores(ref_preferred_logprob, ref_unpreferred_logprob, b, src)
        elif self.has_reference() and kind == "pair":
            with self._reference() as ref:
                ref_head = self.route(ref, src.device).head
                if ref_head is not None:
                    # Scored inside dpo_head, with the policy's rows: one host sync for the step.
                    with torch.no_grad():
                        ref_hidden = self._run(ref, self.route(ref, src.device), src, packed, hidden=True)
        if ref_scores is None and ref_head is None:
            ref_scores = self._reference_scores(src, tgt, mask, count, packed)

        hits = None
        # The policy body, once: hidden states for a fused head, logits otherwise.
        policy = self.policy_model
        out = self._run(policy, route, src, packed, hidden=route.head is not None)
        # The head weight as it is now (FSDP2: gathered here; the op's outputs do not hold it)
        weight = live_weight(route.head, out.dtype) if route.head is not None else None
        if small:
            out = _head_logits(out, weight, route.head)
        if kind == "pair":
            if ref_head is not None:  # gathered (FSDP2) for the op only
                with torch.no_grad():
                    ref_weight = live_weight(ref_head, ref_hidden.dtype)
            delta = self.loss.bco_delta
            loss, policy_sums, ref_scores, hits = call_dpo_head(
                out, weight, tgt, mask, count, ref_hidden, ref_weight, ref_scores,
                delta if isinstance(delta, Tensor) else None,
                **self._head_options(route, ref_head.scale if ref_head is not None else None, return_metrics),
            )
            ref_hidden = ref_weight = weight = None  # the op's outputs do not hold them
        else:
            if kind == "scores":
                policy_sums = linear_sequence_logprobs(
                    out, weight, tgt, mask, scale=route.head.scale, impl=route.impl, matmul=route.matmul
                )
            else:
                if return_metrics:  # before backward may overwrite the logits
                    hits = _argmax_hits(out, tgt, mask)
                # (a compiled graph cannot look at grad_fn: it takes a fresh gradient buffer)
                inplace = self.inplace_backward and not torch.compiler.is_compiling() and _own_logits(out)
                policy_sums = sequence_logprobs(out, tgt, mask, impl=route.impl, inplace_backward=inplace)
            loss = pair_losses(policy_sums, ref_scores, count, self.loss, self.logprob_reduction).mean()
        if not return_metrics:
            return loss
        return loss, self._metrics(policy_sums.detach(), ref_scores, count, mask, hits, b)

    def _metrics(self, sums, ref_scores, count, mask, hits, b) -> dict[str, Tensor]:
        scores = self._reduce(sums, count)
        # Without a reference model the reference scores are zeros: rewards are beta * scores.
        metrics = reward_metrics(scores[:b], scores[b:], ref_scores[:b], ref_scores[b:], self.loss.beta)
        tokens = mask.sum(-1).float()
        metrics["tokens/chosen"] = tokens[:b].mean()
        metrics["tokens/rejected"] = tokens[b:].mean()
        if hits is not None:
            metrics["token_accuracy/chosen"] = hits[:b].sum().float() / tokens[:b].sum().clamp(min=1)
        return metrics

    @torch.no_grad()
    def reference_scores(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The reference model's (B,) scores of a batch, to pass back to :meth:`forward`.

        Same arguments as :meth:`forward`; returns ``(ref_preferred_logprob,
        ref_unpreferred_logprob)`` in this module's ``logprob_reduction`` and
        ``mask_alignment``.  See :func:`fastdpo.precompute_reference_scores` for a dataset.
        """
        src, tgt, mask, count, packed = self._batch(
            preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask
        )
        scores = self._reference_scores(src, tgt, mask, count, packed)
        b = preferred_seq.shape[0]
        return scores[:b], scores[b:]


@torch.no_grad()
def precompute_reference_scores(dpo: DPO, batches, *, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Run ``dpo``'s reference model once over a dataset; return its scores for every pair.

    ``batches`` yields ``(preferred, unpreferred, prompt_mask)`` tuples (optionally with the two
    sequence masks after them), e.g. ``DataLoader(ds, batch_size=..., collate_fn=ds.collate)``
    without shuffling.  Returns ``(ref_preferred_logprob, ref_unpreferred_logprob)``, each
    ``(num_pairs,)`` float32 on the CPU in iteration order; slice them per batch and pass them
    to ``dpo(...)`` so a training run need not keep the reference model (``del dpo.ref_model``
    is then safe, as long as every call passes precomputed scores).
    """
    from tqdm.auto import tqdm

    if not isinstance(dpo, DPO):
        hint = " (for a DistributedDataParallel wrapper, pass ddp.module)" if hasattr(dpo, "module") else ""
        raise TypeError(f"dpo must be a fastdpo.DPO, got {type(dpo).__name__}{hint}")
    it = tqdm(batches, desc="reference scores", disable=not progress)
    chosen, rejected = [], []
    for i, batch in enumerate(it):
        if not 3 <= len(batch) <= 5:
            raise ValueError(
                f"batches[{i}] must be (preferred, unpreferred, prompt_mask[, preferred_seq_mask"
                f"[, unpreferred_seq_mask]]), got {len(batch)} entries"
            )
        pref, unpref, prompt_mask, *masks = batch
        kwargs = dict(zip(("preferred_seq_mask", "unpreferred_seq_mask"), masks))
        w, l = dpo.reference_scores(pref, unpref, prompt_mask=prompt_mask, **kwargs)
        chosen.append(w.cpu())
        rejected.append(l.cpu())
    if not chosen:
        empty = torch.empty(0)
        return empty, empty.clone()
    return torch.cat(chosen), torch.cat(rejected)
