"""torch.compile: fastdpo's ops are custom ops (no graph break, same numbers), and a whole DPO
step compiles with fullgraph=True on every route."""

from __future__ import annotations

import math

import pytest
import torch

from fastdpo import sequence_logprobs

from helpers import reference_logprobs, three_way


class Head(torch.nn.Module):
    """A tiny LM head followed by the masked mean of sequence log-probs."""

    def __init__(self, d=16, v=97):
        super().__init__()
        self.proj = torch.nn.Linear(d, v, bias=False)

    def forward(self, h, targets, mask):
        scores = sequence_logprobs(self.proj(h), targets, mask, impl="torch")
        return (scores / mask.sum(-1).clamp(min=1)).mean()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(backend):
    torch.manual_seed(0)
    model = Head()
    h = torch.randn(3, 5, 16)
    targets = torch.randint(0, 97, (3, 5))
    mask = torch.rand(3, 5) > 0.3

    eager = model(h, targets, mask)
    eager.backward()
    g_eager = model.proj.weight.grad.clone()
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # raises on a graph break
    out = compiled(h, targets, mask)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.proj.weight.grad, g_eager, rtol=1e-5, atol=1e-7)


def test_custom_op_passes_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    logits = torch.randn(2, 4, 33, requires_grad=True)
    targets = torch.randint(0, 33, (2, 4))
    mask = torch.rand(2, 4) > 0.2
    op = torch.ops.fastdpo.sequence_logprobs.default
    weights = torch.rand(2, 4)  # LD-DPO's token weights; sq: WPO's log sum p^2 sums
    for impl in ("torch", "triton"):
        torch.library.opcheck(op, (logits, None, targets, mask, None, impl, False, False, False))
        torch.library.opcheck(op, (logits, torch.randn(2, 4, 33), targets, mask, weights, impl, False, False, False))
        torch.library.opcheck(op, (logits, None, targets, mask, weights, impl, False, False, True))
    # keep_probs carries the softmax from forward to backward outside the saved tensors, so it
    # is never set under compile (or a torch.func transform): every check but AOT dispatch.
    eager = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, (logits, None, targets, mask, None, "torch", False, True, False), test_utils=eager)


# ----------------------------------------------------------------------------- a whole DPO step

from x_transformers import Decoder, TransformerWrapper  # noqa: E402

from fastdpo import DPO, linear_sequence_logprobs  # noqa: E402

# Every route DPO can take (with impl="triton" the kernels run interpreted on CPU tensors).
DPO_ROUTES = {
    "fused": dict(),
    "fused-triton": dict(impl="triton"),
    "fused-triton-gemm": dict(impl="triton", matmul="triton"),
    "logits": dict(head="logits"),
    "logits-triton": dict(head="logits", impl="triton"),
}


def _dpo(kw, tie=False):
    torch.manual_seed(0)
    model = TransformerWrapper(num_tokens=97, max_seq_len=32, tie_embedding=tie, attn_layers=Decoder(dim=32, depth=1, heads=2))
    dpo = DPO(model, **kw)
    with torch.no_grad():  # the policy away from the reference: a loss that is not log 2
        g = torch.Generator().manual_seed(1)
        for p in dpo.policy_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return dpo


def _batch():
    g = torch.Generator().manual_seed(2)
    pref, unpref = torch.randint(0, 97, (3, 16), generator=g), torch.randint(0, 97, (3, 16), generator=g)
    pm = torch.arange(16)[None] < torch.tensor([[3], [5], [16]])  # the last pair is all prompt
    unpref[pm] = pref[pm]
    return pref, unpref, pm


@pytest.mark.parametrize("route", DPO_ROUTES)
def test_dpo_step_compiles_fullgraph(route):
    """torch.compile(fullgraph=True) over a whole DPO step (reference, policy, head, loss,
    backward) on every route: no graph break, the eager loss and gradients."""
    dpo = _dpo(DPO_ROUTES[route])
    pref, unpref, pm = _batch()
    eager = dpo(pref, unpref, prompt_mask=pm)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in dpo.policy_model.named_parameters()}
    dpo.policy_model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    step = torch.compile(lambda a, b, m: dpo(a, b, prompt_mask=m), fullgraph=True, backend="aot_eager")
    loss = step(pref, unpref, pm)
    loss.backward()
    assert abs(eager.item() - math.log(2)) > 1e-4
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=0)
    for n, p in dpo.policy_model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_linear_custom_op_passes_opcheck():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.3
    assert mask.any() and not mask.all()
    upstream = torch.randn(2, generator=g)
    bias = torch.randn(13, generator=g, requires_grad=True)
    op = torch.ops.fastdpo.linear_sequence_logprobs.default
    # (scale, softcap, impl, matmul)
    routes = ((None, None, "torch", "torch"), (0.5, None, "torch", "torch"), (0.5, 2.0, "torch", "torch"),
              (None, None, "triton", "torch"), (None, 2.0, "triton", "torch"), (None, None, "triton", "triton"))
    for args in routes:
        # the last argument: chunk_bytes (0: the device's default; 3 rows of logits: chunked)
        torch.library.opcheck(op, (hidden, weight, None, targets, mask, None, *args, False, 0))
        torch.library.opcheck(op, (hidden, weight, None, targets, mask, None, *args, False, 4 * 13 * 3))
        # with LD-DPO's token weights, and (but on the Triton GEMM route) WPO's log sum p^2 sums
        torch.library.opcheck(op, (hidden, weight, None, targets, mask, torch.rand(2, 5, generator=g), *args,
                                   args[3] == "torch", 0))
        if args[3] == "torch":  # with a head bias (Phi's)
            torch.library.opcheck(op, (hidden, weight, bias, targets, mask, None, *args, False, 0))
        # and its values: scores and gradients against float64 (the row stats, the second
        # output, are each route's own business: the torch fold keeps none)
        s = 1.0 if args[0] is None else args[0]

        def head(z):
            return z if args[1] is None else torch.tanh(z / args[1]) * args[1]

        h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        truth = reference_logprobs(head(s * h64 @ w64.T), targets, mask)
        h32, w32 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        ref = reference_logprobs(head(s * h32 @ w32.T), targets, mask)
        scores, _, _ = op(hidden, weight, None, targets, mask, None, *args, False, 0)
        three_way(scores, ref, truth, torch.float32, f"scores {args}")
        grads = torch.autograd.grad(scores, (hidden, weight), upstream)
        truths = torch.autograd.grad(truth, (h64, w64), upstream.double())
        refs = torch.autograd.grad(ref, (h32, w32), upstream)
        for name, ours_g, ref_g, truth_g in zip(("hidden", "weight"), grads, refs, truths):
            three_way(ours_g, ref_g, truth_g, torch.float32, f"d scores / d {name} {args}")
    h, w = hidden.detach(), weight.detach()
    ref, truth = reference_logprobs(h @ w.T, targets, mask), reference_logprobs(h.double() @ w.double().T, targets, mask)
    three_way(linear_sequence_logprobs(hidden, weight, targets, mask), ref, truth, torch.float32, "public function")


