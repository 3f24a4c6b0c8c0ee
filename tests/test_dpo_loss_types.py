"""TRL 1.16's other DPO losses in ``DPO``: ``aot``, ``aot_unpaired``, ``discopop``, ``sft`` and the
f-divergences (``f_divergence_type``), on the fused and logits routes, HF and x-transformers models.

Under TRL's conventions (``logprob_reduction="sum"``, ``mask_alignment="target"``) the loss and
every policy gradient equal TRL's own ``DPOTrainer._compute_loss`` (tests/trl_harness.py) and the
float64 formulas of tests/test_losses.py (written from the papers); under x-transformers'
conventions they equal those formulas on mean scores, as :func:`fastdpo.preference_loss`
documents each type there.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("transformers")

from fastdpo import DPO, check_loss_config, preference_loss  # noqa: E402
from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head  # noqa: E402
from fastdpo.losses.pairwise import pair_losses  # noqa: E402
from tests.helpers import rel_err, tiny_transformer  # noqa: E402
from tests.test_hf import B, CONVENTIONS, V, batch, grads_of, perturb, tiny  # noqa: E402
from tests.test_losses import truth  # noqa: E402
from tests.trl_harness import trl_batch, trl_dpo_loss  # noqa: E402

# (options, as DPO and TRL's DPOConfig both name them); beta 0.1 unless given.
CASES = [
    dict(loss_type="aot"),
    dict(loss_type="aot", label_smoothing=0.1, beta=0.5),
    dict(loss_type="aot_unpaired"),
    dict(loss_type="discopop"),
    dict(loss_type="discopop", discopop_tau=0.3),
    dict(loss_type="sft"),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # TRL's MPO recipe
    dict(loss_type=["aot", "sft"], loss_weights=[1.0, 0.5]),
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence"),
    dict(loss_type="hinge", f_divergence_type="js_divergence", beta=0.5),
    dict(loss_type="ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7),
    dict(loss_type="sigmoid_norm", f_divergence_type="forward_kl"),
    dict(loss_type="robust", f_divergence_type="js_divergence", label_smoothing=0.2),
    dict(loss_type="exo_pair", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.6,
         label_smoothing=0.01),
    dict(loss_type="discopop", f_divergence_type="js_divergence"),
    dict(loss_type=["sigmoid", "sft"], f_divergence_type="forward_kl"),
]


def head_inputs(seed: int, n: int, t: int, d: int, v: int, keep: float):
    """Seeded random inputs of the pair op: hidden (n, t, d) and weight (v, d) wanting
    gradients, targets, a mask keeping about ``keep`` of the positions, its per-row counts."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g, requires_grad=True)
    weight = torch.randn(v, d, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) < keep
    return g, hidden, weight, targets, mask


def case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def make(family: str, dtype=None):
    if family == "hf":
        m = tiny("LlamaForCausalLM")
    else:
        m = tiny_transformer(V, max_seq_len=16, dim=16, depth=1, heads=2, seed=0)
    return m if dtype is None else m.to(dtype)


def logits_fn(model):
    """What TRL's model call gives its head, (N, L, V) logits of ``ids`` (L positions), computed
    as fastdpo computes them: on ``ids[:, :-1]`` (the last position predicts no label, TRL's
    head drops it; a float32 forward over L or L-1 positions differs by ~1e-6 in these sums,
    blocked kernels, which is neither loss's doing)."""
    def run(ids):
        if hasattr(model, "config"):  # Hugging Face
            return model(input_ids=ids, use_cache=False).logits
        return model(ids)

    def logits(ids, att):
        z = run(ids[:, :-1])
        return torch.cat((z, z.new_zeros(z.shape[0], 1, z.shape[2])), 1)

    return logits


