"""Hugging Face causal LMs and peft adapters in DPO (fastdpo.hf).

Tiny randomly initialized models built from configs (no hub access).  Each model's DPO loss
and gradients are checked against a float64 computation from the model's *own* logits (what
its forward returns, upcast), in x-transformers' conventions and in TRL's; the fused route is
checked to be really taken (the head module never runs, no (2B, L-1, V) tensor exists), and
every fallback names its reason.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastdpo import DPO  # noqa: E402
from fastdpo.models import hf  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

V = 97  # odd, not a multiple of any block
B, L = 3, 11
COMMON = dict(
    vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# One tiny config per class of fastdpo.models.hf.HEAD_RULES (a test checks the two lists agree), plus
# the variants the issue names.  Gemma 2 with its default cap (30) and a tight one (2: far from
# linear on these logits), Gemma 3 without (its default) and with one: the fold caps them.
CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "LlamaForCausalLM-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 8}),
    "GemmaForCausalLM": ("GemmaConfig", {"head_dim": 8}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"head_dim": 8}),
    "Gemma2ForCausalLM-cap2": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    "Gemma2ForCausalLM-nocap": ("Gemma2Config", {"head_dim": 8, "final_logit_softcapping": None}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"head_dim": 8}),
    "Gemma3ForCausalLM-cap": ("Gemma3TextConfig", {"head_dim": 8, "final_logit_softcapping": 3.0}),
    "Phi3ForCausalLM": ("Phi3Config", {}),
    "PhiForCausalLM": ("PhiConfig", {}),  # a biased lm_head
    "Olmo2ForCausalLM": ("Olmo2Config", {}),
    "CohereForCausalLM": ("CohereConfig", {"logit_scale": 0.5}),
    "GraniteForCausalLM": ("GraniteConfig", {"logits_scaling": 3.0}),
    "GPT2LMHeadModel": ("GPT2Config", {}),
}
GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
CONVENTIONS = {
    "x-transformers": dict(logprob_reduction="mean", mask_alignment="input"),
    "trl": dict(logprob_reduction="sum", mask_alignment="target"),
}


def tiny(key: str, seed: int = 0, **overrides) -> nn.Module:
    cls_name = key.split("-")[0]
    config_name, kw = CONFIGS[key]
    base = GPT2 if cls_name == "GPT2LMHeadModel" else COMMON
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**{**base, **kw, **overrides})
    return getattr(transformers, cls_name)(config)


def perturb(module: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Move the weights away from their init (and the policy away from its reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def batch(seed: int = 3, pad: bool = True):
    g = torch.Generator().manual_seed(seed)
    pref = torch.randint(3, V, (B, L), generator=g)
    unpref = torch.randint(3, V, (B, L), generator=g)
    pm = torch.arange(L)[None] < torch.tensor([[2], [4], [3]])
    unpref[pm] = pref[pm]
    pmask = torch.ones(B, L, dtype=torch.bool)
    umask = torch.ones(B, L, dtype=torch.bool)
    if pad:  # right padding, some rows
        pmask[1, -3:] = False
        umask[2, -2:] = False
        umask[0, -1:] = False
    return pref, unpref, pm, pmask, umask


def own_logits_loss(policy, reference, pref, unpref, pm, pmask, umask, *, beta, reduction, alignment):
    """The DPO loss in float64 from the models' own logits (their forward's ``.logits``)."""
    seq = torch.cat((pref, unpref))
    keep = ~pm.repeat(2, 1) & torch.cat((pmask, umask))
    mask = keep[:, :-1] if alignment == "input" else keep[:, 1:]
    src, tgt = seq[:, :-1], seq[:, 1:]

    def scores(model):
        logits = model(input_ids=src, use_cache=False).logits.double()
        lp = logits.log_softmax(-1).gather(-1, tgt[..., None]).squeeze(-1)
        s = (lp * mask).sum(-1)
        return s / mask.sum(-1).clamp(min=1e-5) if reduction == "mean" else s

    with torch.no_grad():
        ref = scores(reference)
    pol = scores(policy)
    z = beta * ((pol[:B] - pol[B:]) - (ref[:B] - ref[B:]))
    return -F.logsigmoid(z).mean()


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_against_own_logits(dpo: DPO, reference: nn.Module, conv: dict, *, loss_tol=1e-6, grad_tol=1e-5):
    pref, unpref, pm, pmask, umask = batch()
    policy = dpo.policy_model
    policy.zero_grad(set_to_none=True)
    loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    loss.backward()
    got = grads_of(policy)
    policy.zero_grad(set_to_none=True)
    want_loss = own_logits_loss(
        policy, reference, pref, unpref, pm, pmask, umask, beta=dpo.beta,
        reduction=conv["logprob_reduction"], alignment=conv["mask_alignment"],
    )
    want_loss.backward()
    want = grads_of(policy)
    assert abs(loss.item() - want_loss.item()) <= loss_tol * abs(want_loss.item()), (loss.item(), want_loss.item())
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) <= grad_tol, (name, rel_err(got[name], want[name]))
    return loss


# ----------------------------------------------------------------------------- the table


def test_every_head_rule_has_a_tiny_model():
    assert {k.split("-")[0] for k in CONFIGS} == set(hf.HEAD_RULES)


@pytest.mark.parametrize("conv", list(CONVENTIONS))
@pytest.mark.parametrize("key", list(CONFIGS))
def test_fused_head_matches_float64_of_the_models_own_logits(key, conv):
    model = tiny(key)
    dpo = DPO(model, head="fused", **CONVENTIONS[conv])
    assert dpo.route(model, "cpu").kind == "dpo_head"
    if key.endswith("-tied") or key.startswith(("Gemma", "Cohere", "GPT2")):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS[conv])


@pytest.mark.parametrize("key", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_logits_route_matches_float64_of_the_models_own_logits(key):
    model = tiny(key)
    dpo = DPO(model, head="logits")
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["x-transformers"])


def test_triton_route_matches_on_llama():
    """impl="triton" (the CUDA code, interpreted on CPU tensors), both matmul routes."""
    for matmul in ("torch", "triton"):
        model = tiny("LlamaForCausalLM-tied")
        dpo = DPO(model, head="fused", impl="triton", matmul=matmul)
        perturb(model)
        check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["x-transformers"])


def test_bfloat16_llama_within_bf16_of_its_own_logits():
    model = tiny("LlamaForCausalLM").to(torch.bfloat16)
    dpo = DPO(model, head="fused", logprob_reduction="sum", mask_alignment="target")
    perturb(model)
    # fastdpo scores the bf16 hidden states against the bf16 weight in float32; the model's own
    # logits are rounded to bf16 first: the two differ at bf16 rounding of the logits
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"], loss_tol=2e-2, grad_tol=2e-2)


# ----------------------------------------------------------------------------- really fused


class _Spy(TorchDispatchMode):
    """Records every tensor an op makes with V in its last dimension and at least a
    (2B, L-1, V) logits' worth of elements."""

    def __init__(self, n_rows: int):
        super().__init__()
        self.big = []
        self.n_rows = n_rows

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == V and t.numel() >= self.n_rows * V:
                self.big.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("key", ["LlamaForCausalLM", "LlamaForCausalLM-tied", "GPT2LMHeadModel", "Gemma2ForCausalLM", "lora"])
