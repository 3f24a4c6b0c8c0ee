"""The fused head: linear_sequence_logprobs on every route, the DPO head op (pair groups),
head detection, fallbacks.

Routes (impl, matmul): ("torch", "auto") is the CPU path; ("triton", "torch") is the CUDA
default (library products + Triton fold) and ("triton", "triton") the Triton GEMM kernels,
both interpreted on CPU tensors (TRITON_INTERPRET=1, set by conftest) and compiled on a GPU."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from x_transformers import Decoder, TransformerWrapper
from x_transformers.dpo import DPO as XDPO

import fastdpo.scoring.rows as chunks
from fastdpo import DPO, linear_sequence_logprobs
from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head
from fastdpo.losses import check_loss_config
from fastdpo.models import adapter_for

from helpers import reference_logprobs, rel_err, three_way

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUTES = [("torch", "auto"), ("triton", "torch"), ("triton", "triton")]
ROUTE_IDS = ["torch", "triton-fold", "triton-gemm"]


def make_inputs(n, t, d, v, dtype, seed, p_mask=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5 * 3).to(dtype)
    targets = torch.randint(0, v, (n, t), generator=g)
    mask = torch.rand(n, t, generator=g) > p_mask
    return hidden, weight, targets, mask


def via_logits(hidden, weight, targets, mask, scale, softcap=None, bias=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if scale is not None:
        logits = logits * scale
    if softcap is not None:  # Gemma 2's order: divide, tanh, multiply
        logits = torch.tanh(logits / softcap) * softcap
    return reference_logprobs(logits, targets, mask)


# (scale, softcap, bias): none, x-transformers' tied scale, a cap (1.5: these logits reach ~5,
# far into the tanh's bend) after a scale, and a head bias (Phi's) under both
HEAD_MAPS = {"plain": (None, None, False), "scale": (0.37, None, False), "softcap": (0.37, 1.5, False),
             "bias": (0.37, 1.5, True)}


@pytest.mark.parametrize("route", ROUTES[:2], ids=ROUTE_IDS[:2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 7, 33, 1001), (3, 1, 16, 2), (1, 9, 40, 257)], ids=str)
@pytest.mark.parametrize("head_map", list(HEAD_MAPS))
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_linear_logprobs_against_float64(shape, dtype, head_map, chunk_rows, route, monkeypatch):
    n, t, d, v = shape
    impl, matmul = route
    scale, softcap, biased = HEAD_MAPS[head_map]
    if chunk_rows is not None:
        monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * v * chunk_rows)
    hidden, weight, targets, mask = make_inputs(n, t, d, v, dtype, seed=d + v)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(v)).to(dtype) if biased else None
    upstream = torch.randn(n)

    def run(fn, cast):
        h = cast(hidden).requires_grad_()
        w = cast(weight).requires_grad_()
        b = cast(bias).requires_grad_() if biased else None
        out = fn(h, w, targets, mask, scale, softcap, b)
        out.float().backward(upstream.to(out.dtype))
        return out, h.grad, w.grad, *((b.grad,) if biased else ())

    truth = run(via_logits, lambda x: x.double())
    ref = run(via_logits, lambda x: x.clone())
    ours = run(lambda h, w, y, m, s, c, b: linear_sequence_logprobs(h, w, y, m, scale=s, softcap=c, bias=b, impl=impl,
                                                                    matmul=matmul),
               lambda x: x.clone())
    assert ours[0].dtype == torch.float32
    assert all(g.dtype == dtype for g in ours[1:])
    for what, o, r, tr in zip(("scores", "d hidden", "d weight", "d bias"), ours, ref, truth):
        three_way(o, r, tr, dtype, what)


@pytest.mark.parametrize("scale", [None, 0.37])
@pytest.mark.parametrize("shape", [(2, 5, 33, 301), (3, 1, 16, 2)], ids=str)
def test_linear_logprobs_triton_gemm_against_float64(shape, scale):
    """impl='triton', matmul='triton': the fused-linear kernels (interpreted on CPU), float32.
    The kernels' own tests cover 16-bit inputs and their block boundaries."""
    n, t, d, v = shape
    hidden, weight, targets, mask = make_inputs(n, t, d, v, torch.float32, seed=d + v)
    targets[~mask] = -100  # never read at masked positions
    safe = torch.where(mask, targets, 0)
    upstream = torch.randn(n)

    def run(fn, cast, y):
        h = cast(hidden).requires_grad_()
        w = cast(weight).requires_grad_()
        out = fn(h, w, y, mask, scale)
        out.float().backward(upstream.to(out.dtype))
        return out, h.grad, w.grad

    truth = run(via_logits, lambda x: x.double(), safe)
    ref = run(via_logits, lambda x: x.clone(), safe)
    ours = run(lambda h, w, y, m, s: linear_sequence_logprobs(h, w, y, m, scale=s, impl="triton", matmul="triton"), lambda x: x.clone(), targets)
    for what, o, r, tr in zip(("scores", "d hidden", "d weight"), ours, ref, truth):
        three_way(o, r, tr, torch.float32, what)
    assert (ours[1][~mask] == 0).all()


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an ATen op returns (a custom op's insides are hidden
    from the mode: the products and buffers there are caught by patching torch.mm/empty)."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen.extend(tuple(x.shape) for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor))
        return out