def dpo_step(family, case, head, conv, *, dtype=None, data=None):
    """DPO's loss and policy gradients on a perturbed policy; the module, the untouched model."""
    model = make(family, dtype)
    start = copy.deepcopy(model)
    dpo = DPO(model, head=head, **CONVENTIONS[conv], **case)
    perturb(model)
    pref, unpref, pm, pmask, umask = data or batch()
    loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    loss.backward()
    got = grads_of(model)
    model.zero_grad(set_to_none=True)
    return dpo, loss, got, start


def assert_same(loss, got, want_loss, want, *, loss_tol=1e-6, grad_tol=1e-5):
    assert abs(loss.item() - want_loss.item()) <= loss_tol * abs(want_loss.item()), (loss.item(), want_loss.item())
    assert got.keys() == want.keys() and got
    for name in want:
        assert rel_err(got[name], want[name]) <= grad_tol, (name, rel_err(got[name], want[name]))


def trl_loss(dpo, start, case, data=None, dtype=torch.float64, **kw):
    """TRL's ``_compute_loss`` on the module's models (their own logits), the stub head's
    fields in ``dtype``."""
    pref, unpref, pm, pmask, umask = data or batch()
    ids, completion, attention = trl_batch(pref, unpref, pm, pmask, umask)
    reference = dpo.ref_model if dpo.ref_model is not None else start  # sft alone: unread
    return trl_dpo_loss(logits_fn(dpo.policy_model), logits_fn(reference.eval()), ids, completion, attention,
                        dtype=dtype, **case, **kw)


def with_grads(dpo, loss):
    loss.backward()
    grads = grads_of(dpo.policy_model)
    dpo.policy_model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_against_trl(dpo, loss, got, start, case, data=None):
    """Ours against TRL's ``_compute_loss`` in float64 (the truth): within 1e-6 (loss) and 1e-5
    (each gradient, norm-relative) beyond the distance of TRL's own float32 computation (its
    head's fields computed in float32, as its kernel does) from that truth -- the three-way rule
    of tests/helpers.py.  On these models the float32 scores are sums of ~46: half an ulp is
    2e-6, and a loss whose slope is large there (forward KL's e^-r) turns that into more than
    1e-6 of the loss for any float32 computation, TRL's included.

    TRL's alpha-divergence clamp table has no float64 entry (a KeyError): there the truth is the
    float64 formula of tests/test_losses.py, itself checked against TRL's float32 computation."""
    if case.get("f_divergence_type") == "alpha_divergence":
        truth, truth_g = with_grads(dpo, formula_loss(dpo, case, CONVENTIONS["trl"], data))
    else:
        truth, truth_g = with_grads(dpo, trl_loss(dpo, start, case, data))
    trl32, trl32_g = with_grads(dpo, trl_loss(dpo, start, case, data, torch.float32, compute_dtype=torch.float32))
    err_trl = abs(trl32.item() - truth.item())
    assert err_trl <= 1e-5 * abs(truth.item()), (trl32.item(), truth.item())  # the formula is TRL's
    assert abs(loss.item() - truth.item()) <= err_trl + 1e-6 * abs(truth.item()), (loss.item(), truth.item(), err_trl)
    assert got.keys() == truth_g.keys() and got
    for name in truth_g:
        ours, theirs = rel_err(got[name], truth_g[name]), rel_err(trl32_g[name], truth_g[name])
        assert ours <= theirs + 1e-5, (name, ours, theirs)


@pytest.mark.parametrize("family,head", [("hf", "fused"), ("hf", "logits"), ("xt", "fused"), ("xt", "logits")])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_trl_conventions_equal_trls_compute_loss(case, family, head):
    dpo, loss, got, start = dpo_step(family, case, head, "trl")
    check_against_trl(dpo, loss, got, start, case)


# ----------------------------------------------------------------------------- x-transformers' conventions