def test_fused_route_runs_the_head_on_no_rows_and_makes_no_logits(key):
    """The model's own forward runs (its wrappers' hooks with it) with logits_to_keep set to no
    position: its head multiplies zero rows, and no tensor of a logits' size ever exists."""
    if key == "lora":
        model = lora_llama()
        head_module = model.get_base_model().lm_head
    else:
        model = tiny(key)
        head_module = model.get_output_embeddings()
    calls = []  # positions the head multiplied, per call
    head_module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[-2]))
    dpo = DPO(model)  # head="auto"
    perturb(model)
    pref, unpref, pm, pmask, umask = batch()
    spy = _Spy(2 * B * (L - 1))
    with spy:
        loss = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
        loss.backward()
    assert calls == [0, 0] and spy.big == []  # reference and policy
    # the spy sees logits when they are made: the logits route
    with _Spy(2 * B * (L - 1)) as spy2:
        DPO(model, head="logits")(pref, unpref, prompt_mask=pm).backward()
    assert spy2.big and calls[2:] == [L - 1, L - 1]


# ----------------------------------------------------------------------------- fallbacks


def _reason(model) -> str:
    with pytest.raises(ValueError, match="cannot be fused") as e:
        DPO(model, head="fused")
    return str(e.value)


# ----------------------------------------------------------------------------- softcaps


