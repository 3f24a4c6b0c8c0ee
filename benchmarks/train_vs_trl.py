"""``fastdpo train`` against TRL 1.16's ``DPOTrainer`` on the same model and data: wall time per
step and peak memory per process (each run a fresh process), and the longest pair each trains
in one step under a memory limit.

    python benchmarks/train_vs_trl.py [--lengths 384 2048] [--steps 4] [--runs all]
                                      [--limit-gib 8 --longest 2048 4096 8192] [--out results.json]

The model is SmolLM2-135M's architecture (a Llama: hidden 576, 30 layers, 9 heads, 3 KV heads,
tied 49152-token embedding), randomly initialized: the hub is not reachable here, and the time
and memory of a step do not depend on the weights' values.  The data is one pair a step (batch
1), each record a prompt and two completions of ``length / 2`` words of a word-level tokenizer
(one token a word), so every sequence has ``length`` tokens.

Runs (each its defaults, float32 on the CPU; :data:`RUNS`):

* ``trl``: ``trl.DPOTrainer`` with ``DPOConfig`` defaults (gradient checkpointing on, TRL's
  defaults) except ``bf16=False`` (TRL's bf16 default autocasts on the CPU too; fastdpo's runs
  are float32) and what the bench must set (steps, batch 1, max_length, no saving or reporting);
* ``fastdpo``: ``fastdpo train`` at its defaults (gradient checkpointing on, no packing);
* ``fastdpo-pair``: ``--packing pair`` (each pair's prompt run once);
* ``fastdpo-batch``: ``--packing batch`` (the batch's pairs packed into rows: no padding);
* ``fastdpo-nogc``: ``--no-gradient-checkpointing``;
* ``fastdpo-trl``: ``fastdpo.trl.DPOTrainer`` with TRL's same config (``fastdpo-trl-batch``:
  and ``packing="batch"``).

Per step: the median wall time of the steps after the first (timed around the optimizer step's
forward, backward and update: ``Run._step``, and TRL's ``training_step`` through a callback).
Peak memory: the process's peak RSS (``ru_maxrss`` of the finished child), set-up included,
with every worker's malloc set as the bench's memory workers set it
(:func:`fastdpo.bench.measure.worker_heap`: blocks of 256 KiB and more mapped alone and returned
when freed), so the resident size follows the live tensors rather than glibc's heap, whose
dynamic threshold made the default's peaks depend on the allocation sizes (one run of 8192 tokens
peaked lower than one of 6144).  The longest pair: for each run, the longest of ``--longest``
whose one-step process peaks within ``--limit-gib`` (a process passing the limit is stopped
there: it does not fit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
RUNS = ("trl", "fastdpo", "fastdpo-pair", "fastdpo-batch", "fastdpo-nogc", "fastdpo-trl", "fastdpo-trl-batch")
VOCAB = 49152


def make_model(where: Path, max_len: int) -> Path:
    """SmolLM2-135M's shape, random weights, with a word-level tokenizer of its vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB - 3)}
    words |= {"<pad>": VOCAB - 3, "</s>": VOCAB - 2, "<unk>": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max_len,
                         rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=VOCAB - 3,
                         eos_token_id=VOCAB - 2, bos_token_id=None)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(where)
    hf_tok.save_pretrained(where)
    return where