def scores64(model, data, conv):
    """(2B,) scores and counts in float64 from the model's own logits, full log_softmax."""
    pref, unpref, pm, pmask, umask = data
    seq = torch.cat((pref, unpref))
    keep = ~pm.repeat(2, 1) & torch.cat((pmask, umask))
    mask = keep[:, :-1] if conv["mask_alignment"] == "input" else keep[:, 1:]
    z = logits_fn(model)(seq, None)[:, :-1].double()
    lp = z.log_softmax(-1).gather(-1, seq[:, 1:, None]).squeeze(-1)
    s = (lp * mask).sum(-1)
    n = mask.sum(-1)
    return (s / n.clamp(min=1e-5) if conv["logprob_reduction"] == "mean" else s), n


def formula_loss(dpo, case, conv, data=None):
    """The float64 formulas of tests/test_losses.py on the models' own float64 scores."""
    data = data or batch()
    pol, n = scores64(dpo.policy_model, data, conv)
    with torch.no_grad():
        ref = scores64(dpo.ref_model.eval(), data, conv)[0] if dpo.ref_model is not None else torch.zeros_like(pol)
    lengths = dict(nw=n[:B], nl=n[B:]) if conv["logprob_reduction"] == "sum" else {}
    types = case["loss_type"] if isinstance(case["loss_type"], list) else [case["loss_type"]]
    weights = case.get("loss_weights", [1.0] * len(types))
    opts = dict(beta=case.get("beta", 0.1), eps=case.get("label_smoothing", 0.0),
                f=case.get("f_divergence_type", "reverse_kl"), alpha=case.get("f_alpha_divergence_coef", 0.5),
                tau=case.get("discopop_tau", 0.05))
    k = pol.shape[0] // 2
    return sum(w * truth(t, pol[:k], pol[k:], ref[:k], ref[k:], **opts, **lengths) for t, w in zip(types, weights)).mean()


@pytest.mark.parametrize("family,head", [("hf", "fused"), ("xt", "fused"), ("xt", "logits")])
@pytest.mark.parametrize("case", [c for c in CASES if c["loss_type"] != "sigmoid_norm"], ids=case_id)
def test_xtransformers_conventions_equal_the_documented_formulas(case, family, head):
    dpo, loss, got, start = dpo_step(family, case, head, "x-transformers")
    want_loss = formula_loss(dpo, case, CONVENTIONS["x-transformers"])
    want_loss.backward()
    assert_same(loss, got, want_loss, grads_of(dpo.policy_model))


@pytest.mark.parametrize("case", CASES[:9], ids=case_id)
def test_trl_conventions_equal_the_papers_formulas(case):
    """The same formulas under TRL's conventions (sft: the batch's chosen token mean)."""
    dpo, loss, got, start = dpo_step("hf", case, "fused", "trl")
    want_loss = formula_loss(dpo, case, CONVENTIONS["trl"])
    want_loss.backward()
    assert_same(loss, got, want_loss, grads_of(dpo.policy_model))


def test_bfloat16_model_within_bf16_of_trl():
    case = dict(loss_type=["aot", "discopop", "sft"])
    dpo, loss, got, start = dpo_step("hf", case, "fused", "trl", dtype=torch.bfloat16)
    want_loss = trl_loss(dpo, start, case)
    want_loss.backward()
    assert_same(loss, got, want_loss, grads_of(dpo.policy_model), loss_tol=2e-2, grad_tol=2e-2)


# ----------------------------------------------------------------------------- edges


def one_pair(i=0):
    return tuple(x[i:i + 1] for x in batch())


@pytest.mark.parametrize("kind", ["aot", "aot_unpaired"])
def test_aot_with_one_pair_is_sigmoid(kind):
    g = torch.Generator().manual_seed(4)
    s = [torch.randn(1, generator=g, dtype=torch.float64) for _ in range(4)]
    for eps in (0.0, 0.2):
        torch.testing.assert_close(preference_loss(*s, loss_type=kind, label_smoothing=eps),
                                   preference_loss(*s, loss_type="sigmoid", label_smoothing=eps), rtol=1e-15, atol=0)
    # and in DPO, on TRL's conventions, against TRL on a one-pair batch
    data = one_pair(1)
    case = dict(loss_type=kind)
    dpo, loss, got, start = dpo_step("hf", case, "fused", "trl", data=data)
    check_against_trl(dpo, loss, got, start, case, data)
    _, sig_loss, _, _ = dpo_step("hf", dict(loss_type="sigmoid"), "fused", "trl", data=data)
    torch.testing.assert_close(loss, sig_loss, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["aot", "aot_unpaired"])