def vocab_wide_shapes(step, v, monkeypatch) -> list[tuple[int, ...]]:
    """Every tensor shape ending in V that ``step()`` creates: ATen outputs, torch.mm products
    and torch.empty buffers (also inside fastdpo's custom ops)."""
    seen: list[tuple[int, ...]] = []
    real_mm, real_empty = torch.mm, torch.empty

    def mm(*a, **k):
        out = real_mm(*a, **k)
        seen.append(tuple(out.shape))
        return out

    def empty(*a, **k):
        out = real_empty(*a, **k)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "empty", empty)
    with _Shapes(seen):
        step()
    monkeypatch.undo()
    return [s for s in seen if s and s[-1] == v]


@pytest.mark.parametrize("route", ROUTES[:2], ids=ROUTE_IDS[:2])
def test_linear_logprobs_never_builds_full_logits(route, monkeypatch):
    """Only chunk-sized products: every (rows, V) tensor has at most the chunk's rows."""
    n, t, d, v = 4, 16, 8, 500
    impl, matmul = route
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * v * 5)
    hidden, weight, targets, mask = make_inputs(n, t, d, v, torch.float32, seed=0)
    h = hidden.requires_grad_()

    def step():
        linear_sequence_logprobs(h, weight, targets, mask, impl=impl, matmul=matmul).sum().backward()

    shapes = vocab_wide_shapes(step, v, monkeypatch)
    assert shapes, "the spy saw no product: it checks nothing"
    assert max(math.prod(s[:-1]) for s in shapes) <= 5, shapes


@pytest.mark.parametrize("tie", [False, True], ids=["linear", "tied"])
@pytest.mark.parametrize("route", ROUTES[:2], ids=ROUTE_IDS[:2])
def test_dpo_step_never_builds_full_logits(route, tie, monkeypatch):
    """A whole DPO training step on the default fused route (reference, policy, loss,
    backward): no tensor with a V-wide last dimension has as many rows as the (2B, L-1)
    positions, and the model's own head is never called."""
    b, l, v = 3, 12, 311
    impl, matmul = route
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * v * 4)
    monkeypatch.setattr(chunks, "GROUP_BYTES", 4 * v * 6)
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=v, max_seq_len=16, tie_embedding=tie, attn_layers=Decoder(dim=16, depth=1, heads=2))
    dpo = DPO(model, impl=impl, matmul=matmul)
    assert dpo.route(dpo.policy_model, "cpu").kind == "dpo_head"
    head_calls = []
    if not tie:
        model.to_logits.register_forward_hook(lambda *a: head_calls.append(1))
    g = torch.Generator().manual_seed(3)
    pref, unpref = torch.randint(0, v, (b, l), generator=g), torch.randint(0, v, (b, l), generator=g)
    pm = torch.arange(l)[None] < torch.tensor([[3], [5], [2]])

    shapes = vocab_wide_shapes(lambda: dpo(pref, unpref, prompt_mask=pm).backward(), v, monkeypatch)
    assert shapes, "the spy saw no product: it checks nothing"
    rows = max(math.prod(s[:-1]) for s in shapes)
    assert rows < 2 * b * (l - 1), shapes
    assert rows <= 6, shapes  # the keep budget in rows
    assert head_calls == []


