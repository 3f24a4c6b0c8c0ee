"""KTO: fastdpo.KTO and fastdpo.KTODataset against float64 references written from the
papers, and against TRL 1.16's own trainer code.

TRL's ``KTOTrainer._compute_loss`` (with its ``_compute_kl_logps``) runs unbound on a stub
``self`` (a SimpleNamespace with the attributes it reads) and stub models standing in for
models patched by TRL's ``add_fused_lm_head``: called with ``labels`` and
``fused_lm_head=True`` they return per-token ``log_probs`` (aligned as TRL's head aligns
them: position j scores label j + 1, 0 where that label is -100), ``entropy`` and
``mean_logits``, computed in float64 from the real tiny model's own logits.  So TRL's code
does everything after the head (the KL estimate, the reference, the losses, the weights, the
``nanmean``, the metrics), in float64, from the same float32 model bodies as ours; its
gradients flow back into the model's parameters.  The stub is checked against TRL's real
fused head (test_stub_is_trls_fused_head).  The batches come from TRL's own collator,
``DataCollatorForUnpairedPreference``, fed the KL completions as TRL's ``_prepare_dataset``
rotates them.

Goals: loss within 1e-6 (relative), every policy gradient within 1e-5 (norm-relative), the
metrics TRL logs within 1e-5, on x-transformers and Hugging Face models, fused ("scores") and
logits routes, in x-transformers' conventions (the paper's formulas on mean scores) and TRL's.
"""

from __future__ import annotations

import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fastdpo.scoring.router
from fastdpo import KTO, KTO_LOSS_TYPES, KTODataset
from fastdpo.losses.kto import check_kto_config, kl_baseline, kto_losses

from helpers import rel_err, three_way, tiny_transformer

V = 97  # odd: no block multiple
CPU = torch.device("cpu")
# (prompt length, completion length, desirable): N = 5, prompts of 1 to 4 tokens, padding.
ITEMS = [(2, 4, True), (4, 2, False), (1, 6, True), (3, 3, True), (2, 5, False)]
CONVENTIONS = {"x-transformers": ("mean", "input"), "trl": ("sum", "target")}


# ----------------------------------------------------------------------------- models and data


def perturb(model, seed: int = 1, std: float = 0.1) -> None:
    """Move the trainable parameters (the policy away from its reference; a fresh init also
    scores every token about -log V)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def xt_model(seed: int = 0, tie: bool = False, dtype: torch.dtype | None = None):
    model = tiny_transformer(V, max_seq_len=32, dim=16, depth=2, heads=2, seed=seed, tie=tie)
    perturb(model)
    return model if dtype is None else model.to(dtype)


def hf_model(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    perturb(model)
    return model


MODELS = {"x-transformers": xt_model, "x-transformers-tied": lambda: xt_model(tie=True), "hf": hf_model}


def own_logits(model, ids, attention_mask=None):
    if hasattr(model, "config"):  # Hugging Face (or peft around it)
        return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    return model(ids)


def examples(labels=None, seed: int = 3) -> list[dict]:
    """TRL's tokenized unpaired examples (``prompt_ids``, ``completion_ids``, ``label``), with
    the KL completions TRL's ``_prepare_dataset`` adds for a batch: its
    ``[completion_ids[-1]] + completion_ids[:-1]``."""
    g = torch.Generator().manual_seed(seed)
    labels = [d for _, _, d in ITEMS] if labels is None else labels
    out = [
        {"prompt_ids": torch.randint(3, V, (p,), generator=g).tolist(),
         "completion_ids": torch.randint(3, V, (c,), generator=g).tolist(), "label": d}
        for (p, c, _), d in zip(ITEMS, labels)
    ]
    completions = [e["completion_ids"] for e in out]
    for e, kl in zip(out, [completions[-1]] + completions[:-1]):
        e["KL_completion_ids"] = kl
    return out


def trl_collate(exs: list[dict], kl: bool = True) -> dict:
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    if not kl:
        exs = [{k: v for k, v in e.items() if k != "KL_completion_ids"} for e in exs]
    return DataCollatorForUnpairedPreference(pad_token_id=0)(exs)


def ours_collate(exs: list[dict], kl: bool = True) -> dict:
    ds = KTODataset([{"prompt": e["prompt_ids"], "completion": e["completion_ids"], "label": e["label"]} for e in exs],
                    pad_id=0, kl=kl)
    return ds.collate([ds[i] for i in range(len(ds))])


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def ours_step(kto: KTO, batch: dict, **kwargs):
    kto.policy_model.zero_grad(set_to_none=True)
    loss, metrics = kto(**batch, return_metrics=True, **kwargs)
    loss.backward()
    return loss.detach(), grads(kto.policy_model), metrics


def reference_step(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss, metrics = loss_fn()
    loss.backward()
    return loss.detach(), grads(model), metrics


TRL_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def assert_same(ours, want, *, what=""):
    """Loss within 1e-6 relative, gradients 1e-5 norm-relative, and every metric of
    ``TRL_METRICS``: equal within 1e-5 where ``want`` has it, NaN in ours where it does not
    (TRL logs nothing for a kind of completion the batch lacks)."""
    (lo, go, mo), (lw, gw, mw) = ours, want
    assert abs(lo.item() - float(lw)) <= 1e-6 * abs(float(lw)), f"{what}: loss {lo.item()} != {float(lw)}"
    assert go.keys() == gw.keys(), what
    for name in gw:
        assert rel_err(go[name], gw[name]) <= 1e-5, f"{what}: gradient of {name}: {rel_err(go[name], gw[name]):.3g}"
    for k in TRL_METRICS:
        got = float(mo[k])
        if k not in mw:
            assert got != got, f"{what}: metric {k} is {got}, want NaN (TRL logs none)"
            continue
        exp = float(mw[k])
        assert abs(got - exp) <= 1e-5 * max(1.0, abs(exp)), f"{what}: metric {k} {got} != {exp}"


# ----------------------------------------------------------------------------- float64 references from the papers


def token_logps(model, seq):
    """(N, L-1) float64 log-probs of ``seq[:, 1:]`` from the model's own logits."""
    logits = own_logits(model, seq[:, :-1]).double()
    return logits.log_softmax(-1).gather(-1, seq[:, 1:, None]).squeeze(-1)


