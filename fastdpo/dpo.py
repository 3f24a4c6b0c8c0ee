"""The drop-in ``DPO`` module.

Data flows one way: (preferred, unpreferred, masks) -> one concatenated batch of 2B sequences
-> model (reference under no_grad, then policy) -> :func:`fastdpo.sequence_logprobs` ->
:func:`fastdpo.losses.dpo_loss` -> scalar.
"""

from __future__ import annotations

import types
from copy import deepcopy

import torch
from torch import Tensor, nn

from . import _checks
from .losses import dpo_loss
from .ops import IMPLS, sequence_logprobs

REDUCTIONS = ("mean", "sum")
ALIGNMENTS = ("input", "target")

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


def _own_logits(logits: Tensor) -> bool:
    fn = logits.grad_fn
    return fn is not None and type(fn).__name__ in _OVERWRITABLE_GRAD_FNS


class DPO(nn.Module):
    """Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290) around a model.

    A drop-in for ``x_transformers.dpo.DPO``: same constructor, attributes and ``forward``,
    same loss and gradients by default, computed without any (2B, L, V) log-softmax.

    Args:
        model: maps token ids (B, L) to logits (B, L, V) (e.g. an x-transformers
            ``TransformerWrapper``).  It becomes ``policy_model``; ``ref_model`` is a frozen
            deep copy (see :func:`frozen_copy`: unlike x-transformers' copy, it shares no
            weights with the policy, also when the head is tied to the embedding).
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
        impl: sequence log-prob implementation, see :func:`fastdpo.sequence_logprobs`.
        inplace_backward: let the policy's logits (created by this module's own call to the
            model) take their gradient in place, so the step holds one (2B, L-1, V) buffer
            instead of two.  Used only when the logits come straight from a linear head.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        beta: float = 0.1,
        pad_id: int | None = None,
        logprob_reduction: str = "mean",
        mask_alignment: str = "input",
        impl: str = "auto",
        inplace_backward: bool = True,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.policy_model = model
        self.ref_model = frozen_copy(model)
        self.beta = _checks.positive_finite("beta", beta)
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        self.pad_id = pad_id
        self.logprob_reduction = _checks.choice("logprob_reduction", logprob_reduction, REDUCTIONS)
        self.mask_alignment = _checks.choice("mask_alignment", mask_alignment, ALIGNMENTS)
        self.impl = _checks.choice("impl", impl, IMPLS)
        self.inplace_backward = bool(inplace_backward)

    def parameters(self, recurse: bool = True):
        """The policy's parameters only (the reference model is frozen), as x-transformers."""
        return self.policy_model.parameters(recurse)

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
        _checks.bool_mask("prompt_mask", prompt_mask, shape)
        if pref_mask is not None:
            _checks.bool_mask("preferred_seq_mask", pref_mask, shape)
        if unpref_mask is not None:
            _checks.bool_mask("unpreferred_seq_mask", unpref_mask, shape)
        _checks.same_device(
            preferred_seq=preferred_seq,
            unpreferred_seq=unpreferred_seq,
            prompt_mask=prompt_mask,
            preferred_seq_mask=pref_mask,
            unpreferred_seq_mask=unpref_mask,
        )
        high = getattr(self.policy_model, "num_tokens", None)
        high = high if isinstance(high, int) else None
        _checks.token_range("preferred_seq", preferred_seq, high)
        _checks.token_range("unpreferred_seq", unpreferred_seq, high)

    def forward(
        self,
        preferred_seq: Tensor,
        unpreferred_seq: Tensor,
        *,
        prompt_mask: Tensor,
        preferred_seq_mask: Tensor | None = None,
        unpreferred_seq_mask: Tensor | None = None,
    ) -> Tensor:
        """Mean DPO loss over B pairs.

        Args:
            preferred_seq, unpreferred_seq: (B, L) token ids, prompt followed by completion.
            prompt_mask: (B, L) bool, True on prompt positions (excluded from the scores).
            preferred_seq_mask, unpreferred_seq_mask: (B, L) bool, True on real (unpadded)
                tokens; default ``seq != pad_id`` when ``pad_id`` was given, else all True.

        Returns:
            scalar loss ``mean_b -log sigmoid(beta * ((pi_w - pi_l) - (ref_w - ref_l)))``.
        """
        self._check_inputs(
            preferred_seq, unpreferred_seq, prompt_mask, preferred_seq_mask, unpreferred_seq_mask
        )
        b = preferred_seq.shape[0]
        if self.pad_id is not None:
            if preferred_seq_mask is None:
                preferred_seq_mask = preferred_seq != self.pad_id
            if unpreferred_seq_mask is None:
                unpreferred_seq_mask = unpreferred_seq != self.pad_id

        seq = torch.cat((preferred_seq, unpreferred_seq))
        keep = ~prompt_mask.repeat(2, 1)
        if preferred_seq_mask is not None or unpreferred_seq_mask is not None:
            ones = torch.ones_like(prompt_mask)
            seq_mask = torch.cat(
                (
                    preferred_seq_mask if preferred_seq_mask is not None else ones,
                    unpreferred_seq_mask if unpreferred_seq_mask is not None else ones,
                )
            )
            keep = keep & seq_mask
        mask = keep[:, :-1] if self.mask_alignment == "input" else keep[:, 1:]
        src, tgt = seq[:, :-1], seq[:, 1:]

        with torch.no_grad():
            self.ref_model.eval()
            ref_logits = self.ref_model(src)
            ref_scores = sequence_logprobs(ref_logits, tgt, mask, impl=self.impl)
            del ref_logits

        policy_logits = self.policy_model(src)
        policy_scores = sequence_logprobs(
            policy_logits,
            tgt,
            mask,
            impl=self.impl,
            inplace_backward=self.inplace_backward and _own_logits(policy_logits),
        )

        if self.logprob_reduction == "mean":
            count = mask.sum(-1).clamp(min=1e-5)
            policy_scores = policy_scores / count
            ref_scores = ref_scores / count

        losses = dpo_loss(
            policy_scores[:b], policy_scores[b:], ref_scores[:b], ref_scores[b:], self.beta
        )
        return losses.mean()
