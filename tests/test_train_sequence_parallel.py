"""``fastdpo train --sequence-parallel N`` under torchrun, on the CPU (gloo), with test_train.py's
tiny Llama (4 heads: Ulysses over 2 processes) and counting task, packed batches.

The processes form a (dp, N) mesh: the N processes of a row read the same micro-batches (data
shard ``rank // N`` of dp) and split each packed batch's tokens; DDP (or FSDP2) over every
process averages the gradients.  So, step by step:

* 2 processes of sequence parallel 2 (dp 1) log what one process logs on the same batches,
  with DDP, ``--fsdp``, ``--method orpo`` and ``kto``, and ``--lora --packing pair``: the losses after the
  first step depend on the gradients of the ones before, so the gradients match too;
* 4 processes of dp 2 x sequence parallel 2 log what 2 processes of plain data parallelism log
  (and, with ``--fsdp --precompute-reference``, what one process logs: the reference scores and
  the eval pairs split by data shard, an eval shard of fewer batches running one uncounted);
* a run interrupted after its checkpoint and resumed ends bitwise equal to the uninterrupted one
  (attention dropout on: every process's RNG states matter);
* each refusal is one line.

Two torchrun launches (2 and 4 processes: this file is the script their processes run), each
several runs in one process group, and the one-process runs in this process."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdpo.train import command as train_command  # noqa: E402
from fastdpo.train import processes as train_processes  # noqa: E402
from fastdpo.train import run as train_mod  # noqa: E402
from helpers import leave  # noqa: E402
from test_train import (  # noqa: E402
    LOGGED, QUIET, _error, as_torchrun_runs, records, rows, save_model, torchrun, train_cli, weights, write_jsonl,
)

# 32 training pairs, 8 a step (2 micro-batches), clipped at 0.3 (full fine-tuning's gradient
# norms are 0.33 to 0.5), checkpoints at steps 2 and 4, 5 eval pairs (split 3 and 2 over two data
# shards: 2 eval batches of 2 and 1), packed batches.
COMMON = ["--steps", 4, "--grad-accum", 2, "--lr", 1e-2, "--max-grad-norm", 0.3, "--eval-every", 2, "--save-every", 2,
          "--seed", 3, "--packing", "batch", *QUIET]  # fmt: skip
SP = ["--sequence-parallel", 2]
# Each launch: [name, options, cut] in order; a cut run dies in its third step (after its
# checkpoint at step 2), and the next run resumes it in the same --out.
TWO = [
    ["sp", [*SP, "--batch-size", 4], False],
    ["sp-fsdp", [*SP, "--fsdp", "--batch-size", 4], False],
    ["dp", ["--batch-size", 2], False],
    ["sp-orpo", [*SP, "--method", "orpo", "--batch-size", 4], False],
    ["sp-lora", [*SP, "--lora", 4, "--packing", "pair", "--batch-size", 4], False],
    ["sp-kto", [*SP, "--method", "kto", "--batch-size", 4], False],
    ["whole", [*SP, "--batch-size", 4, "--model", "{root}/dropout"], False],
    ["cut", [*SP, "--batch-size", 4, "--model", "{root}/dropout"], True],
    ["cut", [*SP, "--batch-size", 4, "--model", "{root}/dropout", "--resume"], False],
]
FOUR = [
    ["dp-sp", [*SP, "--batch-size", 2], False],
    ["dp-sp-fsdp-precomputed", [*SP, "--fsdp", "--precompute-reference", "--batch-size", 2], False],
]
ONE = {"one": ["--batch-size", 4], "one-precomputed": ["--precompute-reference", "--batch-size", 4],
       "one-orpo": ["--method", "orpo", "--batch-size", 4],
       "one-lora": ["--lora", 4, "--packing", "pair", "--batch-size", 4],
       "one-kto": ["--method", "kto", "--batch-size", 4]}


class Interrupted(Exception):
    pass


def _torchrun_worker(runs: list) -> None:
    """What torchrun's processes run: each run in turn through ``fastdpo.train.run.Run``, in one
    process group (fastdpo train takes it as it finds it); a cut run is stopped at its third
    step, on every process."""
    import argparse

    torch.distributed.init_process_group("gloo")
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    procs = train_command.Processes(None)
    real_step = train_mod.Run._step
    for _name, options, cut in runs:
        run = train_mod.Run(train_command.config_from_args(parser.parse_args(options)), procs)
        if not cut:
            run.fit()
            continue
        calls = []

        def dies_at_step_3(self, micro, calls=calls):
            calls.append(1)
            if len(calls) == 3:
                raise Interrupted
            return real_step(self, micro)

        train_mod.Run._step = dies_at_step_3
        try:
            run.fit()
        except Interrupted:
            pass
        finally:
            train_mod.Run._step = real_step
    run = None
    leave(procs)  # (an abort in the interpreter's teardown would fail a launch whose runs all ended)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The models (one with attention dropout 0.1) and the data."""
    root = tmp_path_factory.mktemp("sp")
    save_model(root / "model")
    save_model(root / "dropout", dropout=0.1)
    write_jsonl(root / "train.jsonl", records(32, seed=5))
    write_jsonl(root / "eval.jsonl", records(5, seed=6))
    return root