def paper_scores(model, seq, prompt_mask, seq_mask, reduction, alignment):
    keep = ~prompt_mask & seq_mask
    m = keep[:, :-1] if alignment == "input" else keep[:, 1:]
    sums = (token_logps(model, seq) * m).sum(-1)
    return sums / m.sum(-1).clamp(min=1e-5) if reduction == "mean" else sums


def kto_paper(policy, reference, batch, *, beta, loss_type, desirable_weight, undesirable_weight, reduction,
              alignment, kl=None, ref_kl_shift=0.0):
    """KTO (arXiv 2402.01306, eq. 7): r = log pi(y|x) - log pi_ref(y|x); z0 =
    KL(pi || pi_ref), estimated as the mean of r over mismatched pairs (x, y') (sec. 3.2; TRL
    clamps it at 0 and does not backpropagate through it); v = lambda_D sigmoid(beta (r - z0))
    for desirable y, lambda_U sigmoid(beta (z0 - r)) for undesirable y; L = E[lambda_y - v].
    APO-zero unpaired (arXiv 2408.06266, eq. 7 unpaired): 1 - sigmoid(beta r) for desirable,
    sigmoid(beta r) for undesirable completions, weighted alike.  ``kl``: a given z0 instead;
    ``ref_kl_shift``: added to the reference's KL scores (to make the estimate negative)."""
    conv = (reduction, alignment)
    label = batch["label"]
    pi = paper_scores(policy, batch["seq"], batch["prompt_mask"], batch["seq_mask"], *conv)
    with torch.no_grad():
        ref = paper_scores(reference, batch["seq"], batch["prompt_mask"], batch["seq_mask"], *conv)
    r = pi - ref
    lam = torch.where(label, desirable_weight, undesirable_weight).double()
    z0 = torch.zeros((), dtype=torch.float64)
    if loss_type == "kto":
        if kl is not None:
            z0 = torch.tensor(max(kl, 0.0), dtype=torch.float64)
        else:
            with torch.no_grad():
                kl_args = (batch["kl_seq"], batch["kl_prompt_mask"], batch["kl_seq_mask"], *conv)
                z0 = (paper_scores(policy, *kl_args) - paper_scores(reference, *kl_args) - ref_kl_shift).mean()
                z0 = z0.clamp(min=0)
        v = torch.where(label, desirable_weight * torch.sigmoid(beta * (r - z0)),
                        undesirable_weight * torch.sigmoid(beta * (z0 - r)))
        losses = lam - v
    else:
        losses = lam * torch.where(label, 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r))
    rewards = beta * r.detach()
    metrics = {"kl": z0}
    for kind, m in (("chosen", label), ("rejected", ~label)):
        if m.any():
            metrics[f"rewards/{kind}"] = rewards[m].mean()
            metrics[f"logps/{kind}"] = pi.detach()[m].mean()
    if label.any() and (~label).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


