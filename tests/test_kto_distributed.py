"""KTO under DistributedDataParallel: two CPU processes, gloo.

Each rank gets half of a batch of N = 4 unpaired sequences, with the KL sequences the whole
batch's collate built (split the same way).  With ``sync_kl=True`` (default) the ranks average
their KL estimates before the clamp, as TRL's ``gather_for_metrics(kl).mean()``; with equal
halves that is the whole batch's estimate, and KTO's loss being a mean over sequences, the
gradient DDP averages is the whole batch's gradient in one process.  With ``sync_kl=False``
each rank keeps its own estimate.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from helpers import spawned_job, tiny_transformer

WORLD = 2
V = 32
TIMEOUT_S = 240  # two fresh interpreters importing torch on a shared 2-core machine

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


def make_kto(sync_kl: bool = True):
    from fastdpo import KTO

    kto = KTO(tiny_transformer(V, max_seq_len=16, dim=16, depth=1, heads=2, seed=0), beta=0.5, pad_id=0,
              sync_kl=sync_kl, logprob_reduction="sum", mask_alignment="target")
    # seed 7: the whole batch's estimate is positive, rank 1's half alone negative (so averaging
    # before the clamp, as TRL, differs from averaging clamped estimates)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in kto.policy_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return kto


def make_batch() -> dict:
    from fastdpo import KTODataset

    g = torch.Generator().manual_seed(2)
    items = [{"prompt": torch.randint(1, V, (p,), generator=g), "completion": torch.randint(1, V, (c,), generator=g),
              "label": d} for p, c, d in [(2, 5, True), (3, 2, False), (1, 4, False), (4, 3, True)]]
    ds = KTODataset(items, pad_id=0)
    return ds.collate([ds[i] for i in range(len(ds))])


def grads(kto) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in kto.policy_model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    res = {}
    try:
        batch = make_batch()
        n = batch["seq"].shape[0]
        mine = {k: v[rank * n // world:(rank + 1) * n // world] for k, v in batch.items()}
        for sync in (True, False):
            kto = make_kto(sync)
            ddp = DDP(kto)
            loss, metrics = ddp(**mine, return_metrics=True)
            loss.backward()
            res[sync] = {"kl": metrics["kl"], "grads": grads(kto)}
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return spawned_job(_worker, WORLD, tmp_path_factory.mktemp("kto_dist"), TIMEOUT_S)


def test_ddp_kl_is_averaged_over_ranks_and_gradients_are_the_whole_batchs(job):
    kto = make_kto()
    batch = make_batch()
    loss, metrics = kto(**batch, return_metrics=True)
    loss.backward()
    want = grads(kto)
    assert metrics["kl"] > 0
    for rank in range(WORLD):
        got = job[rank][True]
        assert torch.allclose(got["kl"], metrics["kl"], rtol=1e-6, atol=0), (rank, got["kl"], metrics["kl"])
        assert got["grads"].keys() == want.keys()
        for name in want:
            err = (got["grads"][name].double() - want[name].double()).norm() / want[name].double().norm()
            assert err <= 1e-5, (rank, name, err.item())


def test_ddp_without_sync_keeps_each_ranks_estimate(job):
    batch = make_batch()
    n = batch["seq"].shape[0]
    for rank in range(WORLD):
        mine = {k: v[rank * n // WORLD:(rank + 1) * n // WORLD] for k, v in batch.items()}
        _, metrics = make_kto(False)(**mine, return_metrics=True)
        assert torch.allclose(job[rank][False]["kl"], metrics["kl"], rtol=1e-6, atol=0)
    assert job[0][False]["kl"] > 0 and job[1][False]["kl"] == 0  # rank 1's own estimate is negative: clamped
