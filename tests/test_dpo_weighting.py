"""LD-DPO (``ld_alpha``) and WPO (``use_weighting``) through DPO (fastdpo.losses.weighting).

Under TRL's conventions (``"sum"``, ``"target"``) every route must give TRL 1.16's own
``DPOTrainer._compute_loss`` (tests/trl_harness.py: TRL's code on stub fused heads that return
float64 per-token fields of the same model's logits): loss within 1e-6 relative, every policy
gradient within 1e-5 norm-relative.  Under x-transformers' (``"mean"``, ``"input"``) the
numbers must be the module's documented definition, written here in float64 from the model's
own logits (:func:`hand_loss`).  Both on a Hugging Face Llama and an x-transformers model, the
fused and logits routes, the torch and (interpreted) Triton folds, packed batches, the small
path, precomputed reference scores; plus the edge cases the options invite and the checks.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastdpo.modules.dpo
import fastdpo.scoring.dpo_head_op
import fastdpo.scoring.logits_op
import fastdpo.losses.weighting as weighting
from fastdpo import DPO, LOSS_TYPES
from fastdpo.scoring.rows import TorchFold, TritonFold
from fastdpo.kernels.sequence_logprobs import row_logprobs, sequence_logprobs_backward, sequence_logprobs_forward
from tests.helpers import rel_err, tiny_transformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("trl")

from tests.trl_harness import trl_batch, trl_dpo_loss, trl_trainer  # noqa: E402

V, B, L = 97, 3, 11
TRL = dict(logprob_reduction="sum", mask_alignment="target")
XT = dict(logprob_reduction="mean", mask_alignment="input")


# ----------------------------------------------------------------------------- models, batches


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def xt(seed: int = 0):
    return tiny_transformer(V, max_seq_len=16, dim=32, depth=2, heads=4, seed=seed)


MODELS = {"llama": llama, "xt": xt}


def logits_of(model):
    """The model's own logits for token ids, as TRL's model call returns them (upcast)."""
    if isinstance(model, transformers.PreTrainedModel):
        return lambda ids, attention=None: model(input_ids=ids, use_cache=False).logits.double()
    return lambda ids, attention=None: model(ids).double()


def make_batch(seed: int = 3, lengths: str = "ragged"):
    """B pairs of (B, L) ids, prompt mask, right-padding masks.  ``"ragged"``: prompts of 2, 4
    and 3 tokens and completions of different lengths in each pair (the LD tail is non-empty);
    ``"equal"``: every pair's completions equally long; ``"empty"``: pair 1's chosen completion
    has no token, pair 2's rejected one none either."""
    g = torch.Generator().manual_seed(seed)
    pref, unpref = torch.randint(3, V, (B, L), generator=g), torch.randint(3, V, (B, L), generator=g)
    prompt = torch.tensor([[2], [4], [3]])
    pm = torch.arange(L)[None] < prompt
    unpref[pm] = pref[pm]
    pmask, umask = torch.ones(B, L, dtype=torch.bool), torch.ones(B, L, dtype=torch.bool)
    if lengths == "ragged":
        pmask[1, -3:] = False
        umask[2, -2:] = False
        umask[0, -5:] = False
    elif lengths == "empty":
        pmask[1, 4:] = False  # nothing after its 4-token prompt
        umask[2, 3:] = False
        pmask[0, -2:] = False
    else:
        assert lengths == "equal"
        pmask[1, -3:] = umask[1, -3:] = False
    return pref, unpref, pm, pmask, umask


def perturbed(model, seed: int = 1, std: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def make_dpo(kind: str, **kw) -> DPO:
    dpo = DPO(MODELS[kind](), **kw)
    perturbed(dpo.policy_model)  # the policy off its reference
    return dpo


def loss_and_grads(dpo: DPO, batch, **kw):
    pref, unpref, pm, pmask, umask = batch
    dpo.policy_model.zero_grad(set_to_none=True)
    loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in dpo.policy_model.named_parameters() if p.grad is not None}