# ----------------------------------------------------------------------------- TRL 1.16's own code


class FusedHeadStub(torch.nn.Module):
    """Stands in for a model patched by TRL's ``add_fused_lm_head``, called with
    ``fused_lm_head=True``: TRL's per-token fields, computed in ``compute`` (float64) from the
    logits ``logits_fn(input_ids, attention_mask)``."""

    is_gradient_checkpointing = False

    def __init__(self, logits_fn, compute: torch.dtype = torch.float64):
        super().__init__()
        self.logits_fn, self.compute = logits_fn, compute

    def forward(self, *, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None, **kwargs):
        assert fused_lm_head and labels is not None and not kwargs, kwargs
        z = self.logits_fn(input_ids, attention_mask)[:, :-1].to(self.compute)  # position j predicts label j + 1
        y = labels[:, 1:]
        mask = y != -100
        logp = z.log_softmax(-1)
        lp = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1).detach()
        return SimpleNamespace(log_probs=lp.masked_fill(~mask, 0), entropy=entropy.masked_fill(~mask, 0),
                               mean_logits=z.detach().mean(-1).masked_fill(~mask, 0))


def trl_kto(policy_logits, ref_logits, inputs: dict, *, beta, loss_type, desirable_weight=1.0, undesirable_weight=1.0,
            training: bool = True, compute: torch.dtype = torch.float64):
    """TRL 1.16's KTO loss and logged metrics of a collated batch, by ``KTOTrainer._compute_loss``
    on a stub trainer (the attributes ``KTOTrainer.__init__`` sets from a ``KTOConfig``).
    ``ref_logits`` None: the batch carries ``ref_logps`` (and ``ref_KL_logps``), TRL's
    ``precompute_ref_log_probs``."""
    from trl.trainer.kto_trainer import KTOTrainer

    policy = FusedHeadStub(policy_logits, compute).train(training)
    reference = FusedHeadStub(ref_logits, compute).eval() if ref_logits is not None else None
    trainer = SimpleNamespace(
        beta=beta, loss_type=loss_type, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
        calculate_KL=loss_type not in ["apo_zero_unpaired"],  # KTOTrainer.__init__'s rule
        precompute_ref_logps=ref_logits is None, model=policy, ref_model=reference,
        accelerator=SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, aux_loss_enabled=False,
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    loss = KTOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    logged = trainer._metrics["train" if training else "eval"]
    return loss, {k: v[-1] for k, v in logged.items()}


def logits_of(model):
    return lambda ids, attention_mask: own_logits(model, ids, attention_mask)


# ----------------------------------------------------------------------------- routes


@pytest.fixture
def linear_calls(monkeypatch):
    """Counts the fused "scores" op's calls (each scores a body's hidden states)."""
    calls = []
    real = fastdpo.scoring.router.run_linear
    monkeypatch.setattr(fastdpo.scoring.router, "run_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


OPTIONS = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)


def setup(family: str, *, peft: bool = False, **options):
    """A KTO around a fresh model whose policy then moves away from the reference, and the
    reference as a model (the frozen copy, or the peft model with its adapters off)."""
    model = MODELS[family]()
    if peft:
        peft_lib = pytest.importorskip("peft")
        model = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                   target_modules=["q_proj", "v_proj"]))
    kto = KTO(model, **options)
    perturb(model, seed=8, std=0.05)  # a seed whose KL estimates are positive (not clamped) here
    if peft:
        def reference(ids, attention_mask=None):
            with model.disable_adapter():
                return own_logits(model, ids, attention_mask)
        return kto, model, SimpleNamespace(logits=reference)
    return kto, model, SimpleNamespace(logits=logits_of(kto.ref_model), model=kto.ref_model)


@pytest.mark.parametrize("conv", list(CONVENTIONS))
@pytest.mark.parametrize("head", ["fused", "logits"])
@pytest.mark.parametrize("family", list(MODELS))
def test_kto_matches_the_paper_and_trl(family, head, conv, linear_calls):
    reduction, alignment = CONVENTIONS[conv]
    kto, model, ref = setup(family, head=head, logprob_reduction=reduction, mask_alignment=alignment, **OPTIONS)
    assert kto.has_reference() and kto.ref_model is not None
    exs = examples()
    batch = ours_collate(exs)
    ours = ours_step(kto, batch)
    # reference: completions, KL sequences; policy: KL sequences (no grad), completions
    assert len(linear_calls) == (4 if head == "fused" else 0)
    assert ours[2]["kl"] > 0  # the baseline is in play (not clamped): its value and its detach are checked
    paper = reference_step(model, lambda: kto_paper(model, ref.model, batch, loss_type="kto", reduction=reduction,
                                                    alignment=alignment, **OPTIONS))
    assert_same(ours, paper, what="paper")
    if conv == "trl":
        trl = reference_step(model, lambda: trl_kto(logits_of(model), ref.logits, trl_collate(exs), loss_type="kto",
                                                    **OPTIONS))
        assert_same(ours, trl, what="TRL")


