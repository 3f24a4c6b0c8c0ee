"""torch.compile sees sequence_logprobs as one custom op: no graph break, same numbers."""

from __future__ import annotations

import pytest
import torch

from fastdpo import sequence_logprobs


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
    torch.library.opcheck(op, (logits, None, targets, mask, "torch", False))
    torch.library.opcheck(op, (logits, torch.randn(2, 4, 33), targets, mask, "torch", False))