def _common(root: Path) -> list[str]:
    return ["--model", root / "model", "--data", root / "train.jsonl", "--eval", root / "eval.jsonl", *COMMON]


def _launch(root: Path, nproc: int, runs: list) -> str:
    """One torchrun launch of ``nproc`` processes running ``runs``, each in ``root/NAME``; its
    stdout."""
    said = [[name, [str(a).format(root=root) for a in (*_common(root), *options, "--out", root / name)], cut]
            for name, options, cut in runs]  # fmt: skip
    (root / f"runs{nproc}.json").write_text(json.dumps(said))
    done = torchrun(__file__, root / f"runs{nproc}.json", nproc=nproc, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def two(root) -> str:
    return _launch(root, 2, TWO)


@pytest.fixture(scope="module")
def four(root) -> str:
    return _launch(root, 4, FOUR)


@pytest.fixture(scope="module")
def one(root) -> Path:
    """The one-process runs of :data:`ONE`: the small path and one thread, as torchrun's
    processes run (they have no conftest, and OMP_NUM_THREADS=1)."""
    with as_torchrun_runs():
        for name, options in ONE.items():
            assert train_cli(*_common(root), *options, "--out", root / name) == 0
    return root


def _same_steps(root: Path, got: str, want: str, skip_first_accuracy: bool = False, pairs: bool = True) -> None:
    """``got``'s metrics.jsonl is ``want``'s, row for row (the same steps, splits and pair counts),
    every logged number (the loss, rewards, log-probs, the method's own, the gradient norm)
    within 1e-5 relative; and the weights after 4 steps within 5e-5."""
    r1, r2 = rows(root / want), rows(root / got)
    unit = "pairs" if pairs else "completions"
    assert [(r["step"], r["split"], r[unit]) for r in r2] == [(r["step"], r["split"], r[unit]) for r in r1]
    if pairs:
        assert [r["pairs"] for r in r1] == [8, 8, 5, 8, 8, 5]  # 8 pairs a step; evals of all 5, none twice
    for a, b in zip(r1, r2):
        assert a.keys() == b.keys() and (set(LOGGED) < a.keys() if pairs else "kl" in a)
        for k in (k for k, v in a.items() if isinstance(v, float) and k not in ("epoch", "lr")):
            # (precomputed reference scores: step 1's margins are rounding, and its reward
            # accuracy the share of their signs; tests/test_train.py's FSDP test says more)
            if k == "rewards/accuracies" and skip_first_accuracy and (a["split"], a["step"]) == ("train", 1):
                continue
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (got, want, a["step"], a["split"], k)
    # Adam divides each gradient element by its own RMS, so where gradients nearly cancel,
    # rounding becomes a relative error of the update (tests/test_train.py's FSDP test): 5e-5
    # (0.5% of a step) bounds that; a pair or a token missed moves elements by ~1e-3.
    w1, w2 = weights(root / want), weights(root / got)
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=5e-5, msg=lambda m, k=k: f"{got} vs {want}: {k}: {m}")


def test_sequence_parallel_matches_one_process(two, one):
    """2 processes of sequence parallel 2 (DDP, FSDP2, ORPO, KTO, LoRA with packed pairs) against one
    process of the same batches; plain data parallelism (dp 2, half the batch a process)
    against it too."""
    root = one
    assert two.count("on 2 process(es) (data parallel 1 x sequence parallel 2)") == len(TWO) - 1  # process 0 speaks
    assert two.count("fastdpo train:") == len(TWO)
    for got, want in (("sp", "one"), ("sp-fsdp", "one"), ("dp", "one"), ("sp-orpo", "one-orpo"),
                      ("sp-lora", "one-lora")):  # fmt: skip
        _same_steps(root, got, want)
    _same_steps(root, "sp-kto", "one-kto", pairs=False)  # (its KL sequences packed and split too)
    start = weights(root / "model")
    assert min((weights(root / "sp")[k] - start[k]).abs().max().item() for k in start) > 1e-2  # it trained