@pytest.mark.parametrize("packing", ["pair", "batch"])
@pytest.mark.parametrize("family", ["x-transformers", "hf"])
def test_packed_kto_matches_the_paper(family, packing):
    """Packed sequences (each a prompt and its completion; its KL sequences packed too) score as
    the unpacked ones: the loss, every gradient and the metrics match the paper's step."""
    kto, model, ref = setup(family, packing=packing, logprob_reduction="sum", mask_alignment="target", **OPTIONS)
    batch = ours_collate(examples())
    ours = ours_step(kto, batch)
    assert kto._batches(*(batch[k] for k in ("seq", "prompt_mask", "seq_mask", "kl_seq", "kl_prompt_mask",
                                             "kl_seq_mask")))[0].packed is not None
    paper = reference_step(model, lambda: kto_paper(model, ref.model, batch, loss_type="kto", reduction="sum",
                                                    alignment="target", **OPTIONS))
    assert_same(ours, paper, what=f"paper, packing={packing!r}")


@pytest.mark.parametrize("conv", list(CONVENTIONS))
@pytest.mark.parametrize("family", ["x-transformers", "hf"])
def test_apo_zero_unpaired_matches_the_paper_and_trl(family, conv, linear_calls):
    reduction, alignment = CONVENTIONS[conv]
    kto, model, ref = setup(family, loss_type="apo_zero_unpaired", logprob_reduction=reduction,
                            mask_alignment=alignment, **OPTIONS)
    exs = examples()
    batch = ours_collate(exs, kl=False)
    assert "kl_seq" not in batch
    ours = ours_step(kto, batch)
    assert len(linear_calls) == 2  # no KL sequences: the reference's and the policy's completions
    assert ours[2]["kl"] == 0
    paper = reference_step(model, lambda: kto_paper(model, ref.model, batch, loss_type="apo_zero_unpaired",
                                                    reduction=reduction, alignment=alignment, **OPTIONS))
    assert_same(ours, paper, what="paper")
    if conv == "trl":
        trl = reference_step(model, lambda: trl_kto(logits_of(model), ref.logits, trl_collate(exs, kl=False),
                                                    loss_type="apo_zero_unpaired", **OPTIONS))
        assert_same(ours, trl, what="TRL")


@pytest.mark.small_path
@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_small_path_matches_trl(loss_type, linear_calls):
    kto, model, ref = setup("x-transformers", loss_type=loss_type, impl="torch", logprob_reduction="sum",
                            mask_alignment="target", **OPTIONS)
    kl = loss_type == "kto"
    exs = examples()
    ours = ours_step(kto, ours_collate(exs, kl=kl))
    assert linear_calls == []  # the small path builds the (few) logits and scores them
    trl = reference_step(model, lambda: trl_kto(logits_of(model), ref.logits, trl_collate(exs, kl=kl),
                                                loss_type=loss_type, **OPTIONS))
    assert_same(ours, trl, what="TRL")


@pytest.mark.parametrize("labels", [[True] * 5, [False] * 5], ids=["all-desirable", "all-undesirable"])
@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_one_kind_batches_match_trl(labels, loss_type):
    """A batch of desirable completions only (or undesirable only): TRL's empty other half,
    its metrics for that half not logged (NaN here)."""
    kto, model, ref = setup("x-transformers", loss_type=loss_type, logprob_reduction="sum", mask_alignment="target",
                            **OPTIONS)
    kl = loss_type == "kto"
    exs = examples(labels)
    batch = ours_collate(exs, kl=kl)
    ours = ours_step(kto, batch)
    trl = reference_step(model, lambda: trl_kto(logits_of(model), ref.logits, trl_collate(exs, kl=kl),
                                                loss_type=loss_type, **OPTIONS))
    assert_same(ours, trl, what="TRL")
    paper = reference_step(model, lambda: kto_paper(model, ref.model, batch, loss_type=loss_type, reduction="sum",
                                                    alignment="target", **OPTIONS))
    assert_same(ours, paper, what="paper")
    assert ours[2]["rewards/margins"] != ours[2]["rewards/margins"]  # NaN: only one kind


