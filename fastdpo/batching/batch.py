"""From token ids to the batch the models run: checks, scored positions, packed layouts.

Dimensions: B pairs, N = 2B sequences (the B preferred, then the B unpreferred), L tokens,
T = L - 1 input positions.

:func:`pair_batch` checks a pair batch and returns a :class:`Batch`: the inputs, targets,
scored positions and their counts of the 2B unpacked sequences -- what every route scores --,
where their real tokens are when the model must be told (left padding for a Hugging Face
model: :func:`model_padding`), and, when the module packs (:class:`PackingPlan`), the packed layout
the models run on instead (:mod:`fastdpo.batching.packing`), whose hidden states are gathered back to
the unpacked rows.
:func:`unpaired_batch` does the same for N sequences that are not pairs (KTO's), unpacked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .. import _checks
from .._checks import Verdict, no
from . import packing
from .sequence_parallel import ShardedLayout, group_of, shard_rows


class ModelAnswers(Protocol):
    """What building a batch asks of the policy's model: the answers its adapter gives
    (:class:`fastdpo.models.ModelAdapter`, which sits above this package and is never imported
    here)."""

    def vocab_size(self) -> int | None: ...

    def check_padding(self, name: str, mask: Tensor | None) -> bool: ...

    def can_pack(self) -> Verdict: ...

    def can_attend_by_parts(self) -> Verdict: ...

    def can_take_dense_mask(self) -> Verdict: ...

PACKINGS = ("none", "pair", "batch", "auto")
PACK_ATTENTIONS = ("auto", "segments", "dense")


@dataclass(frozen=True)
class Batch:
    """N sequences as the models see them."""

    src: Tensor  # (N, T) input ids
    tgt: Tensor  # (N, T) target ids
    mask: Tensor  # (N, T) bool, True where the target's log-prob counts
    count: Tensor  # (N,) float, scored positions per sequence clamped at 1e-5 (x-transformers; see token_weights)
    packed: packing.PackedLayout | None = None  # the layout the models run on, when the batch is packed
    # (N, T) float32 weight of each scored log-prob (LD-DPO, fastdpo.losses.weighting.ld_weighted); None: all 1
    token_weights: Tensor | None = None
    # where the inputs' real tokens are, when the model must be told (a Hugging Face model given
    # padding before a real token: its attention_mask and position_ids); None: the ids alone
    padding: Padding | None = None
    # (N, L) bool, the sequences' real tokens (their masks; None: every token is real): what an
    # MoE router's load-balancing term counts (fastdpo.scoring.router.Scorer.head_input with router=True)
    real: Tensor | None = None
    # this process's share of the packed rows, under sequence parallelism (PackingPlan.group)
    shard: ShardedLayout | None = None

    @property
    def seq(self) -> Tensor:
        """(N, L) the whole sequences: the inputs and the last target."""
        return torch.cat((self.src, self.tgt[:, -1:]), 1)


@dataclass(frozen=True, eq=False)
class Padding:
    """Where the real tokens of a padded batch's inputs (N, T) are, for a family that must be
    told (:meth:`fastdpo.models.ModelAdapter.check_padding`; a Hugging Face model given left padding)."""

    mask: Tensor  # (N, T) int64, 1 on a real token, 0 on padding (a tokenizer's attention_mask)
    pos: Tensor  # (N, T) int64, each real token's position in its unpadded sequence (0 on leading padding)

    @classmethod
    def of(cls, real: Tensor) -> Padding:
        """The padding of inputs whose real tokens are ``real`` (N, T) bool, each row's
        contiguous: positions count the real tokens before each one, as Hugging Face's
        ``generate`` makes them (``cumsum - 1``, clamped at 0)."""
        mask = real.long()
        return cls(mask, (mask.cumsum(-1) - 1).clamp(min=0))


def make_batch(seq: Tensor, keep: Tensor, alignment: str, packed: packing.PackedLayout | None = None,
               padding: Padding | None = None, real: Tensor | None = None,
               shard: ShardedLayout | None = None) -> Batch:
    """A :class:`Batch` of ``seq`` (N, L) whose positions ``keep`` (N, L) may be scored:
    inputs ``seq[:, :-1]`` score targets ``seq[:, 1:]``; with ``alignment="input"``
    (x-transformers) the mask at the input position decides, with ``"target"`` (TRL) the mask
    at the target position."""
    mask = keep[:, :-1] if alignment == "input" else keep[:, 1:]
    # x-transformers clamps the count at 1e-5, so an empty completion scores 0, not NaN.
    count = mask.sum(-1).clamp(min=1e-5)
    return Batch(seq[:, :-1], seq[:, 1:], mask, count, packed, padding=padding, real=real, shard=shard)


def model_padding(adapter: ModelAnswers, alignment: str, masks: dict[str, Tensor | None], like: Tensor) -> Padding | None:
    """The :class:`~fastdpo.models.Padding` of the inputs of the sequences whose masks are
    ``masks`` (name -> (n, L) bool or None, stacked in this order; ``like`` a mask of that
    shape), when ``adapter`` must be told of it (:meth:`~fastdpo.models.ModelAdapter.check_padding`
    checks each mask), else None.

    ``alignment="input"`` refuses such padding: x-transformers' rule also scores the token
    after a sequence's last real token (padding, in a right-padded row), which a row whose real
    tokens end at the last position does not have, so its scores could not be the right-padded
    batch's.
    """
    left = [name for name, m in masks.items() if adapter.check_padding(name, m)]
    if not left:
        return None
    if alignment == "input":
        raise ValueError(
            f"{left[0]} has padding before a real token, which mask_alignment='input' cannot score as it "
            f"scores the same sequences right padded: x-transformers' rule also counts the log-prob of "
            f"the token after a sequence's last real token (padding, in a right-padded row), and a "
            f"left-padded row ending at the last position has none; pass mask_alignment='target' "
            f"(TRL's), or pad at the end"
        )
    real = torch.cat([m if m is not None else torch.ones_like(like) for m in masks.values()])
    return Padding.of(real[:, :-1])


# ----------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackingPlan:
    """How a module packs its pair batches (decided once, at construction: :func:`plan_packing`)."""

    layout: str  # PACKINGS: "none", "pair", "batch", or "auto" (per batch: packing.choose_layout)
    attention: str = "dense"  # fastdpo.batching.packing.ATTENTIONS: how the models attend in a packed row
    length: int | None = None  # "batch": the slots a row holds (None: the longest packed pair)
    group: object = None  # sequence parallelism: the process group that splits each packed row


def plan_packing(adapter: ModelAnswers, layout: str, attention: str, length: int | None,
                 sequence_parallel=None) -> PackingPlan:
    """The :class:`PackingPlan` a module with the policy ``adapter`` takes for the asked ``layout``
    (:data:`PACKINGS`), ``attention`` (:data:`PACK_ATTENTIONS`) and ``length``.

    A model that cannot pack raises ``ValueError`` naming why (``"auto"`` then never packs);
    ``attention="auto"`` attends by parts where the adapter can (:meth:`segments`), else through
    the dense mask, with a warning saying why (``"segments"`` raises instead).  With a
    ``sequence_parallel`` group the rows are split across its processes, which needs a packed
    layout attended by parts (else a ``ValueError`` saying why)."""
    if sequence_parallel is not None:
        return _parallel_plan(adapter, layout, attention, length, group_of(sequence_parallel))
    _checks.choice("packing", layout, PACKINGS)
    _checks.choice("pack_attention", attention, PACK_ATTENTIONS)
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
        raise ValueError(f"pack_length must be an int >= 2 or None, got {length!r}")
    if length is not None and layout not in ("batch", "auto"):
        raise ValueError(f"pack_length is for packing='batch' or 'auto', got packing={layout!r}")
    if layout == "none":
        return PackingPlan("none")
    can = adapter.can_pack()
    if can:
        by_parts, dense = adapter.can_attend_by_parts(), adapter.can_take_dense_mask()
        if attention != "dense" and by_parts:
            return PackingPlan(layout, "segments", length)
        if attention == "segments":
            can = no(f"attention by parts (pack_attention='segments') cannot stand in for its attention: "
                     f"{by_parts.why_not}")
        elif not dense and attention == "dense":
            can = no(f"the dense mask cannot carry its packed pairs ({dense.why_not})")
        elif not dense:
            can = no(f"neither attention by parts ({by_parts.why_not}) nor the dense mask ({dense.why_not}) "
                     f"fits its attention")
    if not can:
        if layout == "auto":
            return PackingPlan("none")
        raise ValueError(f"packing={layout!r} but this model cannot run packed pairs: {can.why_not}")
    if attention == "auto":
        warnings.warn(
            f"fastdpo packs this model's pairs with a dense (rows, T, T) attention mask, which pays "
            f"for the blocks it hides: attention by parts cannot stand in for its attention "
            f"({by_parts.why_not}); pass pack_attention='dense' to silence this",
            stacklevel=5,  # here <- PreferenceModule.__init__ <- a family's _build <- its __init__ <- the user's call
        )
    return PackingPlan(layout, "dense", length)


def _parallel_plan(adapter: ModelAnswers, layout: str, attention: str, length: int | None, group) -> PackingPlan:
    if layout not in ("pair", "batch"):
        raise ValueError(f"sequence_parallel splits packed rows across processes: pass packing='batch' or 'pair', "
                         f"not packing={layout!r}")
    if attention == "dense":
        raise ValueError("sequence_parallel splits attention by parts: pack_attention='dense' cannot be split "
                         "(pass 'auto' or 'segments')")
    try:
        plan = plan_packing(adapter, layout, "segments", length)
    except ValueError as e:
        raise ValueError(f"sequence_parallel cannot split this model's attention: {e}") from None
    return PackingPlan(plan.layout, plan.attention, plan.length, group)


# ----------------------------------------------------------------------------- pairs


def pair_batch(
    adapter_on: Callable[[torch.device], ModelAnswers], preferred: Tensor, unpreferred: Tensor, prompt_mask: Tensor,
    pref_mask: Tensor | None, unpref_mask: Tensor | None, *, pad_id: int | None, alignment: str,
    packing_plan: PackingPlan = PackingPlan("none"), check_packed: Callable[..., None] | None = None,
) -> Batch:
    """The :class:`Batch` of B pairs: 2B sequences, the B preferred then the B unpreferred, each
    scored on its completion (``~prompt_mask``) where it is real (its sequence mask, default
    ``seq != pad_id`` when ``pad_id`` is given).

    Every argument is checked (against the vocabulary and padding rules of
    ``adapter_on(device)``, the policy's adapter on the batch's device; padding the model must
    be told of, :func:`model_padding`, goes with the batch).  With a packing plan the pairs are
    packed (:func:`fastdpo.batching.packing.pack` checks they can; ``"auto"`` packs in the layout
    :func:`fastdpo.batching.packing.choose_layout` picks from the lengths, and leaves a batch that
    cannot pack unpacked; padding the model must be told of never packs); given ``check_packed``
    (:func:`fastdpo.models.check_first_pairs`), it is called as ``check_packed(adapter, layout,
    attention, preferred, unpreferred, prompt_mask, pref_mask, unpref_mask)`` once the pairs are
    packed, the masks as the batch reads them.
    """
    adapter = _check_pair_inputs(adapter_on, preferred, unpreferred, prompt_mask, pref_mask, unpref_mask)
    pref_mask, unpref_mask = real_tokens(preferred, pref_mask, pad_id), real_tokens(unpreferred, unpref_mask, pad_id)
    masks = {"preferred_seq_mask": pref_mask, "unpreferred_seq_mask": unpref_mask}
    padding = model_padding(adapter, alignment, masks, prompt_mask)
    keep = ~prompt_mask.repeat(2, 1)
    real = None
    if pref_mask is not None or unpref_mask is not None:
        ones = torch.ones_like(prompt_mask)
        real = torch.cat((ones if pref_mask is None else pref_mask, ones if unpref_mask is None else unpref_mask))
        keep = keep & real
    args = (preferred, unpreferred, prompt_mask, pref_mask, unpref_mask)
    packed, shard = _packed(adapter, packing_plan, args, padding, pad_id, check_packed, "pairs")
    return make_batch(torch.cat((preferred, unpreferred)), keep, alignment, packed, padding, real, shard)


def _packed(adapter: ModelAnswers, plan: PackingPlan, args: tuple, padding: Padding | None, pad_id: int | None,
            check_packed, what: str) -> tuple[packing.PackedLayout | None, ShardedLayout | None]:
    """The packed layout of pairs ``args`` (preferred, unpreferred, prompt mask, the two
    sequence masks) as ``plan`` says (None: unpacked), and this process's share of it under
    sequence parallelism; ``what`` names the sequences in errors."""
    if padding is not None and plan.group is not None:
        raise ValueError(f"sequence_parallel splits packed rows, and these {what} have padding before a real token "
                         f"(left padding): pad at the end")
    if padding is not None and plan.layout not in ("none", "auto"):
        raise ValueError(
            f"packing={plan.layout!r} packs right-padded {what}, and these have padding before a real "
            f"token: pad at the end, or pass packing='none' ('auto' runs such a batch unpacked)"
        )
    if plan.layout == "none" or padding is not None:
        return None, None
    layout, lengths = plan.layout, None
    try:
        lengths = packing.pair_lengths(*args)
    except ValueError:
        if layout != "auto":
            raise
    if layout == "auto":
        layout = packing.choose_layout(args[0].shape, lengths, plan.attention, args[0].device)
    if layout == "none":
        return None, None
    pad = pad_id if pad_id is not None else 0
    packed = packing.pack(*args, pad_token=pad, layout=layout, pack_length=plan.length, attention=plan.attention,
                          lengths=lengths)
    if check_packed is not None:
        check_packed(adapter, layout, plan.attention, *args)
    return packed, shard_rows(packed, plan.group) if plan.group is not None else None


def real_tokens(seq: Tensor, mask: Tensor | None, pad_id: int | None) -> Tensor | None:
    """A sequence mask as the modules read it: the given ``mask``, else ``seq != pad_id`` when
    ``pad_id`` is set, else None (every token is real)."""
    if mask is None and pad_id is not None:
        return seq != pad_id
    return mask


def unpaired_batch(
    adapter_on: Callable[[torch.device], ModelAnswers], seq: Tensor, prompt_mask: Tensor, seq_mask: Tensor | None,
    *, pad_id: int | None, alignment: str, names: tuple[str, str, str] = ("seq", "prompt_mask", "seq_mask"),
    packing_plan: PackingPlan = PackingPlan("none"), check_packed: Callable[..., None] | None = None,
) -> Batch:
    """The :class:`Batch` of N unpaired sequences ``seq`` (N, L), each scored on its completion
    (``~prompt_mask``) where it is real (``seq_mask``, default ``seq != pad_id`` when ``pad_id``
    is given), checked as :func:`pair_batch` checks a pair batch; errors name the arguments
    ``names`` (the sequences, their prompt mask, their sequence mask).  Packed as
    :func:`pair_batch` packs, each sequence a pair whose rejected completion is empty (its
    prompt and its completion in the layout's prompt and chosen parts)."""
    seq_name, prompt_name, mask_name = names
    _checks.integer_tokens(seq_name, seq, ndim=2)
    shape = tuple(seq.shape)
    if shape[0] < 1 or shape[1] < 2:
        raise ValueError(f"{seq_name} must be (N, L) with N >= 1 and L >= 2 (one input and one target token), got {shape}")
    _checks.bool_mask(prompt_name, prompt_mask, shape, "True = a prompt position, not scored")
    if seq_mask is not None:
        _checks.bool_mask(mask_name, seq_mask, shape, "True = a real token, False = padding")
    _checks.same_device(**{seq_name: seq, prompt_name: prompt_mask, mask_name: seq_mask})
    adapter = adapter_on(seq.device)
    _checks.token_range(seq_name, seq, adapter.vocab_size())
    seq_mask = real_tokens(seq, seq_mask, pad_id)
    padding = model_padding(adapter, alignment, {mask_name: seq_mask}, prompt_mask)
    keep = ~prompt_mask if seq_mask is None else ~prompt_mask & seq_mask
    args = (seq, seq, prompt_mask, seq_mask, prompt_mask)  # (the "rejected" sequence: its prompt alone)
    packed, shard = _packed(adapter, packing_plan, args, padding, pad_id, check_packed, "sequences")
    return make_batch(seq, keep, alignment, packed, padding, seq_mask, shard)


def _check_pair_inputs(adapter_on, preferred, unpreferred, prompt_mask, pref_mask, unpref_mask) -> ModelAnswers:
    _checks.integer_tokens("preferred_seq", preferred, ndim=2)
    _checks.integer_tokens("unpreferred_seq", unpreferred, ndim=2)
    shape = tuple(preferred.shape)
    if tuple(unpreferred.shape) != shape:
        raise ValueError(
            f"unpreferred_seq must have the shape of preferred_seq {shape}, got {tuple(unpreferred.shape)}"
        )
    if shape[0] < 1 or shape[1] < 2:
        raise ValueError(
            f"sequences must be (B, L) with B >= 1 and L >= 2 (one input and one target token), got {shape}"
        )
    _checks.bool_mask("prompt_mask", prompt_mask, shape, "True = a prompt position, not scored")
    for name, m in (("preferred_seq_mask", pref_mask), ("unpreferred_seq_mask", unpref_mask)):
        if m is not None:
            _checks.bool_mask(name, m, shape, "True = a real token, False = padding")
    _checks.same_device(
        preferred_seq=preferred, unpreferred_seq=unpreferred, prompt_mask=prompt_mask,
        preferred_seq_mask=pref_mask, unpreferred_seq_mask=unpref_mask,
    )
    adapter = adapter_on(preferred.device)
    high = adapter.vocab_size()
    _checks.token_range("preferred_seq", preferred, high)
    _checks.token_range("unpreferred_seq", unpreferred, high)
    return adapter


def given_reference_scores(pref: Tensor | None, unpref: Tensor | None, b: int, like: Tensor) -> Tensor | None:
    """Precomputed reference scores as one checked (2B,) float32 tensor, or None if not given."""
    if pref is None and unpref is None:
        return None
    if (pref is None) != (unpref is None):
        raise ValueError("give both ref_preferred_logprob and ref_unpreferred_logprob, or neither")
    pref = given_scores("ref_preferred_logprob", pref, b, like, "preferred_seq")
    unpref = given_scores("ref_unpreferred_logprob", unpref, b, like, "preferred_seq")
    return torch.cat((pref, unpref))


def given_scores(name: str, x: Tensor | None, n: int, like: Tensor, like_name: str) -> Tensor | None:
    """A precomputed (n,) score vector ``name``, checked (on the device of ``like``, the
    argument ``like_name``), as detached float32; None if not given."""
    if x is None:
        return None
    _checks.tensor(name, x, ndim=1)
    if x.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor, got dtype {x.dtype}")
    _checks.same_device(**{like_name: like, name: x})
    return x.detach().float()
