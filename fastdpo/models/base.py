"""What :class:`fastdpo.DPO` asks of a model, whatever its family.

A family (x-transformers, Hugging Face, ...) answers a few questions in one adapter class
(:class:`ModelAdapter`): the head it can fuse (a plain product, :class:`LinearHead`) or why
not, its hidden states and its logits (of a padded batch, or of a packed layout), its
vocabulary size, the padding it accepts (and whether it must be told where a batch's real
tokens are: :class:`Padding`), whether it can run packed pairs.  ``DPO`` talks to adapters
only; :func:`fastdpo.models.adapter_for` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import YES, Verdict, no
from ..batching.batch import Padding
from ..batching.packing import PackedLayout, pack, pair_lengths
from .wrappers import eval_mode, module_to_call


@dataclass(frozen=True)
class LinearHead:
    """A model's output head as ``logits = (hidden @ weight.T + bias) * scale`` (bias and scale
    may be None), then, with a ``softcap``, ``softcap * tanh(logits / softcap)`` (Gemma 2's
    final logits).  ``has_bias``: the output embedding has a bias (Phi's), read with the weight
    from ``owner`` at each call (:func:`live_bias`).

    ``weight`` is the weight when the head was found; ``owner``, when given, is the module
    whose ``.weight`` it is, read again at each call by :func:`live_weight` (FSDP2 swaps a
    sharded parameter for its gathered twin and back around every forward).  ``inferred``: empty
    for a head whose model's forward was read (and is tested); else what was inferred about an
    unread one (``"logits = lm_head(hidden) * 0.5 (logit_scale)"``), which the first call checks
    against the model's own logits (:meth:`fastdpo.scoring.router.Scorer.head_input`) before it is trusted.
    """

    weight: Tensor
    scale: float | None
    owner: nn.Module | None = None
    inferred: str = ""
    softcap: float | None = None
    has_bias: bool = False

    def logits(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """The logits the model's own head makes from ``hidden`` (product and bias, scale,
        softcap, each in the hidden states' dtype as the model's forward does them)."""
        z = torch.nn.functional.linear(hidden, weight, bias)
        z = z * self.scale if self.scale is not None else z
        return torch.tanh(z / self.softcap) * self.softcap if self.softcap is not None else z


def _stored(head: LinearHead) -> Tensor:
    """The head's weight as its owner holds it now (FSDP2 swaps shards and gathered twins)."""
    return head.owner.weight if head.owner is not None else head.weight


def _is_plain(w: Tensor) -> bool:
    return type(w) in (torch.Tensor, nn.Parameter)


def live_weight(head: LinearHead, dtype: torch.dtype) -> Tensor:
    """The head weight to multiply hidden states of ``dtype`` by, now.

    A plain tensor is used as it is (also FSDP2's gathered parameter while its group is
    unsharded: FSDP2 reduce-scatters its gradient itself).  A ``DTensor`` (an FSDP2 shard,
    outside its group's forward) is gathered whole with ``full_tensor``, its gradient marked
    ``Partial("avg")`` over every mesh dimension: backward reduce-scatters (and averages, as
    FSDP2 does) the full gradient back into the shards, through DTensor's own autograd.  It is
    gathered in its stored dtype (so that reduction runs in it) and cast to ``dtype`` (FSDP2's
    ``param_dtype`` under a mixed-precision policy) after.  The gathered weight lives as long
    as the caller holds it.
    """
    return _live(_stored(head), dtype)


def gathers(head: LinearHead) -> bool:
    """Whether :func:`live_weight` gathers ``head``'s weight now (an FSDP2 shard): its result is
    then a whole copy of the weight, alive as long as its holder keeps it."""
    return not _is_plain(_stored(head))


def live_bias(head: LinearHead, dtype: torch.dtype) -> Tensor | None:
    """The head's bias to add now (None without one), read and gathered as :func:`live_weight`."""
    if not head.has_bias:
        return None
    if head.owner is None or getattr(head.owner, "bias", None) is None:
        raise ValueError("a head with a bias needs the module that owns it (LinearHead.owner)")
    return _live(head.owner.bias, dtype)


def _live(w: Tensor, dtype: torch.dtype) -> Tensor:
    if _is_plain(w):
        return w
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(w, DTensor):  # pragma: no cover - check_weight declines these
        raise TypeError(f"the head weight is a {type(w).__name__}, not a tensor or a DTensor")
    if w.requires_grad and torch.is_grad_enabled():
        full = w.full_tensor(grad_placements=[Partial("avg")] * w.device_mesh.ndim)
    else:
        full = w.detach().full_tensor()
    return full.to(dtype)


def check_weight(weight) -> Verdict:
    """Whether a head weight can be used: a plain tensor, or a DTensor (gathered at each call,
    :func:`live_weight`)."""
    if not isinstance(weight, torch.Tensor):
        return no(f"its head weight is a {type(weight).__name__}, not a tensor")
    if _is_plain(weight):
        return YES
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor):
        return YES
    return no(f"its head weight is a {type(weight).__name__}, not a plain tensor or a DTensor")