@pytest.mark.parametrize("head_map", ["scale", "softcap", "bias"])
@pytest.mark.parametrize("fold", ["torch", "triton"])
@pytest.mark.parametrize("group_bytes", ["pair", "all", "partial", "too_small"])
def test_pair_groups_agree(group_bytes, fold, head_map):
    """dpo_head: one pair per group, all pairs in one group, pairs partly kept and partly
    recomputed, and pairs recomputed whole all agree with float64, with and without a live
    reference, an all-prompt sequence and padding; with a softcap (the policy's and another
    for the reference) and with head biases, on the kept and the recomputed rows alike."""
    _, softcap, biased = HEAD_MAPS[head_map]
    b, t, d, v = 3, 6, 12, 301
    hidden, weight, targets, mask = make_inputs(2 * b, t, d, v, torch.float32, seed=4)
    mask[1] = False  # a chosen sequence with no scored token
    ref_hidden = torch.randn(2 * b, t, d, generator=torch.Generator().manual_seed(9))
    ref_weight = weight + 0.1 * torch.randn(v, d, generator=torch.Generator().manual_seed(10))
    budget = {"pair": 4 * v * 2 * t, "all": 1 << 30, "partial": 4 * v * 6, "too_small": 4 * v}[group_bytes]
    ref_cap = None if softcap is None else 2.5
    opts = HeadOptions(impl=fold, scale=0.37, ref_scale=0.37, reduction="mean", loss=check_loss_config("sigmoid", 0.5),
                       chunk_bytes=4 * v * 4, group_bytes=budget, softcap=softcap, ref_softcap=ref_cap)
    count = mask.sum(-1).clamp(min=1e-5)
    g = torch.Generator().manual_seed(12)
    bias, ref_bias = (torch.randn(v, generator=g), torch.randn(v, generator=g)) if biased else (None, None)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b1 = bias.clone().requires_grad_() if biased else None
    loss, sums, ref, _ = dpo_head(h1, w1, targets, mask, count, opts, ref_hidden=ref_hidden, ref_weight=ref_weight,
                                  bias=b1, ref_bias=ref_bias)
    loss.backward()

    h2, w2 = hidden.clone().double().requires_grad_(), weight.clone().double().requires_grad_()
    b2 = bias.double().requires_grad_() if biased else None
    rb = ref_bias.double() if biased else None
    s2 = via_logits(h2, w2, targets, mask, 0.37, softcap, b2) / count
    r = via_logits(ref_hidden.double(), ref_weight.double(), targets, mask, 0.37, ref_cap, rb) / count
    expected = -F.logsigmoid(0.5 * ((s2[:b] - s2[b:]) - (r[:b] - r[b:]))).mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-6 * abs(expected.item())
    torch.testing.assert_close(ref.double(), r, rtol=1e-6, atol=1e-6)
    want_sums = via_logits(hidden.double(), weight.double(), targets, mask, 0.37, softcap, b2.detach() if biased else None)
    torch.testing.assert_close(sums.double(), want_sums, rtol=1e-6, atol=1e-5)
    assert rel_err(h1.grad, h2.grad) <= 1e-5
    assert rel_err(w1.grad, w2.grad) <= 1e-5
    if biased:
        assert rel_err(b1.grad, b2.grad) <= 1e-5
    assert (h1.grad[~mask] == 0).all()


