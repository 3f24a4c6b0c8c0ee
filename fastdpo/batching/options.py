"""The options of every module that say which tokens count and how a batch runs through the
models: :class:`TokenOptions` and :class:`PackingOptions` (each field's doc is the option's one
docstring; :func:`fastdpo.modules.options.with_options` puts them in each module's)."""

from __future__ import annotations

from dataclasses import dataclass

from .._options import option


@dataclass(frozen=True, kw_only=True)
class TokenOptions:
    """Which tokens a sequence's score counts, and how it adds them up."""

    pad_id: int | None = option(None, "when given, a missing sequence mask becomes ``seq != pad_id``.")
    logprob_reduction: str = option("mean", """
        how token log-probs make a sequence score.  ``"mean"`` (default, x-transformers): the
        masked mean, the count clamped at 1e-5 so an empty completion scores 0.  ``"sum"`` (the
        DPO paper, TRL): the masked sum.  Each module's docstring says what it means for its loss.""")
    mask_alignment: str = option("input", """
        which mask position decides whether the log-prob of target token ``seq[:, j + 1]``
        counts.  ``"input"`` (default, x-transformers): the mask at input position j, i.e.
        ``mask[:, :-1]`` -- the first completion token is not scored and the token after the
        last unmasked one is.  ``"target"`` (the DPO paper, TRL): the mask at the target
        position, ``mask[:, 1:]``.""")


@dataclass(frozen=True, kw_only=True)
class PackingOptions:
    """How a batch of pairs runs through the models: padded rows, or packed ones."""

    packing: str = option("none", """
        ``"none"`` (default): padded rows of 2B sequences, as x-transformers.  ``"pair"``: each
        pair as one packed sequence ``[prompt, chosen completion, rejected completion]``
        (:mod:`fastdpo.batching.packing`), so the prompt runs once.  ``"batch"``: whole pairs
        packed first-fit into as few rows as fit (of ``pack_length`` slots, default the longest
        packed pair), so no padding runs either.  ``"auto"``: ``"batch"`` for the batches where
        it pays (:func:`fastdpo.batching.packing.choose_layout`), else ``"none"``.  Packed
        scores are the unpacked ones to float rounding.  Each pair's prompt must be a prefix,
        equal in both sequences, with right padding (else a ``ValueError`` naming the pair;
        ``"auto"`` runs such a batch unpacked); a model that cannot pack raises at construction,
        or on its first packed call when packing changes its hidden states
        (:func:`fastdpo.models.check_first_pairs`).""")
    pack_length: int | None = option(None, 'with ``packing="batch"`` or ``"auto"``, the slots of a packed row.')
    pack_attention: str = option("auto", """
        how packed rows attend.  ``"auto"`` (default): by parts where the model's adapter can
        (:mod:`fastdpo.batching.attention`: no masked block is computed), else through the dense
        mask, with a warning saying why; ``"segments"`` insists (``ValueError``); ``"dense"``:
        the dense (rows, 1, T, T) mask.""")
    share_prompt: bool = option(False, '``True`` is ``packing="pair"`` (its earlier name).')
    sequence_parallel: object = option(None, """
        a ``torch.distributed`` process group (or a one-dimensional ``DeviceMesh``, a mesh's
        dimension) whose processes split each packed batch's tokens
        (:mod:`fastdpo.batching.sequence_parallel`): each runs the models on 1/N of the slots,
        attention exchanges heads (Ulysses) or keys and values (a ring, when the heads do not
        divide by N), and the per-sequence scores are summed over the group.  Every process of
        the group gets the same batch, and takes part in the gradient average (DDP or FSDP2
        over the world).  Needs ``packing="pair"`` or ``"batch"`` and a model whose attention
        fastdpo computes by parts; None (default): off.""")
