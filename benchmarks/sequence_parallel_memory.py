"""One long pair under sequence parallelism: peak memory and step time per process, CPU, gloo.

    python benchmarks/sequence_parallel_memory.py [--prompt 512 --completion 7936 --worlds 1 2 4]
                                                  [--limit-gib G] [--out results.json]

A small Llama (Hugging Face ``LlamaForCausalLM``: hidden 64, 2 layers, 4 query heads, 2
key/value heads, vocabulary 1024; its attention, not its weights, is what a long row costs) and
one pair of ``prompt + 2 * completion`` packed tokens (16,384 by default), trained with
``DPO(packing="pair")`` in one process, and with ``sequence_parallel`` over 2 and 4 processes
(Ulysses: the 4 heads divide by both).  Each configuration is a fresh job of fresh processes
(``torch.multiprocessing``, spawn); each process sets the bench's malloc
(:func:`fastdpo.bench.measure.worker_heap`), makes a warm-up step on a short pair (first-call
checks, routes), then measures one training step on the long pair (forward and backward, both
models) as the bench's memory workers do (:func:`fastdpo.bench.measure.peak_extra_bytes`: the
peak resident size above what the process held before the step) and times it.

``--limit-gib G`` runs each configuration again with every process's data segment limited to
what it held before the step plus G GiB (``resource.setrlimit(RLIMIT_DATA)``: an allocation past
it fails, and torch raises): a one-process step that does not fit G next to N processes' steps
that do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.fsdp_memory import _free_port

MIB = 2**20


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    return LlamaForCausalLM(config)


def _pair(prompt: int, completion: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = prompt + completion
    pref, unpref = torch.randint(1, 1024, (1, n), generator=g), torch.randint(1, 1024, (1, n), generator=g)
    mask = torch.arange(n)[None] < prompt
    unpref[mask] = pref[mask]
    return dict(preferred_seq=pref, unpreferred_seq=unpref, prompt_mask=mask)


def _data_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmData:"))


def _rank(rank: int, world: int, port: int, args, limit_gib: float | None, out: str) -> None:
    from fastdpo import DPO
    from fastdpo.bench.measure import peak_extra_bytes, worker_heap

    worker_heap()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD if world > 1 else None
    dpo = DPO(_model(), packing="pair", sequence_parallel=group, logprob_reduction="sum", mask_alignment="target")
    dpo(**_pair(16, 16, seed=1)).backward()  # warm-up: first-call checks, routes
    dpo.policy_model.zero_grad(set_to_none=True)
    long = _pair(args.prompt, args.completion, seed=2)
    result: dict = {"rank": rank}
    times: list[float] = []

    def step():
        start = time.perf_counter()
        loss = dpo(**long)
        loss.backward()
        times.append(time.perf_counter() - start)
        result["loss"] = loss.item()
        dpo.policy_model.zero_grad(set_to_none=True)

    if limit_gib is not None:
        limit = _data_kib() * 1024 + int(limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    try:
        result["peak_mib"] = round(peak_extra_bytes(step, "cpu", warmup=False) / MIB)
        result["step_s"] = round(times[0], 2)
    except RuntimeError as e:  # an allocation past the limit
        result["failed"] = str(e).strip().splitlines()[0][:200]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if "failed" not in result:
        dist.destroy_process_group()
    else:
        os._exit(0)  # the other processes wait in a collective this one will never join: the job stops them


def run(world: int, args, limit_gib: float | None = None) -> dict:
    """One configuration in fresh processes: every rank's result."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_rank, args=(world, _free_port(), args, limit_gib, out), nprocs=world,
                                 join=False, start_method="spawn")
        while not ctx.join(timeout=1):
            if any(Path(out, f"rank{r}.json").exists() and "failed" in Path(out, f"rank{r}.json").read_text()
                   for r in range(world)):
                for p in ctx.processes:
                    p.kill()
                break
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)
                 if Path(out, f"rank{r}.json").exists()]
    return {"world": world, "limit_gib": limit_gib, "ranks": ranks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--completion", type=int, default=7936, help="tokens of each completion")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--limit-gib", type=float, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    tokens = args.prompt + 2 * args.completion
    rows = [run(w, args) for w in args.worlds]
    if args.limit_gib is not None:
        rows += [run(w, args, args.limit_gib) for w in args.worlds]
    one = next((r for r in rows if r["world"] == 1 and r["limit_gib"] is None), None)
    for r in rows:
        peaks = [x.get("peak_mib") for x in r["ranks"]]
        failed = [x["failed"] for x in r["ranks"] if "failed" in x]
        line = f"{r['world']} process(es), {tokens} packed tokens"
        line += f", limit {r['limit_gib']} GiB" if r["limit_gib"] is not None else ""
        if failed:
            line += f": failed ({failed[0]})"
        else:
            worst = max(peaks)
            line += f": peak per process {worst} MiB, step {max(x['step_s'] for x in r['ranks'])} s"
            if one is not None and "peak_mib" in one["ranks"][0]:
                line += f" ({worst / one['ranks'][0]['peak_mib']:.2f}x one process's)"
        print(line, flush=True)
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tokens": tokens,
                "machine": os.uname().machine, "cpus": os.cpu_count()}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
