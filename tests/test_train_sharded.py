"""``fastdpo train --fsdp`` at 2 and 4 processes (CPU, gloo), with test_train.py's tiny Llama and
counting task: models read shard by shard, sharded (DCP) checkpoints resumed on the same and on
another number of processes, and the memory a process needs.

* 4 processes: a full fine-tuning run and a LoRA run (1 pair a process a micro-batch, 2
  micro-batches a step: test_train.py's 8 pairs a step), each resumed from its step-2
  checkpoint on 4 processes (bitwise the uninterrupted run) and on 2 (``--batch-size 2``: the
  same pairs a step; within float rounding of the 4-process run's steps 3 and 4).  Every
  collective of the full run's checkpoints is recorded: none moves a floating-point tensor.
* Refused by name, before anything is read: a checkpoint without ``complete.json``, one with a
  truncated shard, one with a shard missing, and a resume whose micro-batches would take other
  pairs (``--batch-size``).
* The weights: each process's sharded read of the ``save_pretrained`` files (Llama with untied
  and tied embeddings, GPT-2) gives ``from_pretrained``'s weights, and a file whose names are
  not the model's (transformers' prefix-less format, Mixtral's experts) is read by process 0
  and broadcast, to the same weights; Mixtral's final model is written by ``save_pretrained``.
* With precomputed reference scores the reference is freed once scored.
* Start-up memory (benchmarks/fsdp_startup_memory.py, fresh processes, a 130 MiB model): the
  peak per process falls with the number of processes, by what the shards predict, and a
  checkpoint's extra memory stays far below the model's.

Two torchrun launches (4 processes, then 2: this file is the script their processes run), each
several runs in one process group."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import leave
from test_train import (
    LOGGED,
    QUIET,
    records,
    rows,
    save_model,
    tokenizer,
    torchrun,
    weights,
    write_jsonl,
)

from fastdpo.train import command as train_command
from fastdpo.train import run as train_mod
from fastdpo.train import sharded_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--fsdp", "--steps", 4, "--grad-accum", 2, "--lr", 1e-2, "--max-grad-norm", 0.3, "--eval-every", 2,
          "--save-every", 2, "--seed", 3, *QUIET]  # fmt: skip
LORA = ["--lora", 4, "--packing", "pair"]
# [name, options, kind]: kind "run", "watch" (a run whose checkpoints' collectives are recorded),
# "refused" (a run expected to stop in its set-up with a ValueError, recorded) or "dropped" (a
# run set up, not trained: whether its reference model outlived the set-up, recorded).
FOUR = [
    ["four", ["--batch-size", 1], "watch"],
    ["four-resumed", ["--batch-size", 1, "--resume", "{root}/four/checkpoint-2"], "run"],
    ["four-lora", [*LORA, "--batch-size", 1], "run"],
    ["four-lora-resumed", [*LORA, "--batch-size", 1, "--resume", "{root}/four-lora/checkpoint-2"], "run"],
]
TWO = [
    ["two-from-four", ["--batch-size", 2, "--resume", "{root}/four/checkpoint-2"], "run"],
    ["two-lora-from-four", [*LORA, "--batch-size", 2, "--resume", "{root}/four-lora/checkpoint-2"], "run"],
    ["no-marker", ["--batch-size", 2, "--resume", "{root}/broken/no-marker"], "refused"],
    ["truncated", ["--batch-size", 2, "--resume", "{root}/broken/truncated"], "refused"],
    ["missing", ["--batch-size", 2, "--resume", "{root}/broken/missing"], "refused"],
    ["batch", ["--batch-size", 1, "--resume", "{root}/four/checkpoint-2"], "refused"],
    ["precomputed", ["--batch-size", 2, "--precompute-reference"], "dropped"],
]


class _Collectives:
    """A ``TorchDispatchMode`` recording, for every collective op, its tensors' dtypes and sizes."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.seen = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if "c10d" in str(func):
                    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
                    self.seen += [(str(func), str(t.dtype), t.numel()) for t in leaves if isinstance(t, torch.Tensor)]
                return func(*args, **(kwargs or {}))

        return Mode()