def twin_grads(policy):
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def assert_close(loss, grads, want_loss, want_grads, loss_tol=1e-6, grad_tol=1e-5):
    assert abs(loss.item() - want_loss.item()) <= loss_tol * abs(want_loss.item()), (loss.item(), want_loss.item())
    assert grads.keys() == want_grads.keys()
    for n in want_grads:
        assert rel_err(grads[n], want_grads[n]) <= grad_tol, (n, rel_err(grads[n], want_grads[n]))


# ----------------------------------------------------------------------------- references


def trl_reference(dpo: DPO, batch, **config):
    """TRL 1.16's loss and policy gradients for ``dpo``'s models and ``batch`` (on copies)."""
    policy, reference = copy.deepcopy(dpo.policy_model), copy.deepcopy(dpo.ref_model).eval()
    policy.zero_grad(set_to_none=True)
    ids, completion, attention = trl_batch(*batch)
    loss = trl_dpo_loss(logits_of(policy), logits_of(reference), ids, completion, attention, beta=dpo.beta, **config)
    loss.backward()
    return loss.detach(), twin_grads(policy)


def hand_loss(policy, reference, batch, *, reduction, alignment, ld_alpha, use_weighting, beta=0.1):
    """The module's documented definition in float64 from the models' own logits: scores are
    LD-weighted sums (``"sum"``) or weighted means over the weighted count clamped at 1e-5
    (``"mean"``); ranks are TRL's ``mask.cumsum(1)``; WPO's weight is the policy's exp of the
    mean over the scored tokens of log p - log sum_v p_v^2, detached."""
    pref, unpref, pm, pmask, umask = batch
    seq = torch.cat((pref, unpref))
    keep = ~pm.repeat(2, 1) & torch.cat((pmask, umask))
    mask = keep[:, :-1] if alignment == "input" else keep[:, 1:]
    n = mask.sum(1)
    rank = mask.long().cumsum(1)
    shared = torch.minimum(n[:B], n[B:]).repeat(2)[:, None]
    w = torch.ones(mask.shape, dtype=torch.float64) if ld_alpha is None else torch.where(rank <= shared, 1.0, ld_alpha)
    w = w.double() * mask

    def per_token(model):
        logp = logits_of(model)(seq[:, :-1]).log_softmax(-1)
        lp = logp.gather(-1, seq[:, 1:, None]).squeeze(-1) * mask
        return lp, torch.logsumexp(2 * logp, -1) * mask

    def score(lp):
        s = (lp * w).sum(1)
        return s / w.sum(1).clamp(min=1e-5) if reduction == "mean" else s

    lp, log_sq = per_token(policy)
    with torch.no_grad():
        ref = score(per_token(reference)[0])
    pi = score(lp)
    loss = -F.logsigmoid(beta * ((pi[:B] - pi[B:]) - (ref[:B] - ref[B:])))
    if use_weighting:
        with torch.no_grad():
            a = torch.exp(((lp - log_sq) * mask).sum(1) / n.clamp(min=1))
        loss = loss * a[:B] * a[B:]
    return loss.mean()


def hand_reference(dpo: DPO, batch, **kw):
    policy, reference = copy.deepcopy(dpo.policy_model), copy.deepcopy(dpo.ref_model).eval()
    policy.zero_grad(set_to_none=True)
    loss = hand_loss(policy, reference, batch, reduction=dpo.logprob_reduction, alignment=dpo.mask_alignment,
                     beta=dpo.beta, **kw)
    loss.backward()
    return loss.detach(), twin_grads(policy)


# ----------------------------------------------------------------------------- TRL's numbers

OPTIONS = [dict(ld_alpha=a, use_weighting=w) for a, w in itertools.product([None, 0.0, 0.4, 1.0], [False, True])]
OPTION_IDS = [f"ld={o['ld_alpha']}-wpo={o['use_weighting']}" for o in OPTIONS]


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("kind", ["llama", "xt"])
def test_trl_conventions_equal_trls_compute_loss(kind, head, opts):
    dpo = make_dpo(kind, head=head, impl="torch", **TRL, **opts)
    batch = make_batch()
    assert_close(*loss_and_grads(dpo, batch), *trl_reference(dpo, batch, **opts))


