"""A long-context DPO step on the CPU: fastdpo's fused head where x-transformers cannot run.

    python benchmarks/long_context.py [--batch 4 --seq-len 4096 --vocab 128000 --dim 256]
                                      [--xt-seq-lens 128,256,512] [--out results.json]

At B=4 pairs, L=4096, V=128000 the (2B, L-1, V) float32 logits alone are 16.8 GB, and
x-transformers' DPO keeps several logit-sized tensors alive: it cannot run on a 24 GiB
machine.  This script

1. runs one fastdpo DPO step (forward + backward, fused head, torch path) at that size in a
   fresh subprocess and reports its time, its peak RSS above the model and inputs, and the
   same for the model bodies alone (``return_embeddings=True``, no head), so that the head's
   own share is ``step peak - body peak``;
2. measures x-transformers' head share the same way at a few shorter lengths (same V) and
   extrapolates it linearly in L -- never running it where it would meet the OOM killer;
3. checks the accuracy of the policy's summed log-probs at full size against a float64
   computation of the same head (chunked, so that it fits).

The models use ``attn_flash=True`` (PyTorch's SDPA) so the bodies' attention does not
dominate memory at L=4096; fastdpo and x-transformers are measured on the same models.
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
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(seed)
    model = TransformerWrapper(
        num_tokens=vocab, max_seq_len=seq_len,
        attn_layers=Decoder(dim=dim, depth=2, heads=4, attn_flash=True),
    )
    g = torch.Generator().manual_seed(seed + 1)
    pref = torch.randint(0, vocab, (batch, seq_len), generator=g)
    unpref = torch.randint(0, vocab, (batch, seq_len), generator=g)
    prompt = torch.arange(seq_len)[None] < torch.randint(seq_len // 8, seq_len // 2, (batch, 1), generator=g)
    unpref[prompt] = pref[prompt]
    return model, pref, unpref, prompt


def worker(which, batch, seq_len, vocab, dim):
    """One measurement in this (fresh) process, as the bench's memory workers measure
    (fastdpo.bench.measure: the same malloc settings and peak meter; no warm-up call here, the
    step is too long to run twice); prints a JSON line."""
    from fastdpo.bench.measure import peak_extra_bytes, worker_heap

    worker_heap()
    model, pref, unpref, prompt = build(batch, seq_len, vocab, dim)
    if which == "body":
        from fastdpo.modules.dpo import frozen_copy

        ref = frozen_copy(model).eval()
        src = torch.cat((pref, unpref))[:, :-1]

        def step():
            with torch.no_grad():
                ref(src, return_embeddings=True)
            e = model(src, return_embeddings=True)
            e.backward(torch.ones_like(e))
    else:
        if which == "fastdpo":
            from fastdpo import DPO
        else:
            from x_transformers.dpo import DPO
        dpo = DPO(model, beta=BETA)

        def step():
            dpo(pref, unpref, prompt_mask=prompt).backward()

    seconds = []

    def timed():
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)

    peak = peak_extra_bytes(timed, "cpu", warmup=False)
    print(json.dumps(dict(which=which, seq_len=seq_len, seconds=seconds[0], peak_extra_mib=peak / 2**20)))


def measure(which, batch, seq_len, vocab, dim):
    out = subprocess.run(
        [sys.executable, __file__, "--worker", which, "--batch", str(batch), "--seq-len", str(seq_len),
         "--vocab", str(vocab), "--dim", str(dim)],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{which} at L={seq_len} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def accuracy(batch, seq_len, vocab, dim):
    """max relative error of the fused head's summed log-probs vs float64, at full size."""
    from fastdpo import linear_sequence_logprobs

    model, pref, unpref, prompt = build(batch, seq_len, vocab, dim)
    seq = torch.cat((pref, unpref))
    src, tgt = seq[:, :-1], seq[:, 1:]
    mask = (~prompt.repeat(2, 1))[:, :-1]
    with torch.no_grad():
        hidden = model(src, return_embeddings=True)
        w = model.to_logits.weight
        ours = linear_sequence_logprobs(hidden, w, tgt, mask).double()
        truth = torch.zeros(seq.shape[0], dtype=torch.float64)
        w64 = w.double()
        for n in range(seq.shape[0]):
            for t0 in range(0, src.shape[1], 512):
                h = hidden[n, t0 : t0 + 512].double()
                lp = (h @ w64.T).log_softmax(-1).gather(-1, tgt[n, t0 : t0 + 512, None]).squeeze(-1)
                truth[n] += (lp * mask[n, t0 : t0 + 512]).sum()
        # float32 log_softmax of the float32 product, the eager reference in the input dtype
        eager = torch.zeros(seq.shape[0], dtype=torch.float64)
        for n in range(seq.shape[0]):
            for t0 in range(0, src.shape[1], 512):
                lp = (hidden[n, t0 : t0 + 512] @ w.T).log_softmax(-1)
                lp = lp.gather(-1, tgt[n, t0 : t0 + 512, None]).squeeze(-1)
                eager[n] += (lp * mask[n, t0 : t0 + 512]).double().sum()
    rel = lambda a: ((a - truth).abs() / truth.abs()).max().item()  # noqa: E731
    return dict(fastdpo_rel_err=rel(ours), eager_float32_rel_err=rel(eager))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--xt-seq-lens", default="128,256,512")
    p.add_argument("--worker", default=None)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.batch, a.seq_len, a.vocab, a.dim)
    res = {"config": vars(a) | {"worker": None}}
    for which in ("body", "fastdpo"):
        r = measure(which, a.batch, a.seq_len, a.vocab, a.dim)
        res[which] = r
        print(f"{which:8} L={a.seq_len}: {r['seconds']:.1f} s, peak +{r['peak_extra_mib']:.0f} MiB", flush=True)
    head = res["fastdpo"]["peak_extra_mib"] - res["body"]["peak_extra_mib"]
    print(f"fastdpo head share at L={a.seq_len}: {head:.0f} MiB")
    xt = []
    for L in (int(x) for x in a.xt_seq_lens.split(",")):
        body = measure("body", a.batch, L, a.vocab, a.dim)
        full = measure("x-transformers", a.batch, L, a.vocab, a.dim)
        share = full["peak_extra_mib"] - body["peak_extra_mib"]
        xt.append((L, share))
        print(f"x-transformers L={L}: {full['seconds']:.1f} s, head share {share:.0f} MiB", flush=True)
    # least-squares line through the measured head shares, extrapolated to the full length
    n = len(xt)
    mx, my = sum(x for x, _ in xt) / n, sum(y for _, y in xt) / n
    slope = sum((x - mx) * (y - my) for x, y in xt) / sum((x - mx) ** 2 for x, _ in xt)
    predicted = my + slope * (a.seq_len - mx)
    res["x_transformers"] = dict(measured=xt, extrapolated_head_mib=predicted)
    print(f"x-transformers head share extrapolated to L={a.seq_len}: {predicted / 1024:.1f} GiB")
    if not a.skip_accuracy:
        res["accuracy"] = accuracy(a.batch, a.seq_len, a.vocab, a.dim)
        print(f"summed log-probs vs float64: fastdpo {res['accuracy']['fastdpo_rel_err']:.2e}, "
              f"eager float32 log_softmax {res['accuracy']['eager_float32_rel_err']:.2e} (max relative error)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