def logits_of(out) -> Tensor:
    """A model's logits: its output itself, or the output's ``.logits`` (a ``ModelOutput``)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model must return its logits as a tensor or as an output with a .logits tensor, "
        f"got {type(out).__name__}"
    )


class ModelAdapter:
    """One model seen by one family: the answers ``DPO`` needs.

    This base class is the family of last resort: any module that maps token ids ``(N, T)``
    to logits ``(N, T, V)`` (a tensor, or an output with ``.logits``).  It has no fusable
    head and cannot run packed pairs.  A family subclasses it, overrides what it knows better,
    and is listed in :data:`fastdpo.models.FAMILIES`.
    """

    family = "module"

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def adapt(cls, model: nn.Module) -> ModelAdapter | None:
        """This family's adapter of ``model`` (seen through its wrappers), or None when the
        family does not know it."""
        return cls(model)

    def head(self) -> tuple[LinearHead | None, str]:
        """``(head, "")`` when the model's logits are ``hidden @ head.weight.T * head.scale``
        (capped by ``head.softcap``) and :meth:`hidden` gives that ``hidden``; else ``(None,
        why not)``."""
        return None, (
            f"the model is a {type(self.model).__name__}, not a TransformerWrapper or a Hugging "
            f"Face causal LM"
        )

    def hidden(self, tokens: Tensor, layout: PackedLayout | None = None, padding: Padding | None = None) -> Tensor:
        """(N, T, D): what the head consumes, for ``tokens`` (N, T) -- a padded batch (with the
        ``padding`` :meth:`check_padding` asked for), or the rows of a packed ``layout``
        (``tokens`` is then ``layout.tokens``)."""
        raise NotImplementedError(f"{type(self).__name__} has no fusable head")

    def logits(self, tokens: Tensor, layout: PackedLayout | None = None, padding: Padding | None = None) -> Tensor:
        """(N, T, V): the model's logits for ``tokens`` (as :meth:`hidden`)."""
        if layout is not None:
            raise NotImplementedError(f"{type(self).__name__} cannot run a packed layout")
        if padding is not None:
            raise NotImplementedError(f"{type(self).__name__} takes no attention mask")
        return logits_of(module_to_call(self.model)(tokens))

    def router(self) -> tuple[bool, float]:
        """(whether the model's forward returns an MoE router load-balancing loss when asked
        -- :meth:`hidden` and :meth:`logits` take ``aux``, a list that receives it --, the
        coefficient its config gives that loss).  The base family: (False, 0.0)."""
        return False, 0.0

    def vocab_size(self) -> int | None:
        """The number of token ids the model accepts (None when unknown: not checked)."""
        n = getattr(self.model, "num_tokens", None)
        return n if isinstance(n, int) else None

    def check_padding(self, name: str, mask: Tensor | None) -> bool:
        """Raise when the padding in ``mask`` (True = a real token) would change the scores of
        the real tokens; return whether the model must be told where they are (the batch then
        carries its :class:`Padding`, which :meth:`hidden` and :meth:`logits` get).  The base
        family gets no attention mask and takes any padding (False)."""
        return False

    def can_attend_by_parts(self) -> Verdict:
        """Whether attention by parts (:mod:`fastdpo.batching.attention`) can run this model's
        packed pairs; else they attend through the dense mask (:meth:`can_take_dense_mask`)."""
        return no(f"fastdpo does not know the attention of a {type(self.model).__name__}")

    def can_pack(self) -> Verdict:
        """Whether the model can run packed pairs at all (:mod:`fastdpo.batching.packing`): true when
        nothing known stands in the way (the first packed call then checks two pairs)."""
        return no(f"fastdpo does not know how to run a {type(self.model).__name__} on packed pairs")

    def can_take_dense_mask(self) -> Verdict:
        """Whether the dense mask (:meth:`fastdpo.batching.packing.PackedLayout.additive_mask`) can
        carry the model's packed pairs."""
        return YES


@torch.no_grad()
def check_first_pairs(adapter: ModelAdapter, layout: str, attention: str, preferred: Tensor, unpreferred: Tensor,
                      prompt_mask: Tensor, pref_mask: Tensor | None, unpref_mask: Tensor | None, *,
                      tokens: int | None = None) -> None:
    """The model's hidden states of the first two pairs (one pair with B = 1), packed into one
    row in ``layout`` and unpacked, in eval mode, must agree to float rounding; else raise
    with what differs.  Catches what no rule of the adapter names (token shift, say), and any
    leak between the pairs of a row.  ``tokens``: check only the first ``tokens`` of each
    sequence (under sequence parallelism, where no process may hold a whole long row)."""
    two, cut = slice(0, 2), slice(0, tokens)
    masks = [m[two, cut] if m is not None else None for m in (pref_mask, unpref_mask)]
    args = (preferred[two, cut], unpreferred[two, cut], prompt_mask[two, cut], *masks)
    lengths = pair_lengths(*args)
    row = sum(w + l - p for p, w, l in zip(*lengths))
    pk = pack(*args, layout=layout, pack_length=row if layout == "batch" else None, attention=attention,
                      lengths=lengths)
    src = torch.cat(args[:2])[:, :-1]
    with eval_mode(adapter.model):
        got = adapter.hidden(pk.tokens, pk)
        dtype = got.dtype
        got = got.reshape(-1, got.shape[-1])[pk.rows].float()
        want = adapter.hidden(src).float()
    real = torch.cat([m if m is not None else torch.ones_like(args[2]) for m in masks])[:, :-1]
    err = ((got - want)[real].abs().max() / want[real].abs().max().clamp(min=1e-30)).item()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise ValueError(
            f"packing={layout!r} (attention {attention!r}) but this model's hidden states change when "
            f"pairs are packed (relative difference {err:.3g} > {tol:g} on the first pairs): a feature "
            f"of the model depends on where tokens sit in the sequence beyond their positions"
        )
