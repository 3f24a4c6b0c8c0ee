"""The fused head alone at the medium preset's shapes (B=4 pairs, L=512, V=32000, D=256, prompts
of L/8 to L/2), for TRL's other DPO loss types against sigmoid DPO: time (one thread, the
variants interleaved in shuffled rounds, medians and their ratio to sigmoid's) and, with a
variant's name as argument, its peak memory above the inputs in this process (run each in a
fresh process, as the bench's memory workers do).

    python benchmarks/loss_types_head.py                      # times
    python benchmarks/loss_types_head.py "aot (pair op)"      # one variant's peak MiB

The variants differ only in the loss on the (2B,) scores, except aot, which couples the pairs:
on the pair op the batch is one group (logits beyond the keep budget recomputed); on the scores
route ``linear_sequence_logprobs`` scores the policy whole, then the loss.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time

import torch

from fastdpo import check_loss_config, linear_sequence_logprobs
from fastdpo.scoring.dpo_head_op import HeadOptions, dpo_head
from fastdpo.losses.pairwise import pair_losses

B, L, V, D = 4, 512, 32000, 256
VARIANTS = {
    "sigmoid": ("mean", check_loss_config("sigmoid")),
    "discopop": ("mean", check_loss_config("discopop")),
    "sigmoid+sft (sum)": ("sum", check_loss_config(["sigmoid", "sft"])),
    "forward_kl": ("mean", check_loss_config("sigmoid", f_divergence_type="forward_kl")),
    "aot (pair op)": ("mean", check_loss_config("aot")),
    "aot (scores route)": ("scores", check_loss_config("aot")),
}


def inputs():
    g = torch.Generator().manual_seed(0)
    n2, t = 2 * B, L - 1
    hidden = (torch.randn(n2, t, D, generator=g) * 0.5).requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, V, (n2, t), generator=g)
    prompt = torch.randint(L // 8, L // 2, (B,), generator=g).repeat(2)
    mask = torch.arange(t)[None] >= prompt[:, None] - 1
    ref = -torch.rand(n2, generator=g) * 5
    return hidden, weight, targets, mask, mask.sum(-1).float().clamp(min=1e-5), ref


def step(name, hidden, weight, targets, mask, count, ref):
    kind, cfg = VARIANTS[name]
    if kind == "scores":
        sums = linear_sequence_logprobs(hidden, weight, targets, mask, impl="torch")
        loss = pair_losses(sums, ref, count, cfg, "mean").mean()
    else:
        opts = HeadOptions(impl="torch", scale=None, ref_scale=None, reduction=kind, loss=cfg)
        loss = dpo_head(hidden, weight, targets, mask, count, opts, ref_scores=ref)[0]
    loss.backward()
    hidden.grad = weight.grad = None


def main() -> None:
    torch.set_num_threads(1)
    args = inputs()
    if len(sys.argv) > 1:
        from fastdpo.bench.measure import peak_extra_bytes, worker_heap

        worker_heap()
        name = sys.argv[1]
        print(json.dumps({"variant": name, "peak_MiB": peak_extra_bytes(lambda: step(name, *args), "cpu") / 2**20}))
        return
    names = list(VARIANTS)
    for n in names:
        step(n, *args)
    times = {n: [] for n in names}
    rng = random.Random(1)
    for _ in range(11):
        rng.shuffle(names)
        for n in names:
            t0 = time.perf_counter()
            step(n, *args)
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["sigmoid"])
    for n in VARIANTS:
        m = statistics.median(times[n])
        print(f"{n:20s} {m * 1e3:8.1f} ms  {m / base:.3f}x sigmoid's")


if __name__ == "__main__":
    main()