def test_a_negative_kl_estimate_is_clamped_to_zero():
    """Reference KL scores above the policy's make the estimate negative: z0 is 0 (the clamp),
    as in TRL (its precomputed-reference path, fed the same scores) and the paper's reference;
    and the loss equals the one with a given baseline ``kl=0.0``."""
    kto, model, ref = setup("x-transformers", logprob_reduction="sum", mask_alignment="target", **OPTIONS)
    exs = examples()
    batch = ours_collate(exs)
    ref_scores, ref_kl = kto.reference_scores(**{k: v for k, v in batch.items() if k != "label"})
    with torch.no_grad():
        policy_kl = paper_scores(model, batch["kl_seq"], batch["kl_prompt_mask"], batch["kl_seq_mask"], "sum", "target")
    shift = float((policy_kl - ref_kl).mean()) + 1.0  # the estimate becomes -1
    ours = ours_step(kto, batch, ref_logprob=ref_scores, ref_kl_logprob=ref_kl + shift)
    assert ours[2]["kl"] == 0
    paper = reference_step(model, lambda: kto_paper(model, ref.model, batch, loss_type="kto", reduction="sum",
                                                    alignment="target", ref_kl_shift=shift, **OPTIONS))
    assert_same(ours, paper, what="paper")
    inputs = trl_collate(exs) | {"ref_logps": ref_scores.double(), "ref_KL_logps": (ref_kl + shift).double()}
    trl = reference_step(model, lambda: trl_kto(logits_of(model), None, inputs, loss_type="kto", **OPTIONS))
    assert_same(ours, trl, what="TRL")
    given = {k: v for k, v in batch.items() if not k.startswith("kl_")}
    zero = ours_step(kto, given, kl=0.0)
    assert_same(zero, ours, what="kl=0.0")
    # the same batch with its own (positive) estimate: another loss, so the clamp was tested
    assert float(ours_step(kto, batch)[2]["kl"]) > 0


def test_a_given_kl_estimate_is_the_papers_z0():
    kto, model, ref = setup("hf", **OPTIONS)
    batch = {k: v for k, v in ours_collate(examples()).items() if not k.startswith("kl_")}
    for kl in (0.25, torch.tensor([0.25]), torch.tensor(0.25, dtype=torch.float64), -0.5):
        ours = ours_step(kto, batch, kl=kl)
        value = float(kl) if not isinstance(kl, torch.Tensor) else 0.25
        paper = reference_step(model, lambda: kto_paper(model, ref.model, batch, loss_type="kto", reduction="mean",
                                                        alignment="input", kl=value, **OPTIONS))
        assert_same(ours, paper, what=f"kl={kl}")