def test_softcaps_are_read_from_the_config():
    caps = {key: hf.find_head(tiny(key))[0].softcap for key in CONFIGS if key.startswith("Gemma")}
    assert caps == {"GemmaForCausalLM": None, "Gemma2ForCausalLM": 30.0, "Gemma2ForCausalLM-cap2": 2.0,
                    "Gemma2ForCausalLM-nocap": None, "Gemma3ForCausalLM": None, "Gemma3ForCausalLM-cap": 3.0}
    # the tight cap changes these logits far beyond the tolerances above: a fold that skipped
    # it (or its derivative) would fail the table
    model = tiny("Gemma2ForCausalLM-cap2")
    perturb(model)
    src = batch()[0]
    with torch.no_grad():
        capped = model(input_ids=src).logits
        hidden = model.model(input_ids=src).last_hidden_state
        raw = model.lm_head(hidden)
    assert capped.abs().max() < 2.0 < raw.abs().max()


@pytest.mark.parametrize("matmul", ["torch", "triton"])
def test_triton_route_with_a_softcap(matmul):
    """impl="triton" (the CUDA code, interpreted on CPU tensors): the kernels cap the logits as
    they read them; the Triton GEMM kernels do not cap, so matmul="triton" is refused by name
    (and "auto" multiplies with torch)."""
    model = tiny("Gemma2ForCausalLM-cap2")
    if matmul == "triton":
        with pytest.raises(ValueError, match="does not cap logits"):
            DPO(model, head="fused", impl="triton", matmul="triton")(*batch()[:2], prompt_mask=batch()[2])
        assert DPO(model, impl="triton", matmul="auto").route(model, "cpu").matmul == "torch"
        return
    dpo = DPO(model, head="fused", impl="triton", matmul=matmul, **CONVENTIONS["trl"])
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_softcap_bfloat16_within_bf16_of_its_own_logits(impl):
    model = tiny("Gemma2ForCausalLM-cap2").to(torch.bfloat16)
    dpo = DPO(model, head="fused", impl=impl, **CONVENTIONS["trl"])
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["trl"], loss_tol=2e-2, grad_tol=2e-2)


def test_fallback_reasons():
    custom = tiny("LlamaForCausalLM")
    custom.lm_head = nn.Sequential(nn.Linear(32, V, bias=False))
    assert "not a plain nn.Linear" in _reason(custom)

    # (a subclass, which may change the forward, is checked on its first call:
    # tests/test_hf_inferred.py)

    # a head with a LoRA adapter on it
    lora_head = lora_llama(target_modules=["q_proj", "lm_head"])
    assert "not a plain nn.Linear" in _reason(lora_head)
    # ...which still trains on the logits route, exactly
    with pytest.warns(UserWarning, match="not a plain nn.Linear"):
        dpo = DPO(lora_head)
    with lora_head.disable_adapter():
        base = copy.deepcopy(lora_head.get_base_model()).eval()
    check_against_own_logits(dpo, base, CONVENTIONS["x-transformers"])