def _check_loading(root: Path) -> dict:
    """Each directory's weights read into a sharded empty model: how, and the tensors that differ
    from ``from_pretrained``'s (gathered whole)."""
    from fastdpo.train import fsdp

    out = {}
    for name in ("model", "tied", "renamed", "gpt2", "mixtral"):
        model = fsdp.empty_model(str(root / name), "float32")
        names = fsdp.base_names(model)
        fsdp.shard(model, None, torch.device("cpu"))
        fsdp.materialize(model, torch.device("cpu"))
        how = fsdp.load_pretrained(model, str(root / name), names)
        whole = transformers.AutoModelForCausalLM.from_pretrained(root / name).state_dict()
        got = {k: p.full_tensor() for k, p in model.named_parameters()}
        out[name] = {"how": how, "differ": [k for k in got if not torch.equal(got[k], whole[k])], "tensors": len(got)}
        if name == "mixtral":  # the final model of a format transformers converts: save_pretrained's
            from fastdpo.train import export

            saved = root / "mixtral-final"
            export.save_sharded(saved, model, False, tokenizer(), {}, torch.distributed.get_rank() == 0)
            torch.distributed.barrier()
            again = transformers.AutoModelForCausalLM.from_pretrained(saved).state_dict()
            out["mixtral-final"] = {"fallback": export.whole_fallback(model),
                                    "differ": [k for k in whole if not torch.equal(again[k], whole[k])]}  # fmt: skip
    return out


def _reference_alive(config, procs) -> bool:
    """Whether the reference model a run with precomputed scores dropped is still alive once the
    run is set up (held by a cache, it would keep its memory)."""
    import weakref

    seen = []
    real = train_mod.Run._drop_reference

    def drop(self):
        if self.module.ref_model is not None:
            seen.append(weakref.ref(self.module.ref_model))
        real(self)

    train_mod.Run._drop_reference = drop
    try:
        run = train_mod.Run(config, procs)
    finally:
        train_mod.Run._drop_reference = real
    assert len(seen) == 1 and run.reference is not None
    return seen[0]() is not None


def _torchrun_worker(root: Path, launch: str) -> None:
    """What torchrun's processes run: the runs of ``launch`` in turn through
    ``fastdpo.train.run.Run``, in one process group."""
    import argparse

    runs = json.loads((root / f"{launch}.json").read_text())
    torch.distributed.init_process_group("gloo")
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    procs = train_command.Processes(None)
    real_save = train_mod.Run.save_checkpoint
    run = None
    for name, options, kind in runs:
        config = train_command.config_from_args(parser.parse_args(options))
        if kind == "refused":
            try:
                train_mod.Run(config, procs)
            except ValueError as e:
                if procs.main:
                    (root / f"{name}.refused").write_text(str(e))
            continue
        if kind == "dropped":
            alive = _reference_alive(config, procs)  # (the run makes its --out)
            (root / name / f"alive-{procs.rank}.json").write_text(json.dumps(alive))
            continue
        run = train_mod.Run(config, procs)
        if kind == "watch":
            seen = []

            def watched(self, step, seen=seen):
                with _Collectives() as mode:
                    real_save(self, step)
                seen += mode.seen

            train_mod.Run.save_checkpoint = watched
        try:
            run.fit()
        finally:
            train_mod.Run.save_checkpoint = real_save
        if kind == "watch":
            (root / name / f"collectives-{procs.rank}.json").write_text(json.dumps(seen))
            trained = {k: p.full_tensor() for k, p in run.module.policy_model.named_parameters()}
            if procs.main:
                torch.save(trained, root / name / "trained.pt")
    if launch == "two":
        found = _check_loading(root)
        if procs.main:
            (root / "loading.json").write_text(json.dumps(found))
    # The sharded models (cycles, through FSDP2's hooks) freed while the process group lives: 3
    # of about 110 launches of the 4-process runs without this aborted at exit, every run done
    # (tests/helpers.leave).
    run = trained = None
    leave(procs)


def _broken_copies(root: Path) -> None:
    """Three damaged copies of the 4-process run's checkpoint at step 2."""
    src = root / "four" / "checkpoint-2"
    for name in ("no-marker", "truncated", "missing"):
        shutil.copytree(src, root / "broken" / name)
    (root / "broken" / "no-marker" / "complete.json").unlink()
    shard = root / "broken" / "truncated" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (root / "broken" / "missing" / "__3_0.distcp").unlink()