def test_precomputed_reference_scores_match_trl_and_free_the_reference():
    kto, model, ref = setup("hf", logprob_reduction="sum", mask_alignment="target", **OPTIONS)
    exs = examples()
    batch = ours_collate(exs)
    want = ours_step(kto, batch)
    ref_scores, ref_kl = kto.reference_scores(**{k: v for k, v in batch.items() if k != "label"})
    assert ref_scores.shape == ref_kl.shape == (5,) and not ref_scores.requires_grad
    del kto.ref_model  # a run with precomputed scores needs no reference model
    got = ours_step(kto, batch, ref_logprob=ref_scores, ref_kl_logprob=ref_kl)
    assert_same(got, want, what="precomputed")
    inputs = trl_collate(exs) | {"ref_logps": ref_scores.double(), "ref_KL_logps": ref_kl.double()}
    trl = reference_step(model, lambda: trl_kto(logits_of(model), None, inputs, loss_type="kto", **OPTIONS))
    assert_same(got, trl, what="TRL precomputed")


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_peft_reference_is_the_base_model_and_matches_trl(loss_type):
    kto, model, ref = setup("hf", peft=True, loss_type=loss_type, logprob_reduction="sum", mask_alignment="target",
                            **OPTIONS)
    assert kto.ref_model is None and kto.has_reference()
    assert {id(p) for p in kto.parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    kl = loss_type == "kto"
    exs = examples()
    ours = ours_step(kto, ours_collate(exs, kl=kl))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(ours[1])
    assert (ours[2]["kl"] > 0) == kl
    trl = reference_step(model, lambda: trl_kto(logits_of(model), ref.logits, trl_collate(exs, kl=kl),
                                                loss_type=loss_type, **OPTIONS))
    assert_same(ours, trl, what="TRL")


def test_evaluation_mode_scores_forward_only_and_logs_as_trl_eval():
    kto, model, ref = setup("x-transformers", logprob_reduction="sum", mask_alignment="target", **OPTIONS)
    exs = examples()
    batch = ours_collate(exs)
    want, metrics = kto(**batch, return_metrics=True)
    model.eval()
    with torch.no_grad():
        got, got_metrics = kto(**batch, return_metrics=True)
        trl_loss, trl_metrics = trl_kto(logits_of(model), ref.logits, trl_collate(exs), loss_type="kto",
                                        training=False, **OPTIONS)
    assert not got.requires_grad and torch.allclose(got, want.detach(), rtol=1e-6, atol=0)
    assert abs(got.item() - trl_loss.item()) <= 1e-6 * abs(trl_loss.item())
    for k in TRL_METRICS:
        assert abs(float(got_metrics[k]) - trl_metrics[k]) <= 1e-5 * max(1.0, abs(trl_metrics[k])), k
    with torch.inference_mode():
        assert torch.allclose(kto(**batch), want.detach(), rtol=1e-6, atol=0)


def test_bfloat16_model_within_bf16_of_float64():
    """A bf16 model: ours against the float64 truth on its own (bf16) logits no further than
    TRL's code with its head computing in bf16, plus bf16 slack (the three-way rule)."""
    model = xt_model(dtype=torch.bfloat16)
    kto = KTO(model, logprob_reduction="sum", mask_alignment="target", **OPTIONS)
    perturb(model, seed=5, std=0.05)
    exs = examples()
    with torch.no_grad():
        ours, metrics = kto(**ours_collate(exs), return_metrics=True)
        truth, truth_metrics = trl_kto(logits_of(model), logits_of(kto.ref_model), trl_collate(exs), loss_type="kto",
                                       **OPTIONS)
        bf16, _ = trl_kto(logits_of(model), logits_of(kto.ref_model), trl_collate(exs), loss_type="kto",
                          compute=torch.bfloat16, **OPTIONS)
    three_way(ours, bf16, truth, torch.bfloat16, "loss")
    for k in ("rewards/chosen", "rewards/rejected"):
        assert abs(float(metrics[k]) - truth_metrics[k]) <= 2e-2 * max(1.0, abs(truth_metrics[k])), k


def test_stub_is_trls_fused_head():
    """The stub's per-token fields are TRL's own fused head's (``add_fused_lm_head``) on a
    Hugging Face model, in float32, and TRL's _compute_loss gives the same loss on both."""
    from trl.trainer.utils import add_fused_lm_head

    model = hf_model()
    patched = hf_model()
    add_fused_lm_head(patched, outputs=("log_probs", "entropy", "mean_logits"))
    inputs = trl_collate(examples())
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                  fused_lm_head=True)
    with torch.no_grad():
        want = patched(**kwargs)
        got = FusedHeadStub(logits_of(model), torch.float32)(**kwargs)
    for field in ("log_probs", "entropy", "mean_logits"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5), field
    with torch.no_grad():
        ref = hf_model()
        add_fused_lm_head(ref, outputs=("log_probs", "entropy", "mean_logits"))
        perturb(patched, seed=5, std=0.05)
        perturb(model, seed=5, std=0.05)
        # TRL end to end with its own head, against the stubs (float32 both)
        from trl.trainer.kto_trainer import KTOTrainer

        def trainer_for(policy, reference):
            t = SimpleNamespace(
                beta=0.3, loss_type="kto", desirable_weight=1.3, undesirable_weight=0.7, calculate_KL=True,
                precompute_ref_logps=False, model=policy, ref_model=reference,
                accelerator=SimpleNamespace(device=CPU, gather_for_metrics=lambda x: x, unwrap_model=lambda m: m),
                _metrics={"train": defaultdict(list)}, aux_loss_enabled=False, _total_train_tokens=0, _tp_size=1,
                args=SimpleNamespace(gradient_checkpointing_kwargs=None),
            )
            t._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, t)
            return t

        real = KTOTrainer._compute_loss(trainer_for(patched, ref.eval()), patched, inputs, False)
        base = hf_model()
        stub = FusedHeadStub(logits_of(model), torch.float32)
        stubbed = KTOTrainer._compute_loss(trainer_for(stub, FusedHeadStub(logits_of(base), torch.float32).eval()),
                                           stub, inputs, False)
    assert abs(real.item() - stubbed.item()) <= 1e-5 * abs(real.item())


# ----------------------------------------------------------------------------- the formulas