def test_aot_on_the_pair_op_takes_the_batch_as_one_group(kind):
    """aot's gradient needs every pair's scores: the pair op takes the whole batch as one group
    whatever its keep budget (1 byte here: every row recomputed), the same loss and gradients as
    with the batch's logits all kept, and the batch formula's loss (sorting within groups of
    one pair would make it sigmoid)."""
    model = make("hf")
    assert DPO(model, loss_type=kind, head="fused").route(model, "cpu").kind == "dpo_head"
    n2, t, d = 8, 6, 8
    g, hidden, weight, targets, mask = head_inputs(6, n2, t, d, V, keep=0.7)
    count = mask.sum(-1).float().clamp(min=1e-5)
    lp = (hidden.double() @ weight.double().T).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    s = (lp * mask).sum(-1)
    # reference margins in the reverse order of the policy's: sorting pairs them differently
    ref = (-0.5 * s + 0.1 * torch.randn(n2, generator=g, dtype=torch.float64)).float().detach()
    cfg = check_loss_config(kind, 0.5, 0.1)

    def run(group_bytes, chunk_bytes=0):
        opts = HeadOptions(impl="torch", scale=None, ref_scale=None, reduction="sum", loss=cfg,
                           group_bytes=group_bytes, chunk_bytes=chunk_bytes)
        loss, *_ = dpo_head(hidden, weight, targets, mask, count, opts, ref_scores=ref)
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    kept = run(1 << 30)
    assert mask.sum() > 20
    # every row recomputed; 16 rows kept (20 rows' budget less a 4-row chunk), the rest recomputed
    for other in (run(1), run(20 * V * 4, 4 * V * 4)):
        for a, b in zip(other, kept):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    r = ref.double()
    want = truth(kind, s[:4], s[4:], r[:4], r[4:], beta=0.5, eps=0.1).mean()
    torch.testing.assert_close(kept[0].double(), want, rtol=2e-6, atol=0)
    assert abs(want - truth("sigmoid", s[:4], s[4:], r[:4], r[4:], beta=0.5, eps=0.1).mean()) > 1e-4


