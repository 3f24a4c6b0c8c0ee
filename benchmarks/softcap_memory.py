"""Gemma 2's softcapped head on the CPU: what the fused head adds to a DPO step's memory,
against the logits route's.

    python benchmarks/softcap_memory.py [--batch 2 --seq-len 1024 --vocab 256000 --dim 64]
                                        [--out results.json]

A tiny Gemma 2 body (one layer, hidden size ``--dim``) with its default
``final_logit_softcapping=30`` and Gemma's 256000-token vocabulary: the head is nearly the
whole step.  Each measurement runs in a fresh subprocess, as the bench's memory workers
measure (:mod:`fastdpo.bench.measure`: peak RSS above what the model and inputs hold, one
step, no warm-up call):

* ``body`` -- the policy's and the (frozen) reference's bodies alone: forward, and backward
  from the policy's hidden states (what any route pays before its head);
* ``fused`` -- ``fastdpo.DPO(model, head="fused")``: the cap folded into the head's row fold;
* ``logits`` -- ``fastdpo.DPO(model, head="logits")``: the model's own (N, T, V) logits.

The head's share of a route is its step's peak minus the body's; the issue's goal is the
fused head adding under 5% of the logits route's (``fused_head / logits_head``).  The fused
step's loss is printed next to the logits route's (the same to float32 rounding).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

BETA = 0.1


def build(batch, seq_len, vocab, dim, seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.Gemma2Config(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=dim // 2, max_position_embeddings=seq_len,
        attn_implementation="eager",  # (Gemma 2 has no SDPA path: its attention scores are capped too)
    )
    assert config.final_logit_softcapping == 30.0  # Gemma 2's default, what this measures
    model = transformers.Gemma2ForCausalLM(config)
    g = torch.Generator().manual_seed(seed + 1)
    pref = torch.randint(3, vocab, (batch, seq_len), generator=g)
    unpref = torch.randint(3, vocab, (batch, seq_len), generator=g)
    prompt = torch.arange(seq_len)[None] < torch.randint(seq_len // 8, seq_len // 2, (batch, 1), generator=g)
    unpref[prompt] = pref[prompt]
    return model, pref, unpref, prompt


def worker(which, batch, seq_len, vocab, dim):
    """One measurement in this (fresh) process; prints a JSON line."""
    from fastdpo import DPO
    from fastdpo.bench.measure import peak_extra_bytes, worker_heap

    worker_heap()
    model, pref, unpref, prompt = build(batch, seq_len, vocab, dim)
    loss = []
    if which == "body":
        from fastdpo.modules.dpo import frozen_copy

        ref = frozen_copy(model).eval()
        src = torch.cat((pref, unpref))[:, :-1]

        def step():
            with torch.no_grad():
                ref.model(input_ids=src, use_cache=False)
            h = model.model(input_ids=src, use_cache=False).last_hidden_state
            h.backward(torch.ones_like(h))
    else:
        dpo = DPO(model, beta=BETA, head=which)
        assert dpo.route(model, "cpu").kind == ("pair" if which == "fused" else "logits")

        def step():
            out = dpo(pref, unpref, prompt_mask=prompt)
            out.backward()
            loss.append(out.item())

    seconds = []

    def timed():
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)

    peak = peak_extra_bytes(timed, "cpu", warmup=False)
    print(json.dumps(dict(which=which, seconds=seconds[0], peak_extra_mib=peak / 2**20, loss=loss[0] if loss else None)))


def measure(which, batch, seq_len, vocab, dim):
    out = subprocess.run(
        [sys.executable, __file__, "--worker", which, "--batch", str(batch), "--seq-len", str(seq_len),
         "--vocab", str(vocab), "--dim", str(dim)],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{which} failed: {out.stderr.strip().splitlines()[-3:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--worker", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.batch, args.seq_len, args.vocab, args.dim)
        return
    shape = (args.batch, args.seq_len, args.vocab, args.dim)
    rows = {w: measure(w, *shape) for w in ("body", "fused", "logits")}
    body = rows["body"]["peak_extra_mib"]
    fused_head = rows["fused"]["peak_extra_mib"] - body
    logits_head = rows["logits"]["peak_extra_mib"] - body
    logits_mib = 2 * args.batch * (args.seq_len - 1) * args.vocab * 4 / 2**20
    result = dict(
        shape=dict(batch=args.batch, seq_len=args.seq_len, vocab=args.vocab, dim=args.dim),
        one_logits_tensor_mib=logits_mib, rows=rows, fused_head_mib=fused_head, logits_head_mib=logits_head,
        fused_over_logits=fused_head / logits_head, torch=torch.__version__,
    )
    print(f"(2B, L-1, V) float32 logits: {logits_mib:.0f} MiB")
    for w, r in rows.items():
        loss = f"  loss {r['loss']:.7f}" if r["loss"] is not None else ""
        print(f"{w:7s} peak +{r['peak_extra_mib']:8.0f} MiB  {r['seconds']:6.1f} s{loss}")
    print(f"head: fused +{fused_head:.0f} MiB, logits +{logits_head:.0f} MiB: {100 * fused_head / logits_head:.1f}%")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