def _models(root: Path) -> None:
    """test_train's model, a tied twin, and the tied twin saved without the ``model.`` prefix
    (transformers' base-model format: from_pretrained reads it, its names are not the model's)."""
    from safetensors.torch import load_file, save_file

    save_model(root / "model")
    tied = save_model(root / "tied")
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    state = load_file(tied / "model.safetensors")
    state.pop("lm_head.weight")
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    shutil.copytree(tied, root / "renamed")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, root / "renamed" / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    torch.manual_seed(0)  # another family (Conv1D layers, other names) and one whose experts transformers fuses on load
    small = {"vocab_size": 300, "num_hidden_layers": 2, "num_attention_heads": 4}
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**small, n_embd=32, n_positions=64)).save_pretrained(root / "gpt2")
    transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **small, hidden_size=32, intermediate_size=32, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
    )).save_pretrained(root / "mixtral")  # fmt: skip


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    _models(root)
    write_jsonl(root / "train.jsonl", records(32, seed=5))
    write_jsonl(root / "eval.jsonl", records(5, seed=6))
    common = ["--model", root / "model", "--data", root / "train.jsonl", "--eval", root / "eval.jsonl", *COMMON]
    for launch, runs, nproc in (("four", FOUR, 4), ("two", TWO, 2)):
        resolved = [[name, [str(a).format(root=root) for a in (*common, *options, "--out", root / name)], kind]
                    for name, options, kind in runs]  # fmt: skip
        (root / f"{launch}.json").write_text(json.dumps(resolved))
        done = torchrun(__file__, root, launch, nproc=nproc, timeout=420)
        (root / f"{launch}.stdout").write_text(done.stdout)
        (root / f"{launch}.stderr").write_text(done.stderr)
        assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if line.startswith("[rank"))[-3000:]
        if launch == "four":
            _broken_copies(root)
    return root


def test_resume_on_the_same_processes_is_bitwise(sharded_runs):
    """4 processes, resumed from the step-2 checkpoint (each process reading its shards of the
    weights, the optimizer's state and its RNG states): the uninterrupted run's weights and
    metrics, bit for bit, full and LoRA."""
    root = sharded_runs
    assert (root / "four.stdout").read_text().count("on 4 process(es)") == len(FOUR)
    for whole, resumed in (("four", "four-resumed"), ("four-lora", "four-lora-resumed")):
        w, r = weights(root / whole), weights(root / resumed)
        assert w.keys() == r.keys() and w
        assert [k for k in w if not torch.equal(w[k], r[k])] == [], (whole, resumed)
        assert rows(root / resumed) == rows(root / whole)
    start = weights(root / "model")
    assert min((weights(root / "four")[k] - start[k]).abs().max().item() for k in start) > 1e-2  # it trained


def test_resume_on_fewer_processes_continues_the_run(sharded_runs):
    """The 4-process checkpoint at step 2 resumed on 2 processes of twice the batch (DCP
    reshards the weights and the optimizer's state): steps 3 and 4 log what the 4-process run
    logged, and end with its weights, within float rounding (as test_train.py's FSDP runs
    against one process: measured within 1e-6 relative on the metrics)."""
    root = sharded_runs
    said = (root / "two.stdout").read_text()
    assert said.count("resumed at step 2") == 2 and said.count("on 2 process(es)") == 2
    for four, two in (("four", "two-from-four"), ("four-lora", "two-lora-from-four")):
        r4, r2 = rows(root / four), rows(root / two)
        assert [(r["step"], r["split"], r["pairs"]) for r in r2] == [(r["step"], r["split"], r["pairs"]) for r in r4]
        assert [r["pairs"] for r in r4] == [8, 8, 5, 8, 8, 5]
        assert r2[:3] == r4[:3]  # (steps 1, 2 and their evaluation: the checkpoint's metrics.jsonl)
        for a, b in zip(r4[3:], r2[3:]):
            for k in (*LOGGED, "grad_norm") if a["split"] == "train" else LOGGED:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (two, a["step"], a["split"], k)
        w4, w2 = weights(root / four), weights(root / two)
        assert w4.keys() == w2.keys() and w4
        # test_train.py's bound for FSDP against DDP, 0.5% of a step (lr 1e-2): other shards sum in
        # another order (measured 6e-8); a resume that lost the optimizer's state or a step is off by
        # a step's size, 200 times the bound
        for k in w4:
            torch.testing.assert_close(w2[k], w4[k], rtol=0, atol=5e-5, msg=lambda m: f"{two}: {k}: {m}")
    # the resumed run moved the weights on from the checkpoint's (by about two steps)
    at_2 = root / "four" / "checkpoint-2"
    saved = {k: sharded_checkpoint.read_tensor(at_2, k, *spec) for k, spec in sharded_checkpoint.tensor_names(at_2).items()}
    final = weights(root / "two-from-four")
    assert min((final[k] - saved[k]).abs().max().item() for k in final) > 1e-3