def test_loss_formula_float64():
    """kto_losses on float64 inputs is the paper's per-example loss to float64 rounding, with
    the weights, for both types; ``nanmean`` skips a NaN example as TRL's does."""
    g = torch.Generator().manual_seed(0)
    s, r = torch.randn(7, generator=g, dtype=torch.float64) * 5, torch.randn(7, generator=g, dtype=torch.float64) * 5
    label = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    z0 = torch.tensor(0.7, dtype=torch.float64)
    cfg = check_kto_config("kto", 0.4, 2.0, 0.5)
    x = 0.4 * (s - r - z0)
    want = torch.where(label, 2.0 * (1 - torch.sigmoid(x)), 0.5 * (1 - torch.sigmoid(-x)))
    assert torch.allclose(kto_losses(s, r, label, z0, cfg), want, rtol=1e-14, atol=0)
    cfg = check_kto_config("apo_zero_unpaired", 0.4, 2.0, 0.5)
    x = 0.4 * (s - r)
    want = torch.where(label, 2.0 * (1 - torch.sigmoid(x)), 0.5 * torch.sigmoid(x))
    assert torch.allclose(kto_losses(s, r, label, z0, cfg), want, rtol=1e-14, atol=0)
    s[0] = float("nan")
    losses = kto_losses(s, r, label, z0, cfg)
    assert torch.allclose(losses.nanmean(), want[1:].mean(), rtol=1e-14)


def test_kl_baseline_is_the_clamped_detached_mean():
    pi = torch.tensor([-3.0, -1.0, -2.0], requires_grad=True)
    assert kl_baseline(pi, torch.tensor([-1.0, -1.0, -1.0])).item() == 0.0  # the mean, -1, clamped
    z = kl_baseline(pi, torch.tensor([-4.0, -2.0, -3.0]))
    assert z.item() == pytest.approx(1.0) and not z.requires_grad


# ----------------------------------------------------------------------------- the dataset


def test_collate_is_trls_collator_with_its_kl_rotation():
    exs = examples()
    ours, trl = ours_collate(exs), trl_collate(exs)
    for prefix, ours_prefix in (("", ""), ("KL_", "kl_")):
        ids, attention, completion = (trl[prefix + k] for k in ("input_ids", "attention_mask", "completion_mask"))
        assert torch.equal(ours[ours_prefix + "seq"], ids)
        assert torch.equal(ours[ours_prefix + "seq_mask"], attention.bool())
        assert torch.equal(ours[ours_prefix + "prompt_mask"], attention.bool() & ~completion.bool())
    assert torch.equal(ours["label"], trl["label"]) and ours["label"].dtype == torch.bool
    # KL row i: prompt i, then completion i - 1 (the last one for row 0)
    n = len(exs)
    for i, e in enumerate(exs):
        row = ours["kl_seq"][i][ours["kl_seq_mask"][i]].tolist()
        assert row == e["prompt_ids"] + exs[(i - 1) % n]["completion_ids"]


def test_collate_max_length_and_one_item_batch():
    exs = examples()
    data = [{"prompt": e["prompt_ids"], "completion": e["completion_ids"], "label": e["label"]} for e in exs]
    ds = KTODataset(data, pad_id=0, max_length=5)
    ours = ds.collate([ds[i] for i in range(len(ds))])
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    trl = DataCollatorForUnpairedPreference(pad_token_id=0, max_length=5)(exs)
    assert torch.equal(ours["seq"], trl["input_ids"]) and torch.equal(ours["kl_seq"], trl["KL_input_ids"])
    assert torch.equal(ours["prompt_mask"], trl["attention_mask"].bool() & ~trl["completion_mask"].bool())
    one = ds.collate([ds[2]])
    assert torch.equal(one["kl_seq"], one["seq"])  # its own KL pair
    empty_prompt = KTODataset([{"prompt": [], "completion": [5, 6], "label": False}])[0]
    assert empty_prompt[0].shape == (0,) and empty_prompt[0].dtype == torch.long


@pytest.mark.parametrize("item, error, match", [
    ({"prompt": [1], "completion": [], "label": True}, ValueError, r"data\[0\]\['completion'\] must hold at least one"),
    ({"prompt": [1], "completion": [2]}, ValueError, r"data\[0\] has no 'label' entry"),
    ({"prompt": [1], "completion": [2], "label": 1}, TypeError, r"data\[0\]\['label'\] must be a bool"),
    ({"completion": [2], "label": True}, ValueError, r"data\[0\] has no 'prompt' entry"),
    ({"prompt": [1.5], "completion": [2], "label": True}, TypeError, "integer token ids"),
])
def test_dataset_errors_are_named(item, error, match):
    with pytest.raises(error, match=match):
        KTODataset([item])[0]