def test_data_and_sequence_parallel_matches_data_parallel(two, four, one):
    """4 processes, dp 2 x sequence parallel 2, against 2 processes of dp 2 (the data sharded by
    dp rank, the metrics counted once per shard); with FSDP2 and precomputed reference scores
    against one process."""
    root = one
    assert four.count("4 steps of 8 pairs on 4 process(es) (data parallel 2 x sequence parallel 2)") == len(FOUR)
    _same_steps(root, "dp-sp", "dp")
    _same_steps(root, "dp-sp-fsdp-precomputed", "one-precomputed", skip_first_accuracy=True)
    state = torch.load(root / "dp-sp" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 4


def test_sequence_parallel_resume_is_bitwise_equal(two, root):
    """A run of sequence parallel 2 (attention dropout 0.1) stopped in its third step and
    resumed from its checkpoint at step 2 ends with the uninterrupted run's weights and
    metrics, bit for bit."""
    assert two.count("resumed at step 2") == 1
    assert sorted(p.name for p in (root / "cut").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    w, r = weights(root / "whole"), weights(root / "cut")
    assert w.keys() == r.keys() and w
    assert [k for k in w if not torch.equal(w[k], r[k])] == []
    assert rows(root / "cut") == rows(root / "whole")
    assert len(torch.load(root / "cut" / "checkpoint-2" / "trainer_state.pt", weights_only=True)["rng"]) == 2
    # the dropout drew random numbers: the same run without it logs other numbers
    assert [r["loss"] for r in rows(root / "whole")][1:] != [r["loss"] for r in rows(root / "sp")][1:]


def test_resuming_with_another_sequence_parallel_is_refused(two, one, tmp_path, capsys):
    """A checkpoint of sequence parallel 2 resumed with another N (here 1, one process) is
    refused in one line; a checkpoint written before the option existed (no such key in its
    config) resumes as sequence parallel 1."""
    root = one
    line = _error([*_common(root), "--batch-size", 4, "--out", tmp_path / "a", "--resume", root / "sp" / "checkpoint-2"],
                  capsys)  # fmt: skip
    assert "the checkpoint's run had --sequence-parallel 2 (now 1)" in line
    old = tmp_path / "old"
    shutil.copytree(root / "one" / "checkpoint-2", old)
    config = json.loads((old / "fastdpo_train.json").read_text())
    del config["sequence_parallel"]
    (old / "fastdpo_train.json").write_text(json.dumps(config))
    with as_torchrun_runs():
        assert train_cli(*_common(root), "--batch-size", 4, "--out", tmp_path / "b", "--resume", old) == 0
    assert rows(tmp_path / "b") == rows(root / "one")


def test_each_sequence_parallel_mistake_is_one_line(root, tmp_path, capsys):
    """--sequence-parallel without packing, below 1, or with processes it does not
    divide (one process here; 3 by the check itself) is refused in one line naming the flag."""
    args = [*_common(root), "--out", tmp_path / "out"]
    line = _error([*args, *SP, "--packing", "none"], capsys)
    assert "--sequence-parallel 2 splits packed rows across processes: it needs --packing batch or pair" in line
    assert "got --packing none" in line
    assert "--packing auto" in _error([*args, *SP, "--packing", "auto"], capsys)
    assert "--sequence-parallel must be an integer >= 1, got 0" in _error([*args, "--sequence-parallel", 0], capsys)
    line = _error([*args, *SP], capsys)
    assert "torchrun's WORLD_SIZE must be a multiple of it, got 1" in line
    with pytest.raises(ValueError, match="--sequence-parallel 2 .* WORLD_SIZE must be a multiple of it, got 3"):
        train_processes.check_layout(2, 3)
    train_processes.check_layout(2, 4)
    train_processes.check_layout(1, 3)
    assert train_processes.Processes(None).layout(1) == train_processes.Layout(1, 0)


if __name__ == "__main__":  # torchrun's processes
    _torchrun_worker(json.loads(Path(sys.argv[1]).read_text()))