def make_records(path: Path, n: int, length: int, seed: int = 0, ragged: bool = False) -> Path:
    """``n`` records whose prompt + completion is ``length`` tokens (the EOS counted); ``ragged``:
    each prompt and completion of a length drawn uniformly from 1/8 to 1/2 of ``length`` (as
    real pairs are: the batch's rows padded to its longest)."""
    rng = random.Random(seed)
    half = length // 2

    def text(k: int) -> str:
        return " ".join(f"w{rng.randrange(VOCAB - 3)}" for _ in range(k))

    def size() -> int:
        return rng.randint(length // 8, half - 1) if ragged else half - 1

    with open(path, "w") as f:
        for _ in range(n):
            prompt = rng.randint(length // 8, half) if ragged else half
            f.write(json.dumps({"prompt": text(prompt), "chosen": " " + text(size()),
                                "rejected": " " + text(size())}) + "\n")  # fmt: skip
    return path


# ----------------------------------------------------------------------------- workers (fresh processes)


def _fastdpo_worker(model: str, data: str, out: str, length: int, steps: int, batch: int, extra: list[str]) -> dict:
    import argparse as ap

    from fastdpo.train import command, run

    times = []
    step = run.Run._step

    def timed(self, micro):
        t = time.perf_counter()
        result = step(self, micro)
        times.append(time.perf_counter() - t)
        return result

    run.Run._step = timed
    parser = ap.ArgumentParser()
    command.add_arguments(parser)
    config = command.config_from_args(parser.parse_args([
        "--model", model, "--data", data, "--out", out, "--steps", str(steps), "--batch-size", str(batch),
        "--max-length", str(length), "--no-progress", *extra]))  # fmt: skip
    procs = command.Processes(None)
    r = run.Run(config, procs)
    r.fit()
    losses = [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl")]
    return {"step_s": times, "losses": losses}


def _trl_worker(model: str, data: str, out: str, length: int, steps: int, batch: int, ours: bool,
                packing: str = "none") -> dict:
    import datasets
    from transformers import AutoTokenizer, TrainerCallback

    if ours:
        from fastdpo.trl import DPOConfig, DPOTrainer
    else:
        from trl import DPOConfig, DPOTrainer

    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    records = [json.loads(line) for line in open(data)]
    config = DPOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, max_length=length,
                       logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                       seed=0, dataloader_num_workers=0, disable_tqdm=True,
                       **({"packing": packing} if ours else {}))  # fmt: skip
    trainer = DPOTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=AutoTokenizer.from_pretrained(model), callbacks=[Timer()])  # fmt: skip
    trainer.train()
    return {"step_s": times, "losses": losses}


def worker(args) -> None:
    from fastdpo.bench.measure import worker_heap

    worker_heap()  # (the bench's malloc: blocks >= 256 KiB mapped alone, so RSS follows the live tensors)
    with tempfile.TemporaryDirectory() as out:
        if args.run.startswith("fastdpo") and not args.run.startswith("fastdpo-trl"):
            extra = {"fastdpo": [], "fastdpo-pair": ["--packing", "pair"], "fastdpo-batch": ["--packing", "batch"],
                     "fastdpo-nogc": ["--no-gradient-checkpointing"]}[args.run]  # fmt: skip
            result = _fastdpo_worker(args.model, args.data, out + "/o", args.length, args.steps, args.batch, extra)
        else:
            result = _trl_worker(args.model, args.data, out + "/o", args.length, args.steps, args.batch,
                                 args.run.startswith("fastdpo-trl"), "batch" if args.run.endswith("-batch") else "none")
    Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the bench


def _rss_mib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) // 1024
    except (OSError, StopIteration):
        return 0


def measure(run: str, model: Path, data: Path, length: int, steps: int, limit_mib: float | None = None,
            batch: int = 1) -> dict:
    """One run in a fresh process: its step times, losses and peak RSS.  With ``limit_mib`` the
    process is stopped as soon as its resident memory passes the limit (what a machine with
    that much memory would do to it, sooner): it did not fit."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", "--run", run, "--model", str(model), "--data", str(data),
               "--length", str(length), "--steps", str(steps), "--batch", str(batch), "--result", f.name]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
        t = time.perf_counter()
        err_file = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        over, sampled = None, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sampled = max(sampled, rss := _rss_mib(proc.pid))
            if limit_mib is not None and rss > limit_mib:
                over = rss
                proc.kill()
            time.sleep(0.2)
        wall = time.perf_counter() - t
        if over is not None:
            return {"run": run, "length": length, "exceeded_mib": over, "limit_mib": limit_mib, "after_s": round(wall)}
        err_file.seek(0)
        err = err_file.read()
        if os.waitstatus_to_exitcode(status) != 0:
            return {"run": run, "length": length, "error": (err.strip().splitlines() or ["?"])[-1]}
        result = json.loads(Path(f.name).read_text())
    steady = sorted(result["step_s"][1:] or result["step_s"])
    return {"run": run, "length": length, "batch": batch, "steps": steps, "wall_s": round(wall, 1),
            "step_s": round(steady[len(steady) // 2], 2), "peak_mib": usage.ru_maxrss // 1024, "sampled_mib": sampled,
            "losses": result["losses"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[384, 2048])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=1, help="pairs a step")
    p.add_argument("--ragged", action="store_true", help="prompts and completions of random lengths")
    p.add_argument("--runs", nargs="+", default=["trl", "fastdpo", "fastdpo-pair", "fastdpo-trl"])
    p.add_argument("--limit-gib", type=float, default=None, help="with --longest: the memory limit")
    p.add_argument("--longest", type=int, nargs="+", default=[], help="pair lengths to try, one step each")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if "fastdpo-trl" in args.runs:
        try:
            import fastdpo.trl  # noqa: F401
        except ImportError:
            print("fastdpo.trl is not importable here: its runs are skipped", flush=True)
            args.runs = [r for r in args.runs if r != "fastdpo-trl"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        longest = max([*args.lengths, *args.longest])
        model = make_model(tmp / "model", longest + 8)
        for length in args.lengths:
            data = make_records(tmp / f"data-{length}.jsonl", args.steps * args.batch, length, ragged=args.ragged)
            for run in args.runs:
                r = measure(run, model, data, length, args.steps, batch=args.batch) | {"ragged": args.ragged}
                results.append(r)
                print(json.dumps(r), flush=True)
        for length in args.longest:
            data = make_records(tmp / f"data-{length}.jsonl", 1, length)
            for run in args.runs:
                r = measure(run, model, data, length, 1, limit_mib=args.limit_gib * 1024)
                r["fits"] = "peak_mib" in r and r["peak_mib"] <= args.limit_gib * 1024
                results.append(r | {"probe": "longest"})
                print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "results": results}, indent=1))


if __name__ == "__main__":
    main()