def test_linear_bad_input():
    hidden, weight, targets, mask = make_inputs(2, 3, 8, 20, torch.float32, seed=0)
    mask[:] = True
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_sequence_logprobs(hidden, weight[:, :4], targets, mask)
    with pytest.raises(TypeError, match="must share a dtype"):
        linear_sequence_logprobs(hidden, weight.half(), targets, mask)
    with pytest.raises(ValueError, match="targets holds token id"):
        linear_sequence_logprobs(hidden, weight, targets + 20, mask)
    with pytest.raises(ValueError, match="scale must be finite"):
        linear_sequence_logprobs(hidden, weight, targets, mask, scale=float("inf"))
    with pytest.raises(ValueError, match="matmul='triton'"):
        linear_sequence_logprobs(hidden, weight, targets, mask, impl="torch", matmul="triton")
    with pytest.raises(ValueError, match="matmul must be one of"):
        linear_sequence_logprobs(hidden, weight, targets, mask, matmul="cublas")
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap must be (finite|a finite number > 0)"):
            linear_sequence_logprobs(hidden, weight, targets, mask, softcap=bad)
    with pytest.raises(TypeError, match="softcap must be a real Python number"):
        linear_sequence_logprobs(hidden, weight, targets, mask, softcap=torch.tensor(2.0))
    with pytest.raises(ValueError, match="does not cap logits"):
        linear_sequence_logprobs(hidden, weight, targets, mask, softcap=2.0, impl="triton", matmul="triton")
    bias = torch.randn(20)
    with pytest.raises(ValueError, match="does not add a head bias"):
        linear_sequence_logprobs(hidden, weight, targets, mask, bias=bias, impl="triton", matmul="triton")
    with pytest.raises(ValueError, match=r"bias must be a \(20,\) tensor of the weight's dtype"):
        linear_sequence_logprobs(hidden, weight, targets, mask, bias=bias[:5])
    with pytest.raises(ValueError, match="bias must be a"):
        linear_sequence_logprobs(hidden, weight, targets, mask, bias=bias.double())


# ----------------------------------------------------------------------------- head detection


def wrapper(**kw):
    torch.manual_seed(0)
    return TransformerWrapper(num_tokens=64, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2), **kw)


class Softcapped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 64, bias=False)

    def forward(self, x):
        return 30 * torch.tanh(self.proj(x) / 30)


class NotAWrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.num_tokens = 64
        self.emb = torch.nn.Embedding(64, 16)
        self.out = torch.nn.Linear(16, 64, bias=False)

    def forward(self, x):
        return self.out(self.emb(x))


FALLBACKS = {
    "custom to_logits (soft-capping)": (lambda: wrapper(to_logits=Softcapped()), "custom Softcapped"),
    "multiple heads": (lambda: wrapper(num_output_heads=2), "multiple output heads"),
    "mixture of softmax": (lambda: wrapper(mixture_of_softmax=True), "mixture of softmaxes"),
    "sigsoftmax": (lambda: wrapper(sigsoftmax_logits=True), "sigsoftmax"),
    "not a TransformerWrapper": (NotAWrapper, "not a TransformerWrapper"),
}


def test_fusable_heads_are_found():
    head, why = adapter_for(wrapper()).head()
    assert head is not None and head.scale is None and why == "" and not head.has_bias
    biased, _ = adapter_for(wrapper(to_logits=torch.nn.Linear(16, 64))).head()
    assert biased is not None and biased.has_bias
    tied, _ = adapter_for(wrapper(tie_embedding=True)).head()
    assert tied is not None and tied.scale == pytest.approx(16**-0.5)