def test_dataset_option_errors_and_padding_without_pad_id():
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        KTODataset([], max_length=1)
    with pytest.raises(TypeError, match="kl must be a bool"):
        KTODataset([], kl="yes")
    ds = KTODataset([{"prompt": [1], "completion": [2], "label": True}, {"prompt": [1], "completion": [2, 3],
                                                                         "label": False}])
    with pytest.raises(ValueError, match="pass KTODataset\\(..., pad_id=...\\)"):
        ds.collate([ds[0], ds[1]])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(loss_type="sigmoid"), ValueError, r"loss_type must be one of \('kto', 'apo_zero_unpaired'\)"),
    (dict(loss_type=["kto"]), TypeError, "loss_type must be a str"),
    (dict(desirable_weight=-0.1), ValueError, "desirable_weight must be >= 0"),
    (dict(undesirable_weight=-1), ValueError, "undesirable_weight must be >= 0"),
    (dict(undesirable_weight=float("inf")), ValueError, "undesirable_weight must be finite"),
    (dict(desirable_weight="1"), TypeError, "desirable_weight must be a real Python number"),
    (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
    (dict(sync_kl=1), TypeError, "sync_kl must be a bool"),
    (dict(share_prompt=True), ValueError, "share_prompt=True shares a pair's prompt; KTO's sequences are unpaired"),
    (dict(head="fast"), ValueError, r"head must be one of \('auto', 'fused', 'logits'\)"),
    (dict(label_smoothing=0.1), TypeError, "label_smoothing"),
])
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        KTO(xt_model(), **kwargs)


def _call_errors() -> list[tuple]:
    b = ours_collate(examples())
    nokl = {k: v for k, v in b.items() if not k.startswith("kl_")}
    nolabel = {k: v for k, v in b.items() if k != "label"}
    return [
        ("kto", nolabel, {}, ValueError, "label is required"),
        ("kto", b, dict(label=b["label"].long()), TypeError, "label must be a torch.bool tensor"),
        ("kto", b, dict(label=b["label"][:4]), ValueError, r"label must have shape \(5,\)"),
        ("kto", b, dict(label=b["label"][None]), ValueError, "label must be 1-D"),
        ("kto", b, dict(label=[True] * 5), TypeError, "label must be a torch.Tensor"),
        ("kto", nokl, {}, ValueError, "needs its KL baseline from exactly one of kl_seq"),
        ("kto", b, dict(kl=0.1), ValueError, "both were given"),
        ("kto", nokl, dict(kl=float("nan")), ValueError, "kl must be finite"),
        ("kto", nokl, dict(kl=torch.zeros(2)), ValueError, "kl must be a number or a one-element float tensor"),
        ("apo_zero_unpaired", b, {}, ValueError, "has no KL baseline"),
        ("apo_zero_unpaired", nokl, dict(kl=0.0), ValueError, "has no KL baseline"),
        ("kto", b, dict(kl_prompt_mask=None), ValueError, "kl_seq needs its kl_prompt_mask"),
        ("kto", b, dict(kl_seq=b["kl_seq"][:4], kl_prompt_mask=b["kl_prompt_mask"][:4], kl_seq_mask=b["kl_seq_mask"][:4]),
         ValueError, r"kl_seq must hold one sequence per sequence of seq \(5\)"),
        ("kto", b, dict(kl_seq_mask=b["kl_seq_mask"][:, :3]), ValueError, "kl_seq_mask must have shape"),
        ("kto", b, dict(ref_logprob=torch.zeros(5)), ValueError, "give ref_kl_logprob too"),
        ("kto", b, dict(ref_kl_logprob=torch.zeros(5)), ValueError, "ref_kl_logprob goes with ref_logprob"),
        ("kto", b, dict(ref_logprob=torch.zeros(4), ref_kl_logprob=torch.zeros(5)), ValueError,
         r"ref_logprob must have shape \(5,\)"),
        ("kto", b, dict(prompt_mask=b["prompt_mask"].long()), TypeError, "prompt_mask must be a torch.bool tensor"),
        ("kto", b, dict(seq=b["seq"].float()), TypeError, "seq must hold integer token ids"),
        ("kto", b, dict(seq=b["seq"] + V), ValueError, r"seq holds token id .* outside \[0, 97\)"),
    ]


CALL_ERRORS = _call_errors()


@pytest.mark.parametrize("loss_type, batch, override, error, match", CALL_ERRORS, ids=[c[-1] for c in CALL_ERRORS])
def test_bad_calls_are_named(loss_type, batch, override, error, match):
    kto = KTO(xt_model(), loss_type=loss_type)
    with pytest.raises(error, match=match):
        kto(**(batch | override))