def test_bco_batch_shift_given_without_bco_pair_runs_on_the_pair_op():
    """bco_delta='batch' is read by bco_pair only: with sigmoid the pair op runs (it raised)."""
    data = batch()
    a = DPO(make("hf"), head="fused", bco_delta="batch")
    b = DPO(make("hf"), head="fused")
    assert a.route(a.policy_model, "cpu").kind == "dpo_head"
    pref, unpref, pm, pmask, umask = data
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    perturb(a.policy_model)
    perturb(b.policy_model)
    torch.testing.assert_close(a(pref, unpref, **kw), b(pref, unpref, **kw), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sft_on_groups_of_pairs_is_the_batch_mean(reduction):
    """The pair op takes the loss group by group (one pair per group here): with sums, sft's
    per-pair share is scaled by the whole batch's chosen token count, so the groups add up to
    the batch-level token mean; loss and gradients as one group (the whole batch)."""
    n2, t, d = 6, 7, 8
    g, hidden, weight, targets, mask = head_inputs(2, n2, t, d, V, keep=0.6)
    mask[1] = False  # an empty chosen completion: counts nothing
    count = mask.sum(-1).float().clamp(min=1e-5)
    cfg = check_loss_config(["sigmoid", "sft"], 0.3, loss_weights=[1.0, 2.0])
    ref = torch.randn(n2, generator=g)

    def run(group_bytes):
        opts = HeadOptions(impl="torch", scale=None, ref_scale=None, reduction=reduction, loss=cfg,
                           group_bytes=group_bytes)
        loss, *_ = dpo_head(hidden, weight, targets, mask, count, opts, ref_scores=ref)
        return (loss, *torch.autograd.grad(loss, (hidden, weight)))

    per_pair, whole = run(1), run(1 << 30)
    for a, b in zip(per_pair, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and the batch formula itself, on the exact sums
    lp = (hidden.double() @ weight.double().T).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    sums = (lp * mask).sum(-1)
    scores = sums / count if reduction == "mean" else sums
    nll = -sums[:3].sum() / mask[:3].sum() if reduction == "sum" else -scores[:3].mean()
    sig = -torch.nn.functional.logsigmoid(0.3 * ((scores[:3] - scores[3:]) - (ref[:3] - ref[3:]).double())).mean()
    torch.testing.assert_close(whole[0].double(), sig + 2 * nll, rtol=2e-6, atol=0)


def test_sft_without_chosen_tokens_is_zero():
    """TRL's token mean over no tokens is NaN; here the total is clamped at 1: 0, and no NaN
    gradient."""
    pref, unpref, pm, pmask, umask = batch()
    pm = torch.ones_like(pm)  # every token a prompt token: nothing scored
    data = (pref, unpref, pm, pmask, umask)
    for head in ("fused", "logits"):
        dpo, loss, got, start = dpo_step("hf", dict(loss_type=["sigmoid", "sft"]), head, "trl", data=data)
        assert loss.item() == pytest.approx(0.6931471805599453, abs=1e-7)  # sigmoid at z = 0
        assert all(torch.isfinite(g).all() for g in got.values())
    assert torch.isnan(trl_loss(dpo, start, dict(loss_type="sft"), data=data))
    # the same on scores: empty chosen completions sum to 0 over a token total of 0
    n = torch.zeros(B, dtype=torch.int64)
    empty = torch.zeros(B, requires_grad=True)
    loss = preference_loss(empty, torch.randn(B), loss_type="sft", chosen_lengths=n, rejected_lengths=n)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(B)) and torch.isfinite(empty.grad).all()


def test_sft_alone_needs_no_reference():
    model = make("xt")
    dpo = DPO(model, loss_type="sft")
    assert dpo.ref_model is None and not dpo.has_reference()
    s = torch.randn(B)
    torch.testing.assert_close(preference_loss(s, s + 1, loss_type="sft"), -s)
    # mean scores: -mean over pairs of each chosen completion's per-token mean log-prob
    pref, unpref, pm, pmask, umask = batch()
    loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    pol, _ = scores64(model, batch(), CONVENTIONS["x-transformers"])
    torch.testing.assert_close(loss.double(), -pol[:B].mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype,clamp", [(torch.float32, 80.0), (torch.float64, 80.0), (torch.bfloat16, 80.0),
                                         (torch.float16, 11.0)])
def test_alpha_divergence_clamps_as_trl(dtype, clamp):
    """(alpha - 1) r is clamped before exp: 11 for float16, 80 else (float64, absent from TRL's
    table, as float32); beyond it the score is flat, so its gradient is 0."""
    alpha = -1.0  # (alpha - 1) r = -2 r; the score f'(u) = expm1(-2 r) / -2 stays finite in float16
    r = torch.tensor([-(clamp + 5) / 2, -1.0, 0.5], dtype=torch.float64)  # -2 r: clamp + 5, 2, -1
    pw = r.to(dtype).requires_grad_()
    zero = torch.zeros(3, dtype=dtype)
    loss = preference_loss(pw, zero, zero, zero, loss_type="hinge", beta=1e-3,
                           f_divergence_type="alpha_divergence", f_alpha_divergence_coef=alpha)
    loss.sum().backward()
    expected_score = torch.expm1(torch.clamp(-2 * r, max=clamp)) / -2
    torch.testing.assert_close(loss.double(), (1 - 1e-3 * expected_score).clamp(min=0),
                               rtol={torch.float16: 1e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6), atol=0)
    assert pw.grad[0] == 0 and pw.grad[1] != 0 and torch.isfinite(loss).all()


