"""What every provider builds from: the models, the batch, the logits, the step callable.

make_models, make_batch, head_logits and make_step are what a provider's builder uses, so
every provider sees the same weights and tokens."""

from __future__ import annotations

import math
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import BETA, Config
from .registry import Step


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
    pref_mask: torch.Tensor  # (B, L) bool, True on real tokens (right padding after them)
    unpref_mask: torch.Tensor  # (B, L)
    src: torch.Tensor  # (2B, L-1) model inputs
    tgt: torch.Tensor  # (2B, L-1) targets
    mask: torch.Tensor  # (2B, L-1) x-transformers' mask: input-aligned, keep[:, :-1]
    mask_target: torch.Tensor  # (2B, L-1) TRL's mask: target-aligned, keep[:, 1:]

    @property
    def dpo_kwargs(self) -> dict:
        """The masks as a DPO module's ``forward`` takes them."""
        return dict(prompt_mask=self.prompt_mask, preferred_seq_mask=self.pref_mask, unpreferred_seq_mask=self.unpref_mask)

    @property
    def tokens(self) -> tuple[int, int]:
        """(padded, packed): the tokens of the 2B padded rows, and the real tokens with each
        prompt once (what a packed layout runs)."""
        real = int(self.pref_mask.sum() + self.unpref_mask.sum() - self.prompt_mask.sum())
        return self.src.numel() + self.src.shape[0], real


# Ragged lengths: log-normal prompt and completion lengths (medians L/8 and L/5, log-sd 0.8 and
# 0.7), clipped to fit L.  Long-tailed like chat preference data (most prompts short, a few long;
# completions of a few hundred tokens at L = 1024), not fitted to a dataset.
RAGGED_PROMPT = (1 / 8, 0.8)
RAGGED_COMPLETION = (1 / 5, 0.7)