def _moved_from_reference(ours: DPO, x: XDPO):
    """Move x-transformers' policy off its reference (so loss and gradients are not trivial),
    give ``ours`` the same weights; return a seeded (pref, unpref, prompt_mask) batch."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for p in x.policy_model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours.policy_model.load_state_dict(x.policy_model.state_dict())
    ours.ref_model.load_state_dict(x.ref_model.state_dict())
    g = torch.Generator().manual_seed(1)
    pref, unpref = torch.randint(0, 64, (2, 9), generator=g), torch.randint(0, 64, (2, 9), generator=g)
    return pref, unpref, torch.arange(9)[None] < torch.tensor([[2], [4]])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_biased_to_logits_is_fused_and_matches_x_transformers(impl):
    """An ``nn.Linear`` to_logits with a bias: fused (the bias added by the product, its
    gradient the logits' gradient summed over rows), the loss and every gradient, the bias's
    included, x-transformers' own."""
    def make():
        return wrapper(to_logits=torch.nn.Linear(16, 64))

    ours, x = DPO(make(), head="fused", impl=impl), XDPO(make())
    pref, unpref, pm = _moved_from_reference(ours, x)
    lx, lo = x(pref, unpref, prompt_mask=pm), ours(pref, unpref, prompt_mask=pm)
    assert ours.route(ours.policy_model, "cpu").kind == "dpo_head"
    lx.backward()
    lo.backward()
    assert abs(lx.item() - math.log(2)) > 1e-3
    assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item())
    gx = dict(x.policy_model.named_parameters())
    for n, p in ours.policy_model.named_parameters():
        if gx[n].grad is not None:
            assert rel_err(p.grad, gx[n].grad) <= 1e-5, n
    assert ours.policy_model.to_logits.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("name", FALLBACKS)
def test_fallback_triggers(name):
    make, reason = FALLBACKS[name]
    head, why = adapter_for(make()).head()
    assert head is None and reason in why
    with pytest.raises(ValueError, match=reason):
        DPO(make(), head="fused")

    # head="auto" falls back to the logits route, says why once (at construction), and
    # matches x-transformers (the policy moved away from the reference, so loss and gradients
    # are not trivial)
    with pytest.warns(UserWarning, match=reason):
        ours = DPO(make())
    x = XDPO(make())
    pref, unpref, pm = _moved_from_reference(ours, x)
    if name == "multiple heads":
        # a tuple of logits: x-transformers fails with an AttributeError, we say what is wrong
        with pytest.raises(TypeError, match="the model must return its logits as a tensor or as an output with a .logits tensor, got tuple"):
            ours(pref, unpref, prompt_mask=pm)
        return
    lx = x(pref, unpref, prompt_mask=pm)
    lx.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not at every step
        lo = ours(pref, unpref, prompt_mask=pm)
    assert ours.route(ours.policy_model, "cpu").kind == "logits"
    lo.backward()
    assert abs(lx.item() - math.log(2)) > 1e-3  # not the trivial loss of policy == reference
    assert abs(lo.item() - lx.item()) <= 1e-6 * abs(lx.item())
    gx = dict(x.policy_model.named_parameters())
    for n, p in ours.policy_model.named_parameters():
        if gx[n].grad is not None:
            assert rel_err(p.grad, gx[n].grad) <= 1e-5, n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DPO(make(), head="logits")  # asked for: nothing to say