def test_incomplete_checkpoints_are_refused_by_name(sharded_runs, tmp_path, capsys):
    """Before reading anything: no complete.json, a shard shorter than complete.json says, a
    shard missing; and a resume on other processes whose micro-batches would take other pairs.
    ``fastdpo export`` refuses the same way."""
    from fastdpo import cli

    root = sharded_runs
    said = {name: (root / f"{name}.refused").read_text() for name in ("no-marker", "truncated", "missing", "batch")}
    assert said["no-marker"] == (f"--resume {root}/broken/no-marker: an incomplete checkpoint (no complete.json: it "
                                 f"was not finished); give an earlier checkpoint")  # fmt: skip
    size = (root / "four" / "checkpoint-2" / "__1_0.distcp").stat().st_size
    assert said["truncated"] == (f"--resume {root}/broken/truncated: an incomplete checkpoint (__1_0.distcp has "
                                 f"{size // 2} bytes, complete.json says {size})")  # fmt: skip
    assert said["missing"] == f"--resume {root}/broken/missing: an incomplete checkpoint (__3_0.distcp is missing)"
    assert said["batch"] == (f"--resume {root}/four/checkpoint-2: its micro-batches were 4 pairs (4 data shards of "
                             f"--batch-size 1); on 2 data shards pass --batch-size 2")  # fmt: skip
    assert not (root / "truncated").exists()  # (refused before the run wrote anything)
    for name in ("no-marker", "truncated", "missing"):
        assert cli.main(["export", str(root / "broken" / name), str(tmp_path / name)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == "fastdpo export: error: " + said[name].replace("--resume", "fastdpo export", 1)
        assert not (tmp_path / name).exists() or not any((tmp_path / name).iterdir())
    # the latest complete checkpoint is what --resume alone takes; an unfinished one is passed over
    out = tmp_path / "out"
    shutil.copytree(root / "four" / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(root / "broken" / "no-marker", out / "checkpoint-4")
    from fastdpo.train import io as train_io

    assert train_io.latest_checkpoint(out) == out / "checkpoint-2"
    sharded_checkpoint.check_complete(out / "checkpoint-2")


def test_checkpoints_move_no_weights_between_processes(sharded_runs):
    """Each process writes its own shards: during the 4-process run's checkpoints, the
    collectives carry only DCP's plans and metadata (pickled bytes, their sizes) and a barrier,
    never a floating-point tensor of the model or the optimizer's state."""
    root = sharded_runs
    for rank in range(4):
        seen = json.loads((root / "four" / f"collectives-{rank}.json").read_text())
        assert seen, "the recording saw no collective"
        floats = [s for s in seen if s[1].startswith(("torch.float", "torch.bfloat"))]
        assert floats == [], floats[:5]
    # what the checkpoint holds, written in parallel: one file a process, the whole model in them
    trained = torch.load(root / "four" / "trained.pt", weights_only=True)
    assert sorted(sharded_checkpoint.tensor_names(root / "four" / "checkpoint-4")) == sorted(trained)
    assert len(list((root / "four" / "checkpoint-4").glob("*.distcp"))) == 4


def test_each_process_reads_its_shards_of_the_weights(sharded_runs):
    """``fsdp.load_pretrained`` on 2 processes gives ``from_pretrained``'s weights, bit for bit:
    a sharded read of untied and tied (one tensor, read once) embeddings and of GPT-2 (another
    family's names and layers), and process 0's broadcast for files whose names are not the
    model's (a prefix-less file; Mixtral, whose experts transformers fuses on load).  Mixtral's
    final model, whose format transformers converts back on save, is written by
    ``save_pretrained`` from the gathered weights and reads back as ``from_pretrained``'s."""
    found = json.loads((sharded_runs / "loading.json").read_text())
    assert found["model"] == {"how": "sharded read", "differ": [], "tensors": 21}
    assert found["tied"] == {"how": "sharded read", "differ": [], "tensors": 20}
    assert found["renamed"] == {"how": "broadcast from process 0", "differ": [], "tensors": 20}
    assert found["gpt2"] == {"how": "sharded read", "differ": [], "tensors": 28}
    assert found["mixtral"] == {"how": "broadcast from process 0", "differ": [], "tensors": 21}
    assert found["mixtral-final"] == {"fallback": True, "differ": []}


def test_precomputed_scores_free_the_reference(sharded_runs, tmp_path):
    """With ``--precompute-reference`` the reference model is scored, then freed: nothing (the
    module's route cache, the Hugging Face hooks' registry) keeps it, sharded (2 processes) or
    whole (one process, in this one)."""
    root = sharded_runs
    assert [json.loads((root / "precomputed" / f"alive-{r}.json").read_text()) for r in (0, 1)] == [False, False]
    import argparse

    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    options = ["--model", root / "model", "--data", root / "train.jsonl", "--out", tmp_path / "one",
               "--precompute-reference", "--batch-size", 4, *QUIET]  # fmt: skip
    config = train_command.config_from_args(parser.parse_args(list(map(str, options))))
    assert _reference_alive(config, train_command.Processes(None)) is False


def test_weights_written_a_tensor_at_a_time_load_with_from_pretrained(tmp_path):
    """``export.write_safetensors`` (the final model's and ``fastdpo export``'s writer): one
    ``model.safetensors``, or numbered files and their index past ``max_shard_bytes``, each read
    by ``from_pretrained`` as the weights given (float32 and bfloat16)."""
    from fastdpo.train import export

    for dtype in (torch.float32, torch.bfloat16):
        model = transformers.AutoModelForCausalLM.from_pretrained(save_model(tmp_path / f"src-{dtype}"), dtype=dtype)
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        for limit in (export.MAX_SHARD_BYTES, 20_000):
            out = tmp_path / f"out-{dtype}-{limit}"
            out.mkdir()
            export.write_config(model, out)
            specs = [(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
            export.write_safetensors(out, specs, iter(state.values()), max_shard_bytes=limit)
            files = sorted(p.name for p in out.glob("*.safetensors"))
            assert (files == ["model.safetensors"]) == (limit == export.MAX_SHARD_BYTES), files
            assert (out / "model.safetensors.index.json").exists() == (len(files) > 1)
            again = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
            assert [k for k in state if not (again[k].dtype == dtype and torch.equal(again[k], state[k]))] == []


def test_an_empty_model_keeps_the_directory_s_generation_config(tmp_path):
    """The model built empty reads ``generation_config.json`` as ``from_pretrained`` does (the
    final model and each checkpoint write it back), and builds the config's own without one."""
    from fastdpo.train import export, fsdp

    path = save_model(tmp_path / "model")
    transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=17).save_pretrained(path)
    empty = fsdp.empty_model(str(path), "auto")
    whole = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert empty.generation_config.to_dict() == whole.generation_config.to_dict()
    assert empty.generation_config.temperature == 0.7 and empty.generation_config.max_new_tokens == 17
    export.write_config(empty, tmp_path / "out")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "out").to_dict() == whole.generation_config.to_dict()
    (path / "generation_config.json").unlink()
    assert fsdp.empty_model(str(path), "auto").generation_config.temperature != 0.7


def test_export_of_a_format_transformers_converts_and_of_a_foreign_checkpoint(tmp_path, capsys):
    """``fastdpo export`` of a sharded checkpoint of Mixtral (its experts fused on load, unfused
    on save: written by ``save_pretrained`` from the tensors read): ``from_pretrained`` reads
    the model's weights back.  A checkpoint whose tensors are not its ``config.json``'s model's
    is refused in one line, not written with weights left uninitialized."""
    import torch.distributed.checkpoint as dcp

    from fastdpo import cli
    from fastdpo.train import export, fsdp, io

    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    model = transformers.MixtralForCausalLM(config)
    ckpt = tmp_path / "checkpoint-1"  # (as a --fsdp run writes one, in one process)
    dcp.save({"model": fsdp.model_entries(model, trainable_only=False)}, checkpoint_id=str(ckpt), no_dist=True)
    export.write_config(model, ckpt)
    tokenizer().save_pretrained(ckpt)
    (ckpt / io.CONFIG_FILE).write_text("{}")
    sharded_checkpoint.mark_complete(ckpt)
    assert cli.main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    whole = model.state_dict()
    assert again.keys() == whole.keys() and [k for k in whole if not torch.equal(again[k], whole[k])] == []
    foreign = tmp_path / "foreign"
    shutil.copytree(ckpt, foreign)
    (foreign / "config.json").write_text(json.dumps(json.loads((ckpt / "config.json").read_text()) | {"num_hidden_layers": 3}))
    sharded_checkpoint.mark_complete(foreign)
    capsys.readouterr()
    assert cli.main(["export", str(foreign), str(tmp_path / "out-foreign")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fastdpo export: error: fastdpo export {foreign}: its tensors are not its config.json's model's")
    (foreign / "config.json").write_text(json.dumps(json.loads((ckpt / "config.json").read_text()) | {"vocab_size": 301}))
    sharded_checkpoint.mark_complete(foreign)
    assert cli.main(["export", str(foreign), str(tmp_path / "out-wider")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("(2 differ, e.g. model.embed_tokens.weight)"), line


def test_startup_memory_per_process_falls_with_the_processes(tmp_path):
    """benchmarks/fsdp_startup_memory.py, a Llama of 130 MiB of float32 weights (hidden 256,
    vocabulary 64,000, untied head), each configuration in fresh processes: one process (the
    policy whole and the module's frozen copy) against 2 and 4 with ``--fsdp`` (each process its
    shards of both).  The peak per process falls as the shards predict (one process to 2:
    measured 118 MiB, the model is 130; 2 to 4: measured 64, half the model by the shards), and
    a checkpoint after one step costs each process far less than the model (measured 1 MiB,
    31 on process 0, which also draws the curves).  The peak of two steps at 4 processes is
    above the start-up's by AdamW's state (2M/4) and less than 5 head weights (T = 62.5 MiB):
    a root's gather (the embedding and the head, 2T: all-gather's output beside the gathered
    copy), the roots resharding after forward and the fused head gathering its weight itself
    (measured 4.4T; 5.65T when the policy's root stayed gathered through backward and the
    reference's gathered head through the policy's forward)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import fsdp_startup_memory as bench

    model = bench.make_model(tmp_path, hidden=256, layers=2, vocab=64000, intermediate=512, heads=4)
    size = (model / "model.safetensors").stat().st_size
    rows_ = bench.measure(tmp_path, [1, 2, 4], checkpoint=True, timeout=300, export=False)
    peak = {n: max(r["startup_peak"] for r in rows_ if r["world"] == n) for n in (1, 2, 4)}
    assert peak[1] - peak[2] > size / 2, (peak, size)
    assert peak[2] - peak[4] > size / 4, (peak, size)
    assert all(r["checkpoint_extra"] < size / 2 for r in rows_), [(r["world"], r["rank"], r["checkpoint_extra"]) for r in rows_]
    head = 64000 * 256 * 4
    step = max(r["step_peak"] for r in rows_ if r["world"] == 4)
    assert step - peak[4] - 2 * size / 4 < 5 * head, ((step - peak[4] - 2 * size / 4) / head, peak, step)


if __name__ == "__main__":  # torchrun's processes of sharded_runs
    _torchrun_worker(Path(sys.argv[1]), sys.argv[2])