@pytest.mark.parametrize("opts", [dict(ld_alpha=0.4, use_weighting=True), dict(ld_alpha=0.0, use_weighting=False)],
                         ids=["ld=0.4-wpo", "ld=0"])
@pytest.mark.parametrize("head", ["fused", "logits"])
def test_triton_folds_equal_trls_compute_loss(head, opts):
    """The Triton kernels (interpreted on the CPU): the row fold of the fused head and the
    logits kernels, with their log sum p^2 variant and per-row gradient weights."""
    dpo = make_dpo("llama", head=head, impl="triton", **TRL, **opts)
    batch = make_batch()
    assert_close(*loss_and_grads(dpo, batch), *trl_reference(dpo, batch, **opts))


@pytest.mark.parametrize("route", ["dpo_head", "fused"])
@pytest.mark.parametrize(
    "loss", [dict(loss_type="ipo"), dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5])],
    ids=["ipo", "sigmoid+ipo"],
)
def test_other_loss_types_and_the_scores_route_equal_trl(loss, route):
    """IPO normalizes by the UNweighted completion lengths (TRL's), a loss list is weighted
    pair by pair; the "scores" route (the linear op, what a loss that couples pairs takes)
    weighs and folds as the pair op does."""
    opts = dict(ld_alpha=0.4, use_weighting=True)
    dpo = make_dpo("xt", head="fused", **TRL, **opts, **loss)
    dpo.scorer.independent_pairs = route == "dpo_head"  # before the first call decides the route
    batch = make_batch()
    assert_close(*loss_and_grads(dpo, batch), *trl_reference(dpo, batch, **opts, **loss))
    assert dpo.route(dpo.policy_model, "cpu").kind == route


@pytest.mark.parametrize("lengths", ["equal", "empty"])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_ld_edge_lengths_equal_trl(lengths, alpha):
    """Equal-length pairs have no tail (any alpha is plain DPO); an empty completion makes the
    other's whole completion the tail."""
    opts = dict(ld_alpha=alpha, use_weighting=True)
    dpo = make_dpo("llama", head="fused", **TRL, **opts)
    batch = make_batch(lengths=lengths)
    got = loss_and_grads(dpo, batch)
    assert_close(*got, *trl_reference(dpo, batch, **opts))
    if lengths == "equal":
        plain = DPO(copy.deepcopy(dpo.policy_model), head="fused", use_weighting=True, **TRL)
        plain.ref_model = copy.deepcopy(dpo.ref_model)
        assert torch.equal(loss_and_grads(plain, batch)[0], got[0])


def test_precomputed_reference_scores_follow_ld_as_trls_compute_ref_log_probs():
    from trl.trainer.dpo_trainer import DPOTrainer

    opts = dict(ld_alpha=0.3)
    dpo = make_dpo("llama", head="fused", **TRL, **opts)
    batch = make_batch()
    pref, unpref, pm, pmask, umask = batch
    ref_w, ref_l = dpo.reference_scores(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask,
                                        unpreferred_seq_mask=umask)
    # TRL's own precompute step on the same batch
    ids, completion, attention = trl_batch(*batch)
    from tests.trl_harness import _FusedHeadStub

    stub = _FusedHeadStub(logits_of(dpo.ref_model.eval()), torch.float64, None).eval()
    trainer = trl_trainer(stub, None, precompute=True, training=False, aux_loss_coef=0.0,
                          device=ids.device, beta=dpo.beta, **opts)
    trainer.accelerator.autocast = contextlib.nullcontext
    with torch.no_grad():
        want_w, want_l = DPOTrainer.compute_ref_log_probs(
            trainer, stub, {"input_ids": ids, "attention_mask": attention, "completion_mask": completion})
    torch.testing.assert_close(torch.cat((ref_w, ref_l)).double(), torch.cat((want_w, want_l)), rtol=1e-6, atol=1e-6)
    # fed back, TRL's precomputed path and ours agree, and equal running the reference
    got = loss_and_grads(dpo, batch, ref_preferred_logprob=ref_w, ref_unpreferred_logprob=ref_l)
    assert_close(*got, *loss_and_grads(dpo, batch), loss_tol=1e-6, grad_tol=1e-6)
    policy = copy.deepcopy(dpo.policy_model)
    loss = trl_dpo_loss(logits_of(policy), None, ids, completion, attention, ref_chosen_logps=want_w,
                        ref_rejected_logps=want_l, beta=dpo.beta, **opts)
    loss.backward()
    assert_close(*got, loss.detach(), twin_grads(policy))