def test_compiled_model_keeps_the_fused_head():
    """DPO(torch.compile(model)) finds the head through the wrapper, runs the compiled body,
    and gives the eager numbers."""
    model = wrapper()
    dpo = DPO(torch.compile(model, backend="eager"))
    assert dpo.route(dpo.policy_model, "cpu").kind == "dpo_head"
    eager = DPO(wrapper())
    g = torch.Generator().manual_seed(1)
    pref, unpref = torch.randint(0, 64, (2, 9), generator=g), torch.randint(0, 64, (2, 9), generator=g)
    pm = torch.arange(9)[None] < torch.tensor([[2], [4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        assert torch.equal(dpo(pref, unpref, prompt_mask=pm), eager(pref, unpref, prompt_mask=pm))


# ----------------------------------------------------------------------------- precomputed reference


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_precomputed_reference_scores_give_the_same_step(head):
    torch.manual_seed(0)
    model = wrapper()
    live, pre = DPO(model, pad_id=0, head=head), DPO(wrapper(), pad_id=0, head=head)
    pre.load_state_dict(live.state_dict())
    with torch.no_grad():
        for p in list(live.policy_model.parameters()) + list(pre.policy_model.parameters()):
            p.mul_(1.01)
    g = torch.Generator().manual_seed(2)
    pref, unpref = torch.randint(1, 64, (3, 11), generator=g), torch.randint(1, 64, (3, 11), generator=g)
    unpref[0, -3:] = 0
    pm = torch.arange(11)[None] < torch.tensor([[2], [4], [3]])

    l1 = live(pref, unpref, prompt_mask=pm)
    l1.backward()
    ref_w, ref_l = pre.reference_scores(pref, unpref, prompt_mask=pm)
    assert ref_w.shape == (3,) and not ref_w.requires_grad
    l2 = pre(pref, unpref, prompt_mask=pm, ref_preferred_logprob=ref_w, ref_unpreferred_logprob=ref_l)
    l2.backward()
    assert torch.equal(l1, l2)
    for (n, a), (_, b) in zip(live.policy_model.named_parameters(), pre.policy_model.named_parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_precomputed_reference_scores_checked():
    dpo = DPO(wrapper())
    pref = torch.randint(0, 64, (2, 5))
    pm = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="both"):
        dpo(pref, pref, prompt_mask=pm, ref_preferred_logprob=torch.zeros(2))
    with pytest.raises(ValueError, match=r"ref_unpreferred_logprob must have shape \(2,\)"):
        dpo(pref, pref, prompt_mask=pm, ref_preferred_logprob=torch.zeros(2), ref_unpreferred_logprob=torch.zeros(3))


def test_precompute_reference_scores_over_a_dataloader():
    from torch.utils.data import DataLoader

    from fastdpo import PreferenceDataset, precompute_reference_scores

    g = torch.Generator().manual_seed(5)
    items = [
        dict(preferred=torch.randint(1, 64, (int(lw),), generator=g), unpreferred=torch.randint(1, 64, (int(ll),), generator=g), prompt_len=2)
        for lw, ll in torch.randint(3, 9, (5, 2), generator=g)
    ]
    ds = PreferenceDataset(items, pad_id=0)
    loader = DataLoader(ds, batch_size=2, collate_fn=ds.collate)
    dpo = DPO(wrapper(), pad_id=0)
    ref_w, ref_l = precompute_reference_scores(dpo, loader, progress=False)
    assert ref_w.shape == ref_l.shape == (5,)
    start = 0
    for pref, unpref, pm in loader:
        b = pref.shape[0]
        live = dpo(pref, unpref, prompt_mask=pm)
        pre = dpo(pref, unpref, prompt_mask=pm, ref_preferred_logprob=ref_w[start : start + b], ref_unpreferred_logprob=ref_l[start : start + b])
        assert torch.equal(live, pre)
        start += b


@pytest.mark.parametrize("fold", ["torch", "triton"])
def test_pair_fusion_multiplies_each_counted_row_once_per_model(fold, monkeypatch):
    """Within the keep budget a DPO step's head multiplies each counted row once for the
    reference and once for the policy (the two gradient products reuse the kept logits: no
    recompute); over the budget the rows that did not fit are multiplied again."""
    b, l, v = 3, 12, 311
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=v, max_seq_len=16, attn_layers=Decoder(dim=16, depth=1, heads=2))
    dpo = DPO(model, impl=fold)
    g = torch.Generator().manual_seed(3)
    pref, unpref = torch.randint(0, v, (b, l), generator=g), torch.randint(0, v, (b, l), generator=g)
    pm = torch.arange(l)[None] < torch.tensor([[3], [5], [2]])
    m = int(dpo._batch(pref, unpref, pm, None, None).mask.sum())
    rows = []
    real = chunks.logits_into
    monkeypatch.setattr(chunks, "logits_into", lambda out, h, w, s, b=None: rows.append(h.shape[0]) or real(out, h, w, s, b))
    dpo(pref, unpref, prompt_mask=pm).backward()
    assert sum(rows) == 2 * m, (rows, m)
    rows.clear()
    monkeypatch.setattr(chunks, "GROUP_BYTES", 4 * v * 4)  # 4 rows kept per group: the rest recomputed
    dpo(pref, unpref, prompt_mask=pm).backward()
    assert 2 * m < sum(rows) < 3 * m, (rows, m)
