"""The head's memory under FSDP2: the fused route against the logits route, 2 CPU ranks, gloo.

    python benchmarks/fsdp_memory.py [--pairs-per-rank 4 --seq-len 1024 --vocab 32000 --dim 256]
                                     [--out fsdp_memory.json]

Each configuration runs as its own 2-process job (fresh interpreters, docs/distributed.md's
sharding recipe: x-transformers' blocks, then the root; the frozen reference's root reshards
after forward).  Each rank makes a warm-up step, then measures one training step (forward and
backward, gradients set to None before it) as the bench's memory workers measure
(:func:`fastdpo.bench.measure.peak_extra_bytes`: peak RSS above what was held before the step,
with the same malloc settings).  Three configurations:

* ``body``: the model bodies alone (the reference's hidden states under no_grad, the policy's
  with ``return_embeddings=True`` and a trivial loss on them): what any head adds to;
* ``fused``: ``DPO(head="auto")``, the fused route, the head weight gathered per model call;
* ``logits``: ``DPO(head="logits")``: the model's own head, (2B, L-1, V) logits per model;
* ``fused-16``: the fused route with 16 MiB budgets instead of the defaults: the pair-group
  budget (``fastdpo.scoring.rows.GROUP_BYTES``, 128 MiB on the CPU: how many logits a group keeps
  for its gradient) and the chunk (``CHUNK_BYTES``, 64 MiB: the logits made at a time).

The head's share is ``step - body``, per rank (the larger of the two ranks is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
MIB = 2**20


def _build(args):
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=args.vocab, max_seq_len=args.seq_len,
        attn_layers=Decoder(dim=args.dim, depth=2, heads=4, attn_flash=True),
    )
    g = torch.Generator().manual_seed(1)
    b, n = args.pairs_per_rank, args.seq_len
    pref = torch.randint(0, args.vocab, (b, n), generator=g)
    unpref = torch.randint(0, args.vocab, (b, n), generator=g)
    prompt = torch.arange(n)[None] < torch.full((b, 1), n // 4)  # prompts: a quarter
    unpref[prompt] = pref[prompt]
    return model, pref, unpref, prompt


def _shard(model, mesh, frozen: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.attn_layers.layers:
        fully_shard(layer[1], mesh=mesh)
    fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if frozen else {}))


def _rank(rank: int, port: int, which: str, args, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from fastdpo import DPO
    from fastdpo.bench.measure import peak_extra_bytes, worker_heap

    worker_heap()
    import fastdpo.scoring.rows

    if args.group_mib:
        fastdpo.scoring.rows.GROUP_BYTES = args.group_mib * MIB
    if args.chunk_mib:
        fastdpo.scoring.rows.CHUNK_BYTES = args.chunk_mib * MIB
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, pref, unpref, prompt = _build(args)
        dpo = DPO(model, head="logits" if which == "logits" else "auto")
        mesh = init_device_mesh("cpu", (WORLD,))
        _shard(dpo.policy_model, mesh, frozen=False)
        _shard(dpo.ref_model, mesh, frozen=True)
        src = torch.cat((pref, unpref))[:, :-1]

        def step():
            dpo.policy_model.zero_grad(set_to_none=True)
            if which == "body":
                with torch.no_grad():
                    dpo.ref_model.eval()
                    dpo.ref_model(src, return_embeddings=True)
                dpo.policy_model(src, return_embeddings=True).float().mean().backward()
            else:
                dpo(pref, unpref, prompt_mask=prompt).backward()

        t0 = time.perf_counter()
        peak = peak_extra_bytes(step, "cpu")  # a warm-up step, then the measured one
        seconds = (time.perf_counter() - t0) / 2
        route = dpo.route(dpo.policy_model, "cpu").kind if which != "body" else "-"
        with open(os.path.join(out_dir, f"{which}-{rank}.json"), "w") as f:
            json.dump({"peak_bytes": peak, "seconds": seconds, "route": route}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(which: str, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(_free_port(), which, args, out), nprocs=WORLD, join=True,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(out, f"{which}-{r}.json"))) for r in range(WORLD)]
    return {"peak_mib": max(r["peak_bytes"] for r in ranks) / MIB,
            "seconds": max(r["seconds"] for r in ranks), "route": ranks[0]["route"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs-per-rank", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--group-mib", type=int, default=0,
                   help="the fused route's pair-group budget (fastdpo.scoring.rows.GROUP_BYTES; default 128 on the CPU)")
    p.add_argument("--chunk-mib", type=int, default=0,
                   help="the fused route's logits chunk (fastdpo.scoring.rows.CHUNK_BYTES; default 64)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    n_rows = 2 * args.pairs_per_rank * (args.seq_len - 1)
    sizes = {
        "logits_per_model_mib": n_rows * args.vocab * 4 / MIB,
        "head_weight_mib": args.vocab * args.dim * 4 / MIB,
        "head_weight_shard_mib": args.vocab * args.dim * 4 / WORLD / MIB,
    }
    results = {which: run(which, args) for which in ("body", "fused", "logits")}
    if not (args.group_mib or args.chunk_mib):  # the fused route again with small budgets
        args.group_mib = args.chunk_mib = 16
        results["fused-16"] = run("fused", args)
        args.group_mib = args.chunk_mib = 0
    body = results["body"]["peak_mib"]
    print(f"FSDP2, {WORLD} CPU ranks (gloo), per rank: {args.pairs_per_rank} pairs, L={args.seq_len}, "
          f"V={args.vocab}, dim={args.dim}, float32, torch {torch.__version__}")
    print(f"  (2B, L-1, V) logits per model: {sizes['logits_per_model_mib']:.0f} MiB; head weight "
          f"{sizes['head_weight_mib']:.1f} MiB whole, {sizes['head_weight_shard_mib']:.1f} MiB per shard")
    print(f"  {'':9} {'route':7} {'step peak MiB':>14} {'head share MiB':>15} {'step s':>8}")
    for which, r in results.items():
        share = "-" if which == "body" else f"{r['peak_mib'] - body:.1f}"
        print(f"  {which:9} {r['route']:7} {r['peak_mib']:14.1f} {share:>15} {r['seconds']:8.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "sizes": sizes, "results": results,
                       "date": time.strftime("%Y-%m-%d")}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