def test_metrics_are_trls_under_ld():
    """TRL logs the LD-weighted log-probs and rewards: so does return_metrics."""
    opts = dict(ld_alpha=0.25, use_weighting=True)
    dpo = make_dpo("xt", head="fused", **TRL, **opts)
    batch = make_batch()
    pref, unpref, pm, pmask, umask = batch
    _, metrics = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask,
                     return_metrics=True)
    logged: dict = {}
    with torch.no_grad():
        trl_dpo_loss(logits_of(dpo.policy_model), logits_of(dpo.ref_model.eval()), *trl_batch(*batch),
                     beta=dpo.beta, metrics=logged, **opts)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert abs(metrics[k].item() - logged[k][0]) <= 1e-6 * max(1.0, abs(logged[k][0])), k


# ----------------------------------------------------------------------------- x-transformers' conventions


@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("kind", ["llama", "xt"])
def test_mean_conventions_equal_their_definition(kind, head, opts):
    dpo = make_dpo(kind, head=head, impl="torch", **XT, **opts)
    batch = make_batch()
    assert_close(*loss_and_grads(dpo, batch), *hand_reference(dpo, batch, **opts))


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_mean_conventions_triton(head):
    opts = dict(ld_alpha=0.4, use_weighting=True)
    dpo = make_dpo("xt", head=head, impl="triton", **XT, **opts)
    batch = make_batch()
    assert_close(*loss_and_grads(dpo, batch), *hand_reference(dpo, batch, **opts))


