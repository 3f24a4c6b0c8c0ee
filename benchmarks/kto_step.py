"""A KTO training step against a DPO (sigmoid) step on the same sequences: time and peak memory.

    python benchmarks/kto_step.py [--size medium] [--repeats 5] [--warmup 1] [--no-memory]

The bench's model and batch (:mod:`fastdpo.bench.inputs`, preset ``--size``): B pairs make 2B
sequences.  DPO scores them as pairs; KTO scores the same 2B sequences unpaired (the chosen
ones desirable, the rejected ones undesirable), so both steps run the policy with gradients on
2B sequences and the reference on 2B sequences.  Providers (forward + backward, fastdpo's
default head: fused for this model):

* ``dpo-sigmoid``: ``fastdpo.DPO``, the pair op;
* ``kto``: ``fastdpo.KTO`` with its KL sequences (:class:`fastdpo.KTODataset`'s collate, cut
  at L tokens as TRL's ``max_length``): two more scorings without gradients, the reference's
  and the policy's, of 2B mismatched sequences;
* ``kto-given-kl``: ``fastdpo.KTO`` with ``kl=`` a precomputed estimate: the same work as
  DPO's step but on the "scores" route;
* ``apo-zero-unpaired``: ``fastdpo.KTO(loss_type="apo_zero_unpaired")``, no KL term.

Times: every provider in this process, each run back to back (``time_steps``), medians; the
whole list is timed ``--rounds`` times in turn and each provider's median taken over all its
calls.  Memory: each provider's peak RSS above what it holds before a step, each in a fresh
process (``peak_extra_bytes`` after ``worker_heap``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch

PROVIDERS = ("dpo-sigmoid", "kto", "kto-given-kl", "apo-zero-unpaired")


def build(name: str, size: str):
    """The step callable of a provider at preset ``size``."""
    from fastdpo import DPO, KTO, KTODataset
    from fastdpo.bench.config import BETA, SIZES, Config
    from fastdpo.bench.inputs import make_batch, make_models, make_step

    cfg = Config(**{k: v for k, v in SIZES[size].items() if k != "repeats"})
    bt = make_batch(cfg)
    policy, ref = make_models(cfg)
    if name == "dpo-sigmoid":
        module = DPO(policy, beta=BETA)
        module.ref_model.load_state_dict(ref.state_dict())
        return make_step(lambda: module(bt.pref, bt.unpref, **bt.dpo_kwargs), "forward+backward", module.parameters())
    loss_type = "apo_zero_unpaired" if name == "apo-zero-unpaired" else "kto"
    module = KTO(policy, beta=BETA, loss_type=loss_type)
    module.ref_model.load_state_dict(ref.state_dict())
    items = []
    for seqs, masks, label in ((bt.pref, bt.pref_mask, True), (bt.unpref, bt.unpref_mask, False)):
        for seq, real, prompt in zip(seqs, masks, bt.prompt_mask):
            p = int(prompt.sum())
            items.append({"prompt": seq[:p], "completion": seq[p:][real[p:]], "label": label})
    ds = KTODataset(items, pad_id=0, kl=name == "kto", max_length=cfg.seq_len)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    extra = {"kl": 0.05} if name == "kto-given-kl" else {}
    return make_step(lambda: module(**batch, **extra), "forward+backward", module.parameters())


def memory(name: str, size: str) -> int:
    from fastdpo.bench.measure import peak_extra_bytes, worker_heap

    worker_heap()
    return peak_extra_bytes(build(name, size), "cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # the worker: one provider's peak, printed
    args = ap.parse_args()
    if args.memory_of:
        print(memory(args.memory_of, args.size))
        return
    from fastdpo.bench.config import SIZES
    from fastdpo.bench.measure import time_steps

    torch.manual_seed(0)
    steps = {name: build(name, args.size) for name in PROVIDERS}
    times: dict[str, list[float]] = {name: [] for name in PROVIDERS}
    for r in range(args.rounds):
        order = PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]
        got, errors = time_steps({n: steps[n] for n in order}, "cpu", args.repeats, args.warmup)
        if errors:
            raise SystemExit(f"failed: {errors}")
        for n, t in got.items():
            times[n] += t
    med = {n: statistics.median(t) for n, t in times.items()}
    out = {"size": args.size, "config": SIZES[args.size], "torch": torch.__version__,
           "threads": torch.get_num_threads(), "median_s": med,
           "vs_dpo": {n: med[n] / med["dpo-sigmoid"] for n in PROVIDERS}, "calls": {n: len(t) for n, t in times.items()}}
    if not args.no_memory:
        peaks = {}
        for n in PROVIDERS:
            res = subprocess.run([sys.executable, __file__, "--size", args.size, "--memory-of", n],
                                 capture_output=True, text=True, check=True)
            peaks[n] = int(res.stdout.split()[-1])
        out["peak_extra_MiB"] = {n: b / 2**20 for n, b in peaks.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