def test_f_divergence_refused_where_trl_refuses_it():
    model = make("xt")
    for t in ("aot", "aot_unpaired", "bco_pair", "nca_pair", "sppo_hard", "apo_zero", "apo_down", "simpo"):
        with pytest.raises(ValueError, match=rf"f_divergence_type='js_divergence' is only defined for .*'{t}'"):
            DPO(model, loss_type=["sigmoid", t], f_divergence_type="js_divergence")
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        DPO(model, f_divergence_type="reverse-kl")
    with pytest.raises(ValueError, match="discopop_tau"):
        DPO(model, loss_type="discopop", discopop_tau=-0.05)


def test_defaults_are_trls():
    from tests.trl_harness import dpo_config_defaults

    trl = dpo_config_defaults()
    cfg = check_loss_config()
    assert cfg.discopop_tau == trl["discopop_tau"]
    assert cfg.f_divergence_type == trl["f_divergence_type"]
    assert cfg.f_alpha_divergence_coef == trl["f_alpha_divergence_coef"]


# ----------------------------------------------------------------------------- the op and torch.compile


def test_dpo_head_op_carries_the_new_options():
    """opcheck of the pair op with the new LossConfig fields (they travel in its schema), and
    the loss it returns is pair_losses' on its sums."""
    g, hidden, weight, targets, mask = head_inputs(5, 4, 5, 8, 13, keep=0.7)
    count = mask.sum(-1).clamp(min=1e-5).float()
    ref = torch.randn(4, generator=g)
    cfg = check_loss_config(["discopop", "sft"], 0.3, discopop_tau=0.2, f_divergence_type="alpha_divergence",
                            f_alpha_divergence_coef=0.25)
    from fastdpo.scoring.dpo_head_op import from_op_args, to_op_args

    opts = HeadOptions(impl="torch", scale=None, ref_scale=None, reduction="sum", loss=cfg)
    assert from_op_args(to_op_args(opts)) == opts
    op = torch.ops.fastdpo.dpo_head.default
    torch.library.opcheck(op, (hidden, weight, targets, mask, count, None, None, None, ref, None, None, *to_op_args(opts),
                               True, True, False))
    loss, sums, _, _ = dpo_head(hidden, weight, targets, mask, count, opts, ref_scores=ref)
    torch.testing.assert_close(loss, pair_losses(sums, ref, count, cfg, "sum").mean(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", [dict(loss_type=["sigmoid", "sft"], logprob_reduction="sum", mask_alignment="target"),
                                  dict(loss_type="aot"),
                                  dict(loss_type="discopop", f_divergence_type="js_divergence")], ids=case_id)
def test_dpo_step_compiles_fullgraph(case):
    model = make("xt")
    dpo = DPO(model, **case)
    perturb(model)
    pref, unpref, pm, pmask, umask = batch()
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    eager = dpo(pref, unpref, **kw)
    eager.backward()
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    step = torch.compile(lambda a, b: dpo(a, b, **kw), fullgraph=True, backend="aot_eager")
    loss = step(pref, unpref)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    for n, grad in grads_of(model).items():
        torch.testing.assert_close(grad, want[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("matmul", ["torch", "triton"])
def test_triton_routes_agree_with_torch(matmul):
    """impl='triton' (interpreted on CPU tensors): the pair op's Triton fold (matmul='torch') and
    the Triton GEMM kernels (matmul='triton', the scores route) give the torch route's numbers."""
    case = dict(loss_type=["aot", "discopop", "sft"], loss_weights=[1.0, 0.5, 0.3])
    _, want, want_g, _ = dpo_step("hf", case, "fused", "trl")
    dpo, loss, got, _ = dpo_step("hf", dict(case, impl="triton", matmul=matmul), "fused", "trl")
    assert dpo.route(dpo.policy_model, "cpu").kind == ("dpo_head" if matmul == "torch" else "fused")
    assert_same(loss, got, want, want_g)