def test_a_hole_is_an_error_right_padding_changes_nothing():
    """(Left padding: tests/test_hf_leftpad.py.)"""
    model = tiny("LlamaForCausalLM")
    dpo = DPO(model, pad_id=0, **CONVENTIONS["trl"])  # (target alignment reads no padding)
    perturb(model)  # the policy off its reference: the loss depends on the scores
    pref, unpref, pm, pmask, umask = batch()
    holed_mask = pmask.clone()
    holed_mask[1, 5] = False
    with pytest.raises(ValueError, match=r"preferred_seq_mask has padding between real tokens \(row 1\)"):
        dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=holed_mask, unpreferred_seq_mask=umask)
    # pad_id makes the masks: a pad id inside a sequence is padding between real tokens
    holed = pref.clone()
    holed[0, 5] = 0
    with pytest.raises(ValueError, match=r"preferred_seq_mask has padding between real tokens \(row 0\)"):
        dpo(holed, unpref, prompt_mask=pm)
    # whatever the padding holds, the loss is the same
    a = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    g = torch.Generator().manual_seed(9)
    p2, u2 = pref.clone(), unpref.clone()
    p2[~pmask] = torch.randint(3, V, (int((~pmask).sum()),), generator=g)
    u2[~umask] = torch.randint(3, V, (int((~umask).sum()),), generator=g)
    b = dpo(p2, u2, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    assert torch.equal(a, b)
    assert a.item() != pytest.approx(0.6931471805599453)
    # ...and the right padding, hidden from the model by nothing but causality, matters: the
    # same sequences unpadded (their padding cut off, one pair at a time) score the same
    for i in range(B):
        one = dict(prompt_mask=pm[i:i + 1])
        n_w, n_l = int(pmask[i].sum()), int(umask[i].sum())
        n = max(n_w, n_l)
        w = dpo.reference_scores(pref[i:i + 1, :n], unpref[i:i + 1, :n], prompt_mask=pm[i:i + 1, :n],
                                 preferred_seq_mask=pmask[i:i + 1, :n], unpreferred_seq_mask=umask[i:i + 1, :n])
        full = dpo.reference_scores(pref[i:i + 1], unpref[i:i + 1], **one, preferred_seq_mask=pmask[i:i + 1],
                                    unpreferred_seq_mask=umask[i:i + 1])
        torch.testing.assert_close(w, full, rtol=1e-6, atol=1e-6)


def test_token_ids_beyond_the_embedding_are_an_error():
    dpo = DPO(tiny("LlamaForCausalLM"))
    pref, unpref, pm, *_ = batch()
    pref[0, -1] = V
    with pytest.raises(ValueError, match=r"preferred_seq holds token id 97 at index \(0, 10\), outside \[0, 97\)"):
        dpo(pref, unpref, prompt_mask=pm)


# ----------------------------------------------------------------------------- TRL


def test_trl_conventions_equal_trls_own_fused_head_and_sigmoid_loss():
    """TRL 1.16's fused LM head (trl.trainer.utils.add_fused_lm_head) scores the same model;
    its sigmoid loss on those scores is fastdpo's loss with logprob_reduction="sum",
    mask_alignment="target"."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = tiny("LlamaForCausalLM")
    dpo = DPO(model, beta=0.3, **CONVENTIONS["trl"])
    perturb(model)
    pref, unpref, pm, pmask, umask = batch()
    loss, m = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask,
                  return_metrics=True)

    def trl_logps(lm):
        lm = copy.deepcopy(lm)
        add_fused_lm_head(lm)
        seq = torch.cat((pref, unpref))
        completion = ~pm.repeat(2, 1) & torch.cat((pmask, umask))
        labels = seq.masked_fill(~completion, -100)  # as TRL's _compute_loss builds them
        with torch.no_grad():
            out = lm(input_ids=seq, labels=labels, fused_lm_head=True, use_cache=False)
        return out.log_probs.sum(1)  # TRL: per_token_logps.sum(dim=1)

    pol, ref = trl_logps(model), trl_logps(dpo.ref_model.eval())
    chosen_logratios, rejected_logratios = pol[:B] - ref[:B], pol[B:] - ref[B:]
    trl_loss = -F.logsigmoid(0.3 * (chosen_logratios - rejected_logratios)).mean()  # TRL's "sigmoid"
    torch.testing.assert_close(m["logps/chosen"], pol[:B].mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m["logps/rejected"], pol[B:].mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.detach(), trl_loss, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- peft


def lora_llama(target_modules=("q_proj", "v_proj"), seed=0):
    base = tiny("LlamaForCausalLM", seed=seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(target_modules))
    model = peft.get_peft_model(base, config)
    perturb(model, seed=5)  # LoRA's B starts at zero: move the adapters so policy != reference
    return model


def test_lora_reference_is_the_base_model_without_a_copy():
    model = lora_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # fused: no fallback warning
        dpo = DPO(model, **CONVENTIONS["trl"])
    assert dpo.ref_model is None and dpo.has_reference()
    assert dpo.route(model, "cpu").kind == "dpo_head"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in dpo.parameters()} == trainable and len(trainable) == 2 * 2 * 2
    # the reference: the same weights, adapters off (a copy made here for the check only)
    with model.disable_adapter():
        base = copy.deepcopy(model.get_base_model()).eval()
    model.train()
    check_against_own_logits(dpo, base, CONVENTIONS["trl"])
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_lora_precomputed_reference_scores():
    model = lora_llama()
    dpo = DPO(model)
    pref, unpref, pm, pmask, umask = batch()
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    w, l = dpo.reference_scores(pref, unpref, **kw)
    with model.disable_adapter():
        base = copy.deepcopy(model.get_base_model())
    # the base model's scores by another route: its frozen copy's, on the logits route
    pw, pl = DPO(base, head="logits").reference_scores(pref, unpref, **kw)
    torch.testing.assert_close(w, pw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l, pl, rtol=1e-6, atol=1e-6)
    a = dpo(pref, unpref, **kw)
    b = dpo(pref, unpref, **kw, ref_preferred_logprob=w, ref_unpreferred_logprob=l)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_prompt_learning_adapters_are_refused():
    base = tiny("LlamaForCausalLM")
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning peft adapters"):
        DPO(model)


# ----------------------------------------------------------------------------- packaging


def test_fastdpo_imports_neither_transformers_nor_peft():
    code = (
        "import sys, torch, fastdpo\n"
        "from x_transformers import TransformerWrapper, Decoder\n"
        "m = TransformerWrapper(num_tokens=11, max_seq_len=8, attn_layers=Decoder(dim=16, depth=1, heads=2))\n"
        "s = torch.randint(0, 11, (2, 6)); pm = torch.zeros(2, 6, dtype=torch.bool)\n"
        "fastdpo.DPO(m)(s, s.flip(0), prompt_mask=pm).backward()\n"
        "print(sorted(k for k in ('transformers', 'peft') if k in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_module_returning_a_model_output_works_on_the_logits_route():
    class Wrapped(nn.Module):  # any module whose output has .logits
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, x):
            return self.lm(input_ids=x, use_cache=False)

    lm = tiny("LlamaForCausalLM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dpo = DPO(Wrapped(lm))
    assert dpo.route(dpo.policy_model, "cpu").kind == "logits"
    perturb(lm)
    pref, unpref, pm, pmask, umask = batch()
    a = dpo(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    b = DPO(lm, head="logits")
    b.ref_model = dpo.ref_model.lm
    torch.testing.assert_close(a, b(pref, unpref, prompt_mask=pm, preferred_seq_mask=pmask,
                                     unpreferred_seq_mask=umask), rtol=0, atol=0)

    class Bad(nn.Module):
        def forward(self, x):
            return {"logits": x}

    with pytest.raises(TypeError, match="return its logits as a tensor or as an output with a .logits"):
        DPO(Bad(), head="logits", reference_free=True)(pref, unpref, prompt_mask=pm)


# ----------------------------------------------------------------------------- the example


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_example_trains_to_high_reward_accuracy(lora):
    """examples/train_hf.py: a tiny Llama (and its LoRA), held-out reward accuracy above 0.9,
    on the fused route."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "train_hf.py"
    spec = importlib.util.spec_from_file_location("train_hf", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.train(steps=150, seed=0, lora=lora, progress=False)
    assert result["route"] == "dpo_head"
    assert result["rewards/accuracies"] > 0.9, result


def test_compiled_hf_model_keeps_the_fused_route():
    """torch.compile around a Hugging Face model: the head is found through the wrapper and the
    compiled forward runs (with fastdpo's hooks); the loss is the eager one's."""
    model = tiny("LlamaForCausalLM")
    perturb(model)
    eager = DPO(model)
    pref, unpref, pm, pmask, umask = batch()
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    want = eager(pref, unpref, **kw)
    compiled = torch.compile(model, backend="aot_eager")
    dpo = DPO(compiled)
    dpo.ref_model = eager.ref_model
    for _ in range(2):
        got = dpo(pref, unpref, **kw)
        got.backward()
    assert dpo.route(compiled, "cpu").kind == "dpo_head"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_head_swapped_in_after_the_first_call_is_the_one_skipped():
    model = tiny("LlamaForCausalLM")
    dpo = DPO(model, head="fused")
    pref, unpref, pm, pmask, umask = batch()
    kw = dict(prompt_mask=pm, preferred_seq_mask=pmask, unpreferred_seq_mask=umask)
    dpo(pref, unpref, **kw)
    new = nn.Linear(32, V, bias=False)
    with torch.no_grad():
        new.weight.copy_(model.lm_head.weight * 1.5)
    model.lm_head = new
    dpo.scorer.routes.clear()  # (the route holds the head it found; a new head is a new route)
    calls = []
    new.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[-2]))
    perturb(model)
    check_against_own_logits(dpo, dpo.ref_model, CONVENTIONS["x-transformers"])
    assert calls[0] == 0  # the fused call skipped the new head's product