def ragged_lengths(b: int, l: int, g: torch.Generator) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) lengths in tokens of B pairs, each sequence at most L."""
    def draw(share, sd, n):
        return (torch.randn(n, generator=g, dtype=torch.float64) * sd + math.log(share * l)).exp().round().long().tolist()

    prompts = [min(max(1, p), l - 2) for p in draw(*RAGGED_PROMPT, b)]
    comps = draw(*RAGGED_COMPLETION, 2 * b)
    chosen = [min(max(1, c), l - p) for c, p in zip(comps[:b], prompts)]
    rejected = [min(max(1, c), l - p) for c, p in zip(comps[b:], prompts)]
    return prompts, chosen, rejected


def make_batch(cfg: Config) -> Batch:
    """Seeded token ids with a shared prompt, both masks.  ``cfg.lengths="full"``: every sequence
    L tokens, no padding; the prompt ``cfg.prompt_pct`` percent of L (at least one token and two
    short of L; 0: L/8 to L/2 tokens drawn per pair).  ``"ragged"``: :func:`ragged_lengths`,
    right padding (token 0) to the batch's longest sequence."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    b, l, v = cfg.batch, cfg.seq_len, cfg.vocab
    pref = torch.randint(1, v, (b, l), generator=g)
    unpref = torch.randint(1, v, (b, l), generator=g)
    if cfg.lengths == "ragged":
        p, c, r = ragged_lengths(b, l, g)
        n = max(max(pi + ci, pi + ri) for pi, ci, ri in zip(p, c, r))
        pref, unpref = pref[:, :n], unpref[:, :n]
        ar = torch.arange(n)[None]
        prompt_lens = torch.tensor(p)[:, None]
        pref_mask = ar < prompt_lens + torch.tensor(c)[:, None]
        unpref_mask = ar < prompt_lens + torch.tensor(r)[:, None]
        pref, unpref = pref.masked_fill(~pref_mask, 0), unpref.masked_fill(~unpref_mask, 0)
    else:
        prompt_lens = torch.randint(max(1, l // 8), max(2, l // 2), (b, 1), generator=g)
        if cfg.prompt_pct:
            prompt_lens = torch.full((b, 1), min(max(1, round(cfg.prompt_pct * l / 100)), max(1, l - 2)))
        pref_mask = unpref_mask = torch.ones(b, l, dtype=torch.bool)
        n = l
    prompt_mask = torch.arange(n)[None] < prompt_lens
    unpref[prompt_mask] = pref[prompt_mask]  # a shared prompt
    seq = torch.cat((pref, unpref))
    keep = ~prompt_mask.repeat(2, 1) & torch.cat((pref_mask, unpref_mask))
    out = Batch(pref, unpref, prompt_mask, pref_mask, unpref_mask, seq[:, :-1], seq[:, 1:], keep[:, :-1], keep[:, 1:])
    for name, x in vars(out).items():
        setattr(out, name, x.to(cfg.device))
    return out


def kto_batch(cfg: Config, kl: bool = True) -> dict:
    """The bench batch as KTO's unpaired batch: the B preferred sequences desirable, then the B
    unpreferred ones undesirable (the 2B sequences a DPO step scores), collated by
    :class:`fastdpo.KTODataset` (TRL's KL sequences with ``kl``, cut at L tokens as TRL's
    ``max_length``): :meth:`fastdpo.KTO.forward`'s keyword arguments."""
    from fastdpo import KTODataset

    bt = make_batch(cfg)
    items = []
    for seqs, masks, label in ((bt.pref, bt.pref_mask, True), (bt.unpref, bt.unpref_mask, False)):
        for seq, real, prompt in zip(seqs.cpu(), masks.cpu(), bt.prompt_mask.cpu()):
            p = int(prompt.sum())
            items.append({"prompt": seq[:p], "completion": seq[p:][real[p:]], "label": label})
    ds = KTODataset(items, pad_id=0, kl=kl, max_length=cfg.seq_len)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    return {k: v.to(cfg.device) for k, v in batch.items()}


def _counted(seq_mask: torch.Tensor, prompt_mask: torch.Tensor) -> int:
    """Rows a head scores for (N, L) masks: the positions whose next token is a completion token."""
    return int((seq_mask & ~prompt_mask)[:, 1:].sum())


def body_plan(cfg: Config, mode: str) -> list[tuple[torch.nn.Module, torch.Tensor, int, bool]]:
    """The model runs a step of ``cfg.loss`` cannot avoid, in order, as ``(model, inputs, rows,
    grad)``: ``rows`` the positions whose log-prob the loss needs (the head products the floor
    counts), ``grad`` whether the run is differentiated (never in ``forward`` mode).

    * dpo: the reference (no_grad), then the policy, on the 2B sequences; the completions' rows.
    * orpo, cpo, simpo: the policy alone (no reference); orpo's rows add the chosen prompts'
      (its NLL term counts them, as TRL's ORPO).
    * kto: the reference on the 2B sequences, the reference and the policy (no_grad) on the
      2B KL sequences (:func:`kto_batch`), then the policy on the 2B sequences.
    """
    bt = make_batch(cfg)
    policy, ref = make_models(cfg)
    train = mode != "forward"
    rows = int(bt.mask.sum())
    if cfg.loss == "dpo":
        return [(ref, bt.src, rows, False), (policy, bt.src, rows, train)]
    if cfg.loss in ("cpo", "simpo"):
        return [(policy, bt.src, int(bt.mask_target.sum()), train)]
    if cfg.loss == "orpo":
        b = cfg.batch
        return [(policy, bt.src, int(bt.pref_mask[:, 1:].sum() + bt.mask_target[b:].sum()), train)]
    if cfg.loss == "kto":
        kb = kto_batch(cfg)
        kl_src, kl_rows = kb["kl_seq"][:, :-1], _counted(kb["kl_seq_mask"], kb["kl_prompt_mask"])
        rows = _counted(kb["seq_mask"], kb["prompt_mask"])
        src = kb["seq"][:, :-1]
        return [(ref, src, rows, False), (ref, kl_src, kl_rows, False), (policy, kl_src, kl_rows, False),
                (policy, src, rows, train)]
    raise ValueError(f"unknown loss {cfg.loss!r}")


def _pair_loss(scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """Mean DPO loss from (2B,) policy and reference scores, preferred first."""
    b = scores.shape[0] // 2
    logits = (scores[:b] - scores[b:]) - (ref_scores[:b] - ref_scores[b:])
    return -F.logsigmoid(BETA * logits).mean()


def make_step(loss_fn: Callable[[], torch.Tensor], mode: str, params) -> Step:
    """The step callable.  ``forward``: ``loss_fn()`` under ``torch.no_grad()``, an evaluation
    step (a training step always runs backward, so a forward recorded for autograd and then
    dropped measures nothing anyone runs).  ``forward+backward``: ``loss_fn()`` and its
    backward, a training step; the gradients are dropped after it."""
    params = list(params)
    if mode == "forward":

        def step():
            with torch.no_grad():
                return loss_fn().detach()

    else:

        def step():
            loss = loss_fn()
            loss.backward()
            for p in params:
                p.grad = None
            return loss.detach()

    return step


def counted_runs(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """(sequence, first, stop) of each sequence's counted positions of a (N, T) bool mask whose
    counted positions are one run per sequence (the bench's batches: prompt, then completion)."""
    m = mask.to(torch.int8)
    t = mask.shape[1]
    count, first, last = m.sum(-1).tolist(), m.argmax(-1).tolist(), (t - 1 - m.flip(-1).argmax(-1)).tolist()
    runs = []
    for i, (c, a, b) in enumerate(zip(count, first, last)):
        if c:
            if c != b - a + 1:
                raise ValueError(f"sequence {i}'s counted positions are not one run")
            runs.append((i, a, b + 1))
    return runs


def _logprobs_logsoftmax(logits, tgt, mask):
    """Masked sum of token log-probs the plain way: a full (N, T, V) log-softmax, gather."""
    lp = logits.log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def head_logits(cfg: Config) -> torch.Tensor:
    """The head workload's input: (2B, L-1, V) logits, a leaf that wants a gradient."""
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 3)
    shape = (2 * cfg.batch, cfg.seq_len - 1, cfg.vocab)
    logits = torch.randn(shape, generator=g, device=cfg.device, dtype=torch.float32)
    return logits.to(cfg.torch_dtype).requires_grad_()