@pytest.mark.parametrize("lengths", ["equal", "empty"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_mean_edge_lengths(lengths, alpha):
    """ld_alpha=0 with an empty completion: the other sequence's weighted count is 0, its
    score 0 (the 1e-5 clamp); ld_alpha=1 is the plain mean, bitwise."""
    opts = dict(ld_alpha=alpha, use_weighting=False)
    dpo = make_dpo("xt", head="fused", **XT, **opts)
    batch = make_batch(lengths=lengths)
    got = loss_and_grads(dpo, batch)
    assert_close(*got, *hand_reference(dpo, batch, **opts))
    if alpha == 1.0 or lengths == "equal":
        plain = DPO(copy.deepcopy(dpo.policy_model), head="fused", **XT)
        plain.ref_model = copy.deepcopy(dpo.ref_model)
        want = loss_and_grads(plain, batch)
        assert torch.equal(got[0], want[0]) and all(torch.equal(got[1][k], want[1][k]) for k in want[1])


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_evaluation_gives_the_training_loss(head):
    """Without gradients the pair op scores forward only (its other branch): same loss."""
    opts = dict(ld_alpha=0.4, use_weighting=True)
    dpo = make_dpo("llama", head=head, **TRL, **opts)
    batch = make_batch()
    pref, unpref, pm, pmask, umask = batch
    with torch.no_grad():
        loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    want = trl_reference(dpo, batch, **opts)[0]
    assert abs(loss.item() - want.item()) <= 1e-6 * want.item()


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_compiled_step(head):
    """torch.compile(fullgraph=True) over a step with both options: no graph break, the eager
    numbers (the token weights are built in the graph, the ops' new arguments traced)."""
    opts = dict(ld_alpha=0.4, use_weighting=True)
    dpo = make_dpo("xt", head=head, **TRL, **opts)
    batch = make_batch()
    want = loss_and_grads(dpo, batch)
    torch._dynamo.reset()
    dpo.policy_model.zero_grad(set_to_none=True)
    step = torch.compile(lambda p, u, m, a, b: dpo(p, u, prompt_mask=m, preferred_seq_mask=a, unpreferred_seq_mask=b),
                         fullgraph=True, backend="aot_eager")
    loss = step(*batch)
    loss.backward()
    assert_close(loss.detach(), twin_grads(dpo.policy_model), *want, grad_tol=1e-6)


def test_bfloat16_model():
    opts = dict(ld_alpha=0.4, use_weighting=True)
    dpo = DPO(xt().to(torch.bfloat16), head="fused", **TRL, **opts)
    perturbed(dpo.policy_model)
    batch = make_batch()
    got = loss_and_grads(dpo, batch)
    assert_close(*got, *trl_reference(dpo, batch, **opts), loss_tol=2e-2, grad_tol=3e-2)


@pytest.mark.small_path
@pytest.mark.parametrize("conv", [TRL, XT], ids=["trl", "xt"])
def test_small_path(conv, monkeypatch):
    """A fused head's step this small builds its logits and takes the plain ops: they weigh
    and fold log sum p^2 too."""
    taken = []
    real = fastdpo.scoring.logits_op._small_logprobs
    monkeypatch.setattr(fastdpo.scoring.logits_op, "_small_logprobs", lambda *a: taken.append(a[-1]) or real(*a))
    opts = dict(ld_alpha=0.4, use_weighting=True)
    dpo = make_dpo("xt", head="fused", **conv, **opts)
    batch = make_batch()
    got = loss_and_grads(dpo, batch)
    assert taken and taken[-1] is True  # the policy's call asked for log sum p^2
    assert_close(*got, *hand_reference(dpo, batch, **opts))


@pytest.mark.parametrize("packing", ["pair", "batch"])
@pytest.mark.parametrize("conv", [TRL, XT], ids=["trl", "xt"])
def test_packed_batches(packing, conv):
    """Packed rows are gathered back to the unpacked layout, where the weights live."""
    opts = dict(ld_alpha=0.4, use_weighting=True)
    packed = make_dpo("xt", head="fused", packing=packing, **conv, **opts)
    plain = DPO(copy.deepcopy(packed.policy_model), head="fused", **conv, **opts)
    plain.ref_model = copy.deepcopy(packed.ref_model)
    batch = make_batch()
    got = loss_and_grads(packed, batch)
    assert_close(*got, *loss_and_grads(plain, batch))
    assert_close(*got, *hand_reference(packed, batch, **opts))


def test_pair_groups_and_recomputed_chunks():
    """The pair op in groups of one pair with most logits recomputed (tiny budgets): the
    weights and the WPO sums are per group, the recomputed rows' gradients weighted."""
    opts = dict(ld_alpha=0.4, use_weighting=True)
    dpo = make_dpo("llama", head="fused", **TRL, **opts, chunk_bytes=3 * V * 4, group_bytes=5 * V * 4)
    batch = make_batch()
    assert_close(*loss_and_grads(dpo, batch), *trl_reference(dpo, batch, **opts))


# ----------------------------------------------------------------------------- WPO: underflow, detach


class Bigram(torch.nn.Module):
    """Logits that depend on the current token only: a table we can set entry by entry."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, ids):
        return self.table[ids]


def underflowing():
    """A bigram table, and a batch whose pair 0 rejected completion alternates two tokens
    whose transitions have logits 1e4 below the rest: every target probability is exp(-1e4),
    0 in float32 (and in float64), so its WPO weight is exp(-1e4) = 0."""
    g = torch.Generator().manual_seed(4)
    table = torch.randn(V, V, generator=g) * 2
    a, b = 5, 6
    table[a, b] = table[b, a] = -1e4
    batch = make_batch()
    batch[1][0, 2:] = torch.tensor([a, b] * L)[: L - 2]
    batch[4][0] = True  # the whole rejected sequence is real
    return table, batch


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_wpo_weight_of_an_underflowing_completion_is_zero_not_nan(impl):
    """TRL's weight for that pair is exactly 0, so is ours: the pair adds no loss and no
    gradient, and every number stays finite (log sum p^2 is formed from the row max, never as
    the log of a sum of underflowed squares); the logits route, then the fused pair op."""
    opts = dict(use_weighting=True)
    table, batch = underflowing()
    dpo = DPO(Bigram(table.clone()), head="logits", impl=impl, **TRL, **opts)
    perturbed(dpo.policy_model, std=0.3)
    loss, grads = loss_and_grads(dpo, batch)
    want = trl_reference(dpo, batch, **opts)
    assert loss.isfinite() and grads["table"].isfinite().all()
    assert_close(loss, grads, *want)
    # without pair 0: the same loss times B / (B - 1), the same gradient times B / (B - 1)
    rest = [x[1:] for x in batch]
    loss_rest, grads_rest = loss_and_grads(dpo, rest)
    assert abs(loss.item() * B / (B - 1) - loss_rest.item()) <= 1e-6 * loss_rest.item()
    assert rel_err(grads["table"] * B / (B - 1), grads_rest["table"]) <= 1e-6

    # The fused pair op on the same logits (one-hot hidden states times the table).
    from fastdpo.batching.batch import make_batch as batch_of
    from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head

    pref, unpref, pm, pmask, umask = batch
    bt = batch_of(torch.cat((pref, unpref)), ~pm.repeat(2, 1) & torch.cat((pmask, umask)), "target")
    hidden = F.one_hot(bt.src, V).float()
    weight = dpo.policy_model.table.detach().T.contiguous().requires_grad_()
    ref_scores = torch.zeros(2 * B)
    with torch.no_grad():
        for i, (r, m) in enumerate(zip(dpo.ref_model.table[bt.src], bt.mask)):
            ref_scores[i] = (r.log_softmax(-1).gather(-1, bt.tgt[i, :, None]).squeeze(-1) * m).sum()
    opts_op = HeadOptions(impl=impl, scale=None, ref_scale=None, reduction="sum", loss=dpo.loss, use_weighting=True)
    op_loss, *_ = dpo_head(hidden, weight, bt.tgt, bt.mask, bt.count, opts_op, ref_scores=ref_scores)
    op_loss.backward()
    assert abs(op_loss.item() - want[0].item()) <= 1e-6 * want[0].item()
    # logits = hidden @ weight.T = table[src]: the weight's gradient is the table's, transposed
    assert weight.grad.isfinite().all() and rel_err(weight.grad.T, want[1]["table"]) <= 1e-5


@pytest.mark.parametrize("fold", [TorchFold, TritonFold], ids=["torch", "triton"])
def test_log_sum_sq_of_extreme_rows(fold):
    """log sum_v p_v^2 of rows whose probabilities mostly underflow (logits spread over 1e4),
    of a flat row (-log V), and of a one-hot-like row (0): float64's to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 300, generator=g) * torch.tensor([1.0, 30.0, 1e3, 1e4, 0.0, 1.0])[:, None]
    z[5, 7] = 200.0
    y = torch.randint(0, 300, (6,), generator=g)
    sq = torch.empty(6)
    st, logp = fold.stats(z.clone(), y, sq_out=sq)
    want = torch.logsumexp(2 * z.double().log_softmax(-1), -1)
    assert sq.isfinite().all()
    torch.testing.assert_close(sq.double(), want, rtol=0, atol=2e-6)
    # rows of a Llama-sized vocabulary: float32 rounding of the sum, not a drift of its accumulation
    big = torch.randn(4, 32000, generator=g) * 3
    big_sq = torch.empty(4)
    fold.stats(big.clone(), torch.zeros(4, dtype=torch.long), sq_out=big_sq)
    want = torch.logsumexp(2 * big.double().log_softmax(-1), -1)
    torch.testing.assert_close(big_sq.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(logp.double(), z.double().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1), rtol=1e-6,
                               atol=2e-6)


def test_dropping_the_wpo_detach_changes_the_gradient(monkeypatch):
    """The mutation check: a weight left attached to the policy's log-probs changes the policy
    gradient far beyond the tolerance of the tests above (which compare gradients with TRL's
    detached weights), on the fused pair op and on the logits route."""
    batch = make_batch()

    def attached(logps, log_sum_sq, tokens):
        b = logps.shape[0] // 2
        w = torch.exp((logps - log_sum_sq.float()) / tokens.clamp(min=1))  # no .detach()
        return w[:b] * w[b:]

    for head in ("fused", "logits"):
        dpo = make_dpo("llama", head=head, **TRL, use_weighting=True)
        want = trl_reference(dpo, batch, use_weighting=True)
        assert_close(*loss_and_grads(dpo, batch), *want)
        with monkeypatch.context() as m:
            m.setattr(fastdpo.scoring.dpo_head_op, "wpo_weights", attached)
            m.setattr(fastdpo.modules.dpo, "wpo_weights", attached)
            loss, grads = loss_and_grads(dpo, batch)
        assert abs(loss.item() - want[0].item()) <= 1e-6 * want[0].item()  # same value
        assert max(rel_err(grads[n], want[1][n]) for n in grads) > 1e-2  # another gradient


# ----------------------------------------------------------------------------- the kernels and ops


def test_triton_logits_kernels_weights_and_log_sum_sq():
    g = torch.Generator().manual_seed(5)
    n, t, v = 3, 4, 70
    z = torch.randn(n, t, v, generator=g) * 4
    y = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    w = torch.rand(n, t, generator=g)
    w[~mask] = float("nan")  # never read where masked
    wpo = torch.empty(2, n)
    scores, _, stats = sequence_logprobs_forward(z, y, mask, weights=w, wpo_sums=wpo, _block_v=32)
    lsm = z.double().log_softmax(-1)
    lp = torch.where(mask, lsm.gather(-1, y[..., None]).squeeze(-1), 0.0)
    torch.testing.assert_close(scores.double(), torch.where(mask, lp * w.double(), 0.0).sum(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wpo[1].double(), lp.sum(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wpo[0].double(), torch.where(mask, torch.logsumexp(2 * lsm, -1), 0.0).sum(-1),
                               rtol=1e-6, atol=1e-6)
    up = torch.randn(n, generator=g)
    grad = sequence_logprobs_backward(z, y, mask, stats, up, weights=w, _block_v=32)
    zz = z.double().requires_grad_()
    lp2 = zz.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    (torch.where(mask, lp2 * torch.where(mask, w, 0.0).double(), 0.0).sum(-1) * up.double()).sum().backward()
    torch.testing.assert_close(grad.double(), zz.grad, rtol=1e-5, atol=1e-6)
    sq = torch.empty(n * t)
    logp, _ = row_logprobs(z.view(-1, v), y.view(-1), sq)
    torch.testing.assert_close(sq.double(), torch.logsumexp(2 * lsm, -1).view(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_public_ops_take_token_weights(impl):
    from fastdpo import linear_sequence_logprobs, sequence_logprobs

    g = torch.Generator().manual_seed(2)
    n, t, d, v = 3, 5, 8, 37
    h = torch.randn(n, t, d, generator=g)
    wt = torch.randn(v, d, generator=g)
    y = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > 0.3
    w = torch.rand(n, t, generator=g, dtype=torch.float64)
    up = torch.randn(n, generator=g)

    def truth(hh, ww):
        lp = (hh.double() @ ww.double().T).log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
        return torch.where(mask, lp * w, 0.0).sum(-1)

    for route in ("logits", "linear", "linear-gemm"):
        if route == "linear-gemm" and impl == "torch":
            continue
        hh, ww = h.clone().requires_grad_(), wt.clone().requires_grad_()
        if route == "logits":
            s = sequence_logprobs(hh @ ww.T, y, mask, impl=impl, token_weights=w)
        else:
            s = linear_sequence_logprobs(hh, ww, y, mask, impl=impl, token_weights=w,
                                         matmul="triton" if route == "linear-gemm" else "auto")
        (s * up).sum().backward()
        h64, w64 = h.double().requires_grad_(), wt.double().requires_grad_()
        want = truth(h64, w64)
        (want * up.double()).sum().backward()
        torch.testing.assert_close(s.double(), want, rtol=1e-5, atol=1e-5, msg=route)
        assert rel_err(hh.grad, h64.grad) <= 1e-5 and rel_err(ww.grad, w64.grad) <= 1e-5, route
    with pytest.raises(ValueError, match="token_weights"):
        sequence_logprobs(h @ wt.T, y, mask, impl=impl, token_weights=w[:, :2])
    with pytest.raises(TypeError, match="token_weights"):
        sequence_logprobs(h @ wt.T, y, mask, impl=impl, token_weights=mask)


# ----------------------------------------------------------------------------- checks


def test_ld_token_weights_rank_as_trls_comp_pos():
    """TRL's masks, written from its _compute_loss, on masks with holes and empty rows."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = torch.rand(8, 9, generator=g) > 0.4
        mask[torch.randint(0, 8, (1,), generator=g)] = False
        alpha = torch.rand(1, generator=g).item()
        comp_pos = mask.long().cumsum(1)
        lens = mask.sum(1)
        shared = torch.minimum(lens[:4], lens[4:]).repeat(2)[:, None]
        shared_mask = (comp_pos > 0) & (comp_pos <= shared)
        tail_mask = comp_pos > shared
        lp = torch.randn(8, 9, dtype=torch.float64, generator=g) * mask  # TRL's zeros where masked
        want = (lp * shared_mask).sum(1) + alpha * (lp * tail_mask).sum(1)
        w = weighting.ld_token_weights(mask, alpha)
        torch.testing.assert_close((lp * w.double()).sum(1), want, rtol=1e-7, atol=1e-7)
        assert (w[~mask] == 0).all()


def model_for_checks():
    return xt()


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_ld_alpha_outside_unit_interval_is_named(bad):
    with pytest.raises(ValueError, match="ld_alpha"):
        DPO(model_for_checks(), ld_alpha=bad)


def test_option_types_are_named():
    with pytest.raises(TypeError, match="ld_alpha"):
        DPO(model_for_checks(), ld_alpha="0.5")
    with pytest.raises(TypeError, match="ld_alpha"):
        DPO(model_for_checks(), ld_alpha=True)
    with pytest.raises(TypeError, match="use_weighting"):
        DPO(model_for_checks(), use_weighting=1)
    assert DPO(model_for_checks(), ld_alpha=0).ld_alpha == 0.0
    assert DPO(model_for_checks(), ld_alpha=1).ld_alpha == 1.0


def test_wpo_with_sorting_losses_is_refused_as_trl_refuses_it():
    with pytest.raises(NotImplementedError, match="use_weighting.*aot"):
        weighting.check_use_weighting(True, ("sigmoid", "aot"))
    with pytest.raises(NotImplementedError, match="aot_unpaired"):
        weighting.check_use_weighting(True, ("aot_unpaired",))
    assert weighting.check_use_weighting(False, ("aot",)) is False
    for t in ("aot", "aot_unpaired"):
        if t in LOSS_TYPES:  # once the loss types are there, through DPO too
            with pytest.raises(NotImplementedError, match=t):
                DPO(model_for_checks(), loss_type=t, use_weighting=True)


def test_sft_with_ld_alpha_or_wpo_is_refused_by_name():
    """TRL's 'sft' term is the batch mean of the chosen tokens' plain log-probs, and WPO scales
    that one number by every pair's weight: neither follows from the LD-weighted per-pair sums
    the other types read, so the combinations are refused rather than computed differently."""
    for kwargs in (dict(use_weighting=True), dict(ld_alpha=0.5), dict(ld_alpha=1.0)):
        with pytest.raises(NotImplementedError, match="'sft' with ld_alpha or use_weighting"):
            DPO(model_for_checks(), loss_type=["sigmoid", "sft"], **kwargs)
    DPO(model_for_checks(), loss_type=["sigmoid", "sft"])  # each alone is fine
    DPO(model_for_checks(), loss_type="sigmoid", use_weighting=True, ld_alpha=0.5)


def test_wpo_refuses_the_triton_gemm_and_auto_routes_around_it():
    with pytest.raises(ValueError, match="matmul='triton'.*use_weighting"):
        DPO(model_for_checks(), use_weighting=True, impl="triton", matmul="triton")
    dpo = DPO(model_for_checks(), use_weighting=True, impl="triton", matmul="auto")
    assert dpo.route(dpo.policy_model, "cpu").matmul == "torch"
    assert dpo.route(dpo.policy_model, "cpu").kind == "dpo_head"
