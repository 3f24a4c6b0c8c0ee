"""The GPU suite's sequence-parallel section: one long pair split across the machine's GPUs.

Run by ``benchmarks/gpu_suite.py`` (section ``sequence_parallel``); alone:

    python benchmarks/gpu_sequence_parallel.py [--dry-run]

A Hugging Face Llama (8 query heads, 4 key/value heads) trains on one packed pair
(``DPO(packing="pair")``): every process first runs it without sequence parallelism (the
one-process reference, on its own GPU), then with ``sequence_parallel`` over all of them (NCCL;
Ulysses, since the heads divide by 1, 2, 4 or 8 GPUs).  Each reports the loss and the
gradients' norm-relative difference from the reference (averaged over the processes, as DDP
would), the step's median time and its peak CUDA memory in both runs.  On one GPU the group has
one process: the numbers then check that the sequence-parallel path (sharded layout,
FlexAttention on the whole rows, NCCL collectives) runs on CUDA and changes nothing, not its
speed-up.  ``--dry-run``: two CPU processes with gloo, tiny sizes (what CI runs).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GPU_SIZES = dict(hidden=1024, layers=4, prompt=1024, completion=7680, repeats=3)
DRY_SIZES = dict(hidden=32, layers=1, prompt=8, completion=24, repeats=1)


def _model(hidden: int, layers: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=65536,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config).to(device)


def _pair(prompt: int, completion: int, device):
    g = torch.Generator().manual_seed(2)
    n = prompt + completion
    pref, unpref = (torch.randint(1, 32000, (1, n), generator=g) for _ in range(2))
    mask = torch.arange(n)[None] < prompt
    unpref[mask] = pref[mask]
    return dict(preferred_seq=pref.to(device), unpreferred_seq=unpref.to(device), prompt_mask=mask.to(device))


def _run(group, sizes: dict, device) -> dict:
    from fastdpo import DPO

    model = _model(sizes["hidden"], sizes["layers"], device)
    dpo = DPO(model, packing="pair", sequence_parallel=group, logprob_reduction="sum", mask_alignment="target")
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(device) * 0.01)
    batch = _pair(sizes["prompt"], sizes["completion"], device)
    times, loss = [], None
    for i in range(sizes["repeats"] + 1):  # the first: warm-up (compilation, first-call checks)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        loss = dpo(**batch)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(loss=loss.item(), grads=grads, ms=1e3 * statistics.median(times), peak_mib=peak)


def _rank(rank: int, world: int, port: int, sizes: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    one = _run(None, sizes, device)
    split = _run(dist.group.WORLD, sizes, device)
    grads = split["grads"]
    dist.all_reduce(grads)
    grads /= world
    result = dict(rank=rank, world=world, loss_one=one["loss"], loss_split=split["loss"],
                  loss_err=abs(split["loss"] - one["loss"]) / abs(one["loss"]),
                  grad_err=((grads - one["grads"]).norm() / one["grads"].norm()).item(),
                  ms_one=one["ms"], ms_split=split["ms"], peak_one=one["peak_mib"], peak_split=split["peak_mib"])
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def measure(dry_run: bool) -> list[dict]:
    """Every process's result (see the module docstring)."""
    from benchmarks.fsdp_memory import _free_port

    world = 2 if dry_run or not torch.cuda.is_available() else min(torch.cuda.device_count(), 8)
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, _free_port(), sizes, out), nprocs=world, join=True, start_method="spawn")
        return [torch.load(Path(out, f"rank{r}.pt")) for r in range(world)]


def section(suite) -> None:
    """The suite's rows: the parity (loss and gradients against one process) and the timing."""
    ranks = measure(suite.dry_run)
    r0, world = ranks[0], ranks[0]["world"]
    err = max(max(r["loss_err"], r["grad_err"]) for r in ranks)
    suite.add("sequence_parallel", f"parity, {world} process(es)", "pass" if err <= 1e-4 else "fail", err=err,
              bound=1e-4, detail=f"loss {r0['loss_split']:.6g} vs one process {r0['loss_one']:.6g}")
    peak = max((r["peak_split"] or 0) for r in ranks) or None
    suite.add("sequence_parallel", f"step, {world} process(es)", "ok", ms=r0["ms_split"], peak_mib=peak,
              vs_fastdpo=r0["ms_one"] / r0["ms_split"],
              detail=f"one process: {r0['ms_one']:.0f} ms, peak {r0['peak_one'] or 0:.0f} MiB")


if __name__ == "__main__":
    for r in measure("--dry-run" in sys.argv):
        print({k: v for k, v in r.items()})