def test_dpo_head_custom_op_passes_opcheck():
    from fastdpo import check_loss_config
    from fastdpo.scoring.dpo_head_op import HeadOptions, to_op_args

    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(4, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 13, (4, 5), generator=g)
    mask = torch.rand(4, 5, generator=g) > 0.3
    count = mask.sum(-1).clamp(min=1e-5).float()
    ref_hidden = torch.randn(4, 5, 8, generator=g)
    bias = torch.randn(13, generator=g, requires_grad=True)
    op = torch.ops.fastdpo.dpo_head.default
    losses = (check_loss_config("sigmoid", 0.1), check_loss_config(["ipo", "bco_pair"], 0.2, bco_delta=torch.randn(2, generator=g)))
    for fold in ("torch", "triton"):
        for loss in losses:
            for weighted in (False, True):  # with LD-DPO's token weights and WPO's pair weights, or neither
                opts = to_op_args(HeadOptions(impl=fold, scale=None, ref_scale=0.5, reduction="mean", loss=loss,
                                              count_hits=True, use_weighting=weighted))
                w = torch.rand(4, 5, generator=g) if weighted else None
                torch.library.opcheck(op, (hidden, weight, targets, mask, count, w, ref_hidden, weight.detach(), None,
                                           None, None, *opts, True, True, False))
                torch.library.opcheck(op, (hidden, weight, targets, mask, count, w, None, None, torch.randn(4),
                                           None, None, *opts, False, False, False))
                # with head biases (Phi's), the policy's differentiated
                torch.library.opcheck(op, (hidden, weight, targets, mask, count, w, ref_hidden, weight.detach(), None,
                                           bias, bias.detach() + 0.1, *opts, True, True, True))


def test_dpo_head_schema_is_derived_from_head_options():
    """The op's option arguments are HeadOptions' leaves (LossConfig nested as ``loss``), in
    declaration order, and convert both ways without loss."""
    import dataclasses

    from fastdpo import check_loss_config
    from fastdpo.scoring.dpo_head_op import HeadOptions, from_op_args, to_op_args
    from fastdpo.losses import LossConfig

    leaves = []
    for f in dataclasses.fields(HeadOptions):
        leaves += [g.name for g in dataclasses.fields(LossConfig)] if f.name == "loss" else [f.name]
    names = [a.name for a in torch.ops.fastdpo.dpo_head.default._schema.arguments]
    tensors = ["hidden", "weight", "targets", "mask", "count", "token_weights", "ref_hidden", "ref_weight", "ref_scores",
               "bias", "ref_bias"]
    expected = tensors + [x for leaf in leaves for x in ((leaf, leaf + "_value") if leaf == "bco_delta" else (leaf,))]
    assert names == expected + ["need_hidden", "need_weight", "need_bias"]
    delta = torch.tensor([0.3, -0.1])
    for loss in (check_loss_config(["sigmoid", "ipo"], 0.3, 0.1, [1.0, 2.0]), check_loss_config("bco_pair", bco_delta=delta),
                 check_loss_config("bco_pair", bco_delta=0.25)):
        opts = HeadOptions(impl="triton", scale=0.5, ref_scale=None, reduction="sum", loss=loss, count_hits=True,
                           use_weighting=True, chunk_bytes=123, group_bytes=456)
        back = from_op_args(to_op_args(opts))
        assert back.loss.bco_delta is loss.bco_delta or back.loss.bco_delta == loss.bco_delta
        assert dataclasses.replace(back, loss=dataclasses.replace(back.loss, bco_delta=0)) == dataclasses.replace(
            opts, loss=dataclasses.replace(loss, bco_delta=0))
    with pytest.raises(ValueError, match="couples the pairs"):
        to_op_args(dataclasses.replace(opts, loss=check_loss_config("bco_pair", bco_delta="batch")))
