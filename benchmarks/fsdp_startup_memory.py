"""Peak memory per process of ``fastdpo train`` at start-up and during a checkpoint, at 1, 2 and 4
processes (``--fsdp`` from 2), CPU, gloo, each configuration in fresh processes.

    python benchmarks/fsdp_startup_memory.py [--hidden 1024 --layers 4 --vocab 128256]
                                             [--processes 1 2 4] [--checkpoint] [--resume]
                                             [--root CHECKOUT] [--dir DIR] [--out results.json]

A Hugging Face Llama of the given size (untied head; ``--intermediate``, ``--heads``) is saved
once (float32 ``model.safetensors``, in ``--dir``, reused when it is there) with test_train.py's
small tokenizer and a few counting-task records.  Each configuration is one fresh job: ``python``
for one process (today's one-process run: ``from_pretrained``, then the DPO module's frozen
copy of the policy as reference), ``torchrun --nproc-per-node N ... --fsdp`` for N processes
(empty models sharded, each process reading its slices of the file).  Every process sets the
bench's malloc (:func:`fastdpo.bench.measure.worker_heap`: resident memory follows the live
tensors) and reports:

* ``baseline``: its resident size once torch, transformers and fastdpo are imported;
* ``startup_peak``: its peak resident size (``VmHWM``) from its start to the end of
  ``fastdpo.train.run.Run(...)`` (models loaded and sharded, optimizer built, before any step);
* with ``--checkpoint``: two training steps (the first makes AdamW's state, the second starts
  with it), their peak resident size (``step_peak``: from the first step's start, ``VmHWM``
  reset by ``clear_refs``) and each one's seconds (``step_s``), then the peak resident size
  during ``save_checkpoint`` above what it held before (``VmHWM`` reset by ``clear_refs``),
  ``checkpoint_extra``, then the peak above what it held while writing the final model (``save_final``),
  ``final_extra``; and ``fastdpo export`` of the last sharded checkpoint in a fresh process
  (``export``: its peak);
* with ``--resume`` (implies ``--checkpoint``), the runs ``N-resumed``: fresh processes resuming
  each sharded checkpoint on as many processes, and ``4-resumed-on-2`` (the 4-process one on 2,
  ``--batch-size 2``): their ``startup_peak`` is the peak of resuming.

It prints a table per configuration (the largest process's numbers, MiB) and the model's size;
``--out`` writes every process's numbers as JSON.  ``--root`` runs another checkout's fastdpo (the
code before a change: its ``Run`` with the same calls).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def make_model(where: Path, hidden: int, layers: int, vocab: int, intermediate: int, heads: int) -> Path:
    """A Llama of that size, its tokenizer and records in ``where`` (kept when already there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    import test_train

    model = where / "model"
    if (model / "model.safetensors").is_file():
        return model
    tok = test_train.tokenizer()
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    with torch.device("meta"):
        m = LlamaForCausalLM(config)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m.save_pretrained(model)
    tok.save_pretrained(model)
    test_train.write_jsonl(where / "train.jsonl", test_train.records(16, seed=0))
    return model


def _worker(where: Path, fsdp: bool, checkpoint: bool, resume: str | None, batch_size: int, tag: str) -> None:
    from fastdpo.bench.measure import worker_heap

    worker_heap()
    import torch

    from fastdpo.train.config import TrainConfig
    from fastdpo.train.processes import Processes
    from fastdpo.train.run import Run

    torch.set_num_threads(1)
    baseline = _status("VmRSS")
    procs = Processes(None)
    config = TrainConfig(model=str(where / "model"), data=str(where / "train.jsonl"), out=str(where / f"out-{tag}"),
                         fsdp=fsdp, batch_size=batch_size, steps=2, max_length=16, lr=1e-3, progress=False,
                         log_every=1, gradient_checkpointing=False, resume=resume)  # fmt: skip
    start = time.perf_counter()
    run = Run(config, procs)
    row = {"tag": tag, "rank": procs.rank, "world": procs.world, "fsdp": fsdp, "resumed": resume is not None,
           "baseline": baseline, "startup_peak": _status("VmHWM"), "startup_s": time.perf_counter() - start}  # fmt: skip
    if checkpoint:
        import gc

        batches = run._epoch(0, 0)
        micro = [[next(batches)] for _ in range(2)]
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current resident size
        took = []
        for m in micro:
            start = time.perf_counter()
            run._step(m)
            took.append(time.perf_counter() - start)
        row |= {"step_peak": _status("VmHWM"), "step_s": took}

        gc.collect()
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current resident size
        start = time.perf_counter()
        run.save_checkpoint(2)
        row |= {"checkpoint_extra": _status("VmHWM") - before, "checkpoint_s": time.perf_counter() - start}
        gc.collect()
        before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        run.save_final()
        row |= {"final_extra": _status("VmHWM") - before}
    (where / "rows").mkdir(exist_ok=True)
    (where / "rows" / f"{tag}-{procs.rank}.json").write_text(json.dumps(row))
    procs.close()


def _export_worker(checkpoint: str, out: str) -> None:
    from fastdpo.bench.measure import worker_heap

    worker_heap()
    import shutil

    from fastdpo.train import export

    baseline = _status("VmRSS")
    shutil.rmtree(out, ignore_errors=True)
    export.export(checkpoint, out)
    print(json.dumps({"tag": "export", "rank": 0, "world": 1, "fsdp": False, "baseline": baseline,
                      "startup_peak": _status("VmHWM")}))  # fmt: skip


def _job(where: Path, n: int, tag: str, root: Path, timeout: float, *, checkpoint: bool = False,
         resume: Path | None = None, batch_size: int = 1) -> list[dict]:  # fmt: skip
    """One configuration in fresh processes (``python`` for one, ``torchrun`` for more, with
    ``--fsdp``): every process's row."""
    import shutil

    shutil.rmtree(where / f"out-{tag}", ignore_errors=True)
    args = [__file__, "--worker", str(where), "--tag", tag, "--batch-size", str(batch_size)]
    args += (["--fsdp"] if n > 1 else []) + (["--checkpoint"] if checkpoint else [])
    args += ["--resume-from", str(resume)] if resume is not None else []
    cmd = [sys.executable, *args] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{tag} ({n} process(es)) failed:\n{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted((where / "rows").glob(f"{tag}-*.json"))]


def measure(where: Path, processes: list[int], checkpoint: bool, resume: bool = False, root: Path = ROOT,
            timeout: float = 1800, export: bool = True) -> list[dict]:  # fmt: skip
    """Each configuration in fresh processes (``root``: the checkout whose fastdpo runs); every
    process's row.  ``resume``: then each sharded checkpoint resumed on as many processes, and
    the 4-process one on 2; ``export`` (with a checkpoint): ``fastdpo export`` of the last."""
    import shutil

    shutil.rmtree(where / "rows", ignore_errors=True)
    rows = []
    for n in processes:
        rows += _job(where, n, str(n), root, timeout, checkpoint=checkpoint or resume)
    for n in [n for n in processes if n > 1] if resume else []:
        rows += _job(where, n, f"{n}-resumed", root, timeout, resume=where / f"out-{n}" / "checkpoint-2")
    if resume and 4 in processes:
        rows += _job(where, 2, "4-resumed-on-2", root, timeout, resume=where / "out-4" / "checkpoint-2", batch_size=2)
    sharded = [n for n in processes if n > 1]
    if (checkpoint or resume) and sharded and export:  # fastdpo export of the last sharded checkpoint, in one process
        cmd = [sys.executable, __file__, "--export", str(where / f"out-{sharded[-1]}" / "checkpoint-2"),
               str(where / "exported")]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"export failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict], model_bytes: int) -> str:
    lines = [(f"model: {model_bytes / MIB:.0f} MiB of weights (float32); MiB per process (the largest of each run; "
              f"checkpoint: process 0 / the largest other)"),
             ("| run | processes | baseline | start-up peak | peak - baseline | vs 1 process | checkpoint extra "
              "| final model extra | step peak | vs 1 process |"),
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    one = max((r["startup_peak"] for r in rows if r["tag"] == "1"), default=None)
    one_step = max((r["step_peak"] for r in rows if r["tag"] == "1" and "step_peak" in r), default=None)
    for tag in dict.fromkeys(r["tag"] for r in rows):
        mine = [r for r in rows if r["tag"] == tag]
        peak, base = max(r["startup_peak"] for r in mine), max(r["baseline"] for r in mine)
        zero = [r["checkpoint_extra"] for r in mine if "checkpoint_extra" in r and r["rank"] == 0]
        others = [r["checkpoint_extra"] for r in mine if "checkpoint_extra" in r and r["rank"] > 0]
        extra = "-" if not zero else f"{zero[0] / MIB:.0f}" + (f" / {max(others) / MIB:.0f}" if others else "")
        final = max((r["final_extra"] for r in mine if "final_extra" in r), default=None)
        final = "-" if final is None else f"{final / MIB:.0f}"
        ratio = f"{peak / one:.2f}x" if one else "-"
        step = max((r["step_peak"] for r in mine if "step_peak" in r), default=None)
        step_ratio = f"{step / one_step:.2f}x" if step and one_step else "-"
        step = "-" if step is None else f"{step / MIB:.0f}"
        lines.append(f"| {tag} | {mine[0]['world']}{' (--fsdp)' if mine[0]['fsdp'] else ''} | {base / MIB:.0f} | "
                     f"{peak / MIB:.0f} | {(peak - base) / MIB:.0f} | {ratio} | {extra} | {final} | {step} | "
                     f"{step_ratio} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--checkpoint", action="store_true", help="also one step and a checkpoint")
    p.add_argument("--resume", action="store_true", help="also resume each sharded checkpoint (and 4 on 2)")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose fastdpo runs (default: this one)")
    p.add_argument("--dir", help="where the model is saved (default: a temporary directory)")
    p.add_argument("--out", help="every process's numbers as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--resume-from", dest="resume_from", help=argparse.SUPPRESS)
    p.add_argument("--export", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.export:
        _export_worker(*args.export)
        return 0
    if args.worker:
        _worker(Path(args.worker), args.fsdp, args.checkpoint, args.resume_from, args.batch_size, args.tag)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(args.dir or tmp)
        where.mkdir(parents=True, exist_ok=True)
        model = make_model(where, args.hidden, args.layers, args.vocab, args.intermediate, args.heads)
        rows = measure(where, args.processes, args.checkpoint, args.resume, Path(args.root))
        print(table(rows, (model / "model.safetensors").stat().st_size))
        if args.out:
            Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
