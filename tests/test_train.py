"""``fastdpo train`` end to end on the CPU: a tiny Llama (hidden 32, 2 layers) saved with a
tokenizer built here (a WordLevel model trained on the synthetic corpus by ``tokenizers``, with
EOS and pad tokens and a small chat template; nothing from the hub), and a counting task:

    prompt "count : c d e", chosen " f g" (the next letters), rejected " g f" (the same letters,
    out of order).

Telling them apart takes the successor of each letter in context; held-out pairs are fresh
draws.  The tests: it is learned (held-out reward accuracy >= 0.9); a run interrupted and
resumed ends bitwise equal to an uninterrupted one; LoRA saves adapters only; two processes
under torchrun match one process with the same global batch; each setup mistake is one line;
metrics.jsonl and the curves are written."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from helpers import leave  # noqa: E402

import fastdpo.scoring.logits_op  # noqa: E402
from fastdpo import cli  # noqa: E402
from fastdpo.train import command as train_command  # noqa: E402
from fastdpo.train import run as train_mod  # noqa: E402
from fastdpo.train.methods import PAIR_METRICS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")  # fmt: skip
QUIET = ["--no-progress", "--log-every", "1"]
LOGGED = ("loss", *PAIR_METRICS)  # what a DPO run logs
SMALL_ELEMENTS = fastdpo.scoring.logits_op.SMALL_ELEMENTS  # (as imported: tests/conftest.py patches it per test)


@contextlib.contextmanager
def as_torchrun_runs():
    """One-process runs inside compute as torchrun's processes do: the small path and one
    thread (they have no conftest, and OMP_NUM_THREADS=1), so their numbers can be compared."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastdpo.scoring.logits_op, "SMALL_ELEMENTS", SMALL_ELEMENTS)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def records(n: int, seed: int, chat: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 4)
        s = rng.randrange(0, len(LETTERS) - k - 2)
        prompt = "count : " + " ".join(LETTERS[s:s + k])
        good = " ".join(LETTERS[s + k:s + k + 2])
        bad = " ".join(LETTERS[s + k:s + k + 2][::-1])
        if chat:
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": good}],
                        "rejected": [{"role": "assistant", "content": bad}]})  # fmt: skip
        else:
            out.append({"prompt": prompt, "chosen": " " + good, "rejected": " " + bad})
    return out


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def tokenizer(eos: bool = True, pad: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["count : " + " ".join(LETTERS), "user : assistant :"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    special = {"unk_token": "<unk>"} | ({"eos_token": "</s>"} if eos else {}) | ({"pad_token": "<pad>"} if pad else {})
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_model(path: Path, *, dropout: float = 0.0, tok=None) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tok or tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, attention_dropout=dropout,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("llama") / "model")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = [p for p in path.glob("*.safetensors")]
    return load_file(file)


def train_cli(*args) -> int:
    return cli.main(["train", *map(str, args)])


def torchrun(*args, timeout: float, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node NPROC ARGS`` on the CPU,
    one thread a process.  Its own session: past ``timeout`` (a collective that one process
    never joins hangs), torchrun and its processes are all stopped, none left behind."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *map(str, args)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun stops its processes on SIGTERM
        try:
            proc.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):  # (none left)
                os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


# ----------------------------------------------------------------------------- learning


def test_train_learns_the_counting_task(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", records(256, seed=0))
    held = write_jsonl(tmp_path / "eval.jsonl", records(64, seed=1))
    out = tmp_path / "out"
    rc = train_cli("--model", model_dir, "--data", data, "--eval", held, "--out", out, "--steps", 30,
                   "--lr", 3e-3, "--batch-size", 8, "--eval-every", 10, "--seed", 0, *QUIET)  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "256 training pairs, 64 eval pairs" in text and "scoring: fused head" in text
    log = rows(out)
    train_rows = [r for r in log if r["split"] == "train"]
    evals = [r for r in log if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    assert [r["step"] for r in evals] == [10, 20, 30] and all(r["pairs"] == 64 for r in evals)
    # policy == reference at step 1: every margin is 0, no pair counts as right
    assert train_rows[0]["rewards/accuracies"] == 0.0 and train_rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4)
    final = evals[-1]
    assert final["rewards/accuracies"] >= 0.9, final
    assert final["rewards/margins"] > 0 and final["loss"] < 0.6
    # the saved model is the trained one, as from_pretrained reads it, with its tokenizer and run config
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    start = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(model.lm_head.weight, start.lm_head.weight)
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token == "<pad>"
    assert json.loads((out / "fastdpo_train.json").read_text())["lr"] == 3e-3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind", ["full", "lora-precomputed"])
def test_resume_after_an_interruption_is_bitwise_equal(kind, tmp_path, monkeypatch, capsys):
    """10 steps of 2 x 4 pairs over 3-step epochs (24 pairs): uninterrupted, against a run
    killed during step 7 after its checkpoint at step 4 (mid-epoch) and resumed with
    ``--resume``.  The model has attention dropout, so the RNG states matter."""
    model_dir = save_model(tmp_path / "model", dropout=0.1)
    data = write_jsonl(tmp_path / "train.jsonl", records(24, seed=2))
    held = write_jsonl(tmp_path / "eval.jsonl", records(6, seed=3))
    extra = ["--lora", 4, "--precompute-reference"] if kind == "lora-precomputed" else []
    common = ["--model", model_dir, "--data", data, "--eval", held, "--steps", 10, "--batch-size", 4,
              "--grad-accum", 2, "--lr", 1e-2, "--warmup-steps", 2, "--eval-every", 3, "--save-every", 4, *extra, *QUIET]  # fmt: skip
    assert train_cli(*common, "--out", tmp_path / "whole") == 0

    real_step = train_mod.Run._step
    calls = []

    def dies_at_step_7(self, micro):
        calls.append(1)
        if len(calls) == 7:
            raise Interrupted
        return real_step(self, micro)

    # a context of its own: monkeypatch.undo() would also undo conftest's scoring-path patch
    with monkeypatch.context() as patch, pytest.raises(Interrupted):
        patch.setattr(train_mod.Run, "_step", dies_at_step_7)
        train_cli(*common, "--out", tmp_path / "cut")
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-4"]
    assert max(r["step"] for r in rows(tmp_path / "cut")) == 6  # logged past the checkpoint

    torch.manual_seed(1234)  # whatever the process's RNG holds, the checkpoint's states win
    random.seed(1234)
    capsys.readouterr()
    assert train_cli(*common, "--out", tmp_path / "cut", "--resume") == 0
    assert "resumed at step 4" in capsys.readouterr().out

    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert whole.keys() == resumed.keys() and len(whole) > 0
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [k for k in whole if not torch.equal(whole[k], resumed[k])]
    # the metrics of the resumed run are the uninterrupted run's, row for row
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")
    start = weights(model_dir) if kind == "full" else None
    if start is not None:  # and it did train
        assert not all(torch.equal(start[k], whole[k]) for k in whole)

    # another learning rate is another run: refused in one line
    args = [a if a != 1e-2 else 2e-2 for a in common]
    assert train_cli(*args, "--out", tmp_path / "cut", "--resume", tmp_path / "cut" / "checkpoint-4") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "the checkpoint's run had --lr 0.01 (now 0.02)" in line


# ----------------------------------------------------------------------------- LoRA


def test_lora_saves_adapters_only(model_dir, tmp_path, capsys, monkeypatch):
    """Chat records from a ``datasets`` directory, an eval split drawn from it, no tqdm and no
    matplotlib (their fallbacks: lines, and a note instead of the PNG)."""
    datasets = pytest.importorskip("datasets")
    peft = pytest.importorskip("peft")
    datasets.Dataset.from_list(records(64, seed=4, chat=True)).save_to_disk(str(tmp_path / "ds"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "out"
    rc = train_cli("--model", model_dir, "--data", tmp_path / "ds", "--eval-fraction", 0.25, "--out", out,
                   "--lora", 8, "--steps", 6, "--batch-size", 8, "--lr", 1e-2, "--save-every", 3, "--log-every", 1)  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "48 training pairs, 16 eval pairs" in text
    assert "step 6/6: loss" in text and "eval at step 6: reward accuracy" in text
    assert "matplotlib is not installed" in text and not (out / "curves.png").exists()
    for where in (out, out / "checkpoint-3"):
        names = {p.name for p in where.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "fastdpo_train.json"} <= names
        assert not names & {"model.safetensors", "model.safetensors.index.json"}
    saved = weights(out)
    assert saved and all("lora_" in k for k in saved)
    config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"] and config["r"] == 8
    # loads back onto the base model, and the adapters changed it
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    tuned = peft.PeftModel.from_pretrained(base, out)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        with tuned.disable_adapter():
            before = tuned(input_ids=ids).logits
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after)


# ----------------------------------------------------------------------------- torchrun


@pytest.mark.small_path  # the same scoring path as the two processes (which have no conftest)
def test_torchrun_two_processes_match_one(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", records(32, seed=5))
    held = write_jsonl(tmp_path / "eval.jsonl", records(10, seed=6))
    common = ["--model", model_dir, "--data", data, "--eval", held, "--steps", 4, "--lr", 1e-2, "--eval-every", 2,
              "--save-every", 4, "--seed", 3, *QUIET]  # fmt: skip
    done = torchrun("-m", "fastdpo", "train", *common, "--batch-size", 2, "--out", tmp_path / "two", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout and done.stdout.count("fastdpo train:") == 1  # process 0 speaks
    assert train_cli(*common, "--batch-size", 4, "--out", tmp_path / "one") == 0
    # Every logged number (the steps' losses, rewards and gradient norms, the evaluations) is the
    # one process's to float rounding: the same pairs, gradients averaged over the processes.
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [(r["step"], r["split"], r["pairs"]) for r in r1] == [(r["step"], r["split"], r["pairs"]) for r in r2]
    assert [r["pairs"] for r in r1] == [4, 4, 10, 4, 4, 10]  # train rows of 4 pairs, evals of all 10
    for a, b in zip(r1, r2):
        assert a.keys() == b.keys()
        for k in (*LOGGED, "grad_norm") if a["split"] == "train" else LOGGED:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (a["step"], a["split"], k)
    # The weights after 4 AdamW steps of lr 1e-2 (each moved ~2.5e-2): measured 1e-7 apart, but
    # 1.2e-5 on the head row of one letter.  Adam divides each gradient element by its own RMS,
    # so where a row's gradients nearly cancel, rounding-level differences become relative
    # differences of its update: 1e-4 (1% of one step) bounds that, not a bug of a pair missed
    # or counted twice (which would move whole rows by a step).
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-4)
    start = weights(model_dir)
    assert min((one[k] - start[k]).abs().max().item() for k in one) > 1e-2  # every tensor moved by steps
    # every process's RNG states are in the checkpoint
    state = torch.load(tmp_path / "two" / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert len(state["rng"]) == 2


# ----------------------------------------------------------------------------- FSDP2 (--fsdp)

# Two processes of 2 pairs a micro-batch against one of 4, 2 micro-batches a step (32 pairs: one
# epoch in 4 steps), clipped at 0.3 (full fine-tuning's gradient norms are 0.31 to 0.5: clipped
# at every step; LoRA's 0.02), a checkpoint every 2 steps, and 5 eval pairs: 3 (2 batches) on
# process 0 and 2 (1 batch) on process 1, which under FSDP must run one forward more than it
# counts (each forward of a sharded model is a collective).  No dropout: one process and two
# draw different random numbers.
FSDP_COMMON = ["--steps", 4, "--grad-accum", 2, "--lr", 1e-2, "--max-grad-norm", 0.3, "--eval-every", 2,
               "--save-every", 2, "--seed", 3, *QUIET]  # fmt: skip
LORA = ["--lora", 4, "--packing", "pair"]
PRECOMPUTED = ["--precompute-reference"]
# The runs of one torchrun launch (two processes, in this order), and their one-process twins.
TWO = {
    "ddp": [],
    "fsdp": ["--fsdp"],
    "fsdp-resumed": ["--fsdp", "--resume", "{root}/fsdp/checkpoint-2"],
    "fsdp-lora": ["--fsdp", *LORA],
    "fsdp-lora-resumed": ["--fsdp", *LORA, "--resume", "{root}/fsdp-lora/checkpoint-2"],
    "fsdp-precomputed": ["--fsdp", *PRECOMPUTED],
}
ONE = {"one": [], "one-lora": LORA, "one-precomputed": PRECOMPUTED}


def _torchrun_worker(root: Path, runs: dict[str, list[str]]) -> None:
    """What torchrun's processes run for :func:`fsdp_runs` (this file as a script): each run in
    turn through ``fastdpo.train.run.Run``, in one process group (fastdpo train takes it as it
    finds it), and the weights the ``fsdp`` run's policy holds at its end, each gathered from
    its shards (``DTensor.full_tensor``), saved as ``fsdp/trained.pt``."""
    import argparse

    torch.distributed.init_process_group("gloo")
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    procs = train_command.Processes(None)
    for name, options in runs.items():
        run = train_mod.Run(train_command.config_from_args(parser.parse_args(options)), procs)
        run.fit()
        if name == "fsdp":
            trained = {k: p.full_tensor() for k, p in run.module.policy_model.named_parameters()}
            if procs.main:
                torch.save(trained, root / name / "trained.pt")
    run = trained = None  # (the sharded models freed while the group lives)
    leave(procs)


@pytest.fixture(scope="module")
def fsdp_runs(model_dir, tmp_path_factory) -> Path:
    """The runs of :data:`TWO` (one torchrun launch) and of :data:`ONE`, each in ``root/NAME``."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(root / "train.jsonl", records(32, seed=5))
    held = write_jsonl(root / "eval.jsonl", records(5, seed=6))
    common = ["--model", model_dir, "--data", data, "--eval", held, *FSDP_COMMON]
    runs = {name: [str(a).format(root=root) for a in (*common, *options, "--batch-size", 2, "--out", root / name)]
            for name, options in TWO.items()}  # fmt: skip
    (root / "runs.json").write_text(json.dumps(runs))
    done = torchrun(__file__, root, root / "runs.json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "stdout.txt").write_text(done.stdout)
    # (one thread, as the processes: LoRA's many small ops took 3x as long on 2 threads of 2 busy cores)
    with as_torchrun_runs():
        for name, options in ONE.items():
            assert train_cli(*common, *options, "--batch-size", 4, "--out", root / name) == 0
    return root


def test_fsdp_matches_one_process_and_ddp(fsdp_runs):
    """``--fsdp`` (full fine-tuning, LoRA with packed pairs, precomputed reference scores) takes,
    step by step, the pairs of one process of twice the batch, as DDP does."""
    root = fsdp_runs
    said = (root / "stdout.txt").read_text()
    assert said.count("fastdpo train:") == len(TWO) and said.count("on 2 process(es)") == len(TWO)  # process 0 speaks
    for two, one in (("fsdp", "one"), ("ddp", "one"), ("fsdp", "ddp"), ("fsdp-lora", "one-lora"),
                     ("fsdp-precomputed", "one-precomputed")):  # fmt: skip
        r1, r2 = rows(root / one), rows(root / two)
        assert [(r["step"], r["split"], r["pairs"]) for r in r2] == [(r["step"], r["split"], r["pairs"]) for r in r1]
        assert [r["pairs"] for r in r1] == [8, 8, 5, 8, 8, 5]  # 8 pairs a step; evals of all 5, none twice
        # Every logged number within float rounding, as under DDP (above): measured 1.2e-6
        # relative at most; the rewards are differences of sums of log-probs (-0.0018 from sums
        # near -2), whose rounding is absolute (4e-8).  With seeds 4 and 5 too, at most 6% of
        # the bound asserted was used.
        # One exception: the first training row with precomputed reference scores.  Its
        # policy is still the reference, scored before in other batches, so each pair's margin
        # is rounding (0 or +-1.2e-8: one float32 ulp of a log-prob times beta), and
        # rewards/accuracies (the share of pairs whose margin is > 0) is the share of rounding
        # signs (measured 0 in one process, 1/8 in two).  Its margins are still compared.
        for a, b in zip(r1, r2):
            for k in (*LOGGED, "grad_norm") if a["split"] == "train" else LOGGED:
                if k == "rewards/accuracies" and one == "one-precomputed" and (a["split"], a["step"]) == ("train", 1):
                    continue
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (two, one, a["step"], a["split"], k)
        # The weights after 4 AdamW steps of lr 1e-2 (a step moves an element by up to ~1e-2):
        # measured 8e-7 apart (full, precomputed, and FSDP against DDP), 3.8e-6 on a LoRA B
        # matrix; 7.2e-6 at most with seeds 4 and 5.  Not bitwise: FSDP reduces each
        # micro-batch's gradient (DDP the sum of both) and clips by a norm summed from the
        # shards' (with neither accumulation nor clipping, FSDP and DDP agreed bit for bit);
        # one process sums a batch of 4 in other blocks.  Adam divides each gradient element
        # by its own RMS, so where gradients nearly cancel, rounding becomes a relative error
        # of the update: 5e-5 (0.5% of a step) bounds that.  A pair missed or counted twice
        # (1/8 of a step's gradient), a micro-batch or a shard lost, moves elements by ~1e-3.
        w1, w2 = weights(root / one), weights(root / two)
        assert w1.keys() == w2.keys() and w1
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=5e-5, msg=lambda m: f"{two} vs {one}: {k}: {m}")


def test_fsdp_resume_is_bitwise_equal(fsdp_runs, model_dir):
    """A sharded run resumed from its checkpoint at step 2 (each process reading its shards of the
    weights and of the optimizer's state, and its RNG states) ends with the uninterrupted run's
    weights and metrics, bit for bit, full and LoRA."""
    root = fsdp_runs
    assert (root / "stdout.txt").read_text().count("resumed at step 2") == 2
    for whole, resumed in (("fsdp", "fsdp-resumed"), ("fsdp-lora", "fsdp-lora-resumed")):
        w, r = weights(root / whole), weights(root / resumed)
        assert w.keys() == r.keys() and w
        assert [k for k in w if not torch.equal(w[k], r[k])] == [], (whole, resumed)
        assert rows(root / resumed) == rows(root / whole)
    start = weights(model_dir)
    assert min((weights(root / "fsdp")[k] - start[k]).abs().max().item() for k in start) > 1e-2  # it trained


def test_fsdp_writes_whole_models_and_sharded_checkpoints(fsdp_runs, tmp_path, capsys):
    """What a sharded run writes: its final model a save_pretrained directory of the whole weights
    (``from_pretrained`` reads exactly what the shards held at the end; LoRA: the adapters only);
    each checkpoint DCP's files, one a process, with the optimizer's state of every parameter
    (whole shapes in DCP's metadata), no save_pretrained weights and no trainer_state.pt, and a
    complete.json listing every other file; ``fastdpo export`` makes the final model's files of
    the last checkpoint, bit for bit (a DDP checkpoint's: copied)."""
    from torch.distributed.checkpoint import FileSystemReader

    root = fsdp_runs
    trained = torch.load(root / "fsdp" / "trained.pt", weights_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "fsdp")
    loaded = model.state_dict()
    assert trained.keys() == loaded.keys()
    assert [k for k in trained if not torch.equal(trained[k], loaded[k])] == []
    for run in ("fsdp", "fsdp-lora"):
        ckpt = root / run / "checkpoint-4"
        names = {p.name for p in ckpt.iterdir()}
        assert {".metadata", "__0_0.distcp", "__1_0.distcp", "complete.json", "config.json", "tokenizer.json",
                "fastdpo_train.json", "metrics.jsonl"} <= names, names  # fmt: skip
        assert not names & {"model.safetensors", "adapter_model.safetensors", "trainer_state.pt"}
        assert set(json.loads((ckpt / "complete.json").read_text())["files"]) == names - {"complete.json"}
    meta = FileSystemReader(str(root / "fsdp" / "checkpoint-2")).read_metadata().state_dict_metadata
    for k, t in trained.items():
        assert tuple(meta[f"model.{k}"].size) == tuple(meta[f"optimizer.state.{k}.exp_avg"].size) == tuple(t.shape)
    assert {k for k in meta if k.startswith("rng.")} == {"rng.0", "rng.1"}

    exported = tmp_path / "exported"
    assert cli.main(["export", str(root / "fsdp" / "checkpoint-4"), str(exported)]) == 0
    final, again = weights(root / "fsdp"), weights(exported)
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).state_dict()
    assert [k for k in trained if not torch.equal(trained[k], reloaded[k])] == []
    assert transformers.AutoTokenizer.from_pretrained(exported).pad_token == "<pad>"

    lora = weights(root / "fsdp-lora")
    assert lora and all("lora_" in k for k in lora)
    assert not (root / "fsdp-lora" / "model.safetensors").exists()
    assert cli.main(["export", str(root / "fsdp-lora" / "checkpoint-4"), str(tmp_path / "adapters")]) == 0
    again = weights(tmp_path / "adapters")
    assert lora.keys() == again.keys() and all(torch.equal(lora[k], again[k]) for k in lora)
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == json.loads((root / "fsdp-lora" / "adapter_config.json").read_text())[
        "base_model_name_or_path"]  # fmt: skip

    assert cli.main(["export", str(root / "ddp" / "checkpoint-4"), str(tmp_path / "ddp")]) == 0
    final, again = weights(root / "ddp"), weights(tmp_path / "ddp")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert not (tmp_path / "ddp" / "trainer_state.pt").exists()
    capsys.readouterr()
    assert cli.main(["export", str(root / "fsdp"), str(tmp_path / "nothing")]) == 2  # (the run's out: no checkpoint)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fastdpo export: error: ") and "not a fastdpo train checkpoint" in line
    assert cli.main(["export", str(root / "fsdp" / "checkpoint-4"), str(exported)]) == 2  # (written above)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"{exported} is not an empty directory (give a new one)")


# ----------------------------------------------------------------------------- mistakes


def _error(args, capsys) -> str:
    assert train_cli(*args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fastdpo train: error: ")
    return lines[0]


def test_each_setup_mistake_is_one_line(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", records(8, seed=7))
    out = ["--out", tmp_path / "out"]
    assert "no such directory" in _error(["--model", tmp_path / "nope", "--data", data, *out], capsys)
    (tmp_path / "empty").mkdir()
    assert "no config.json there" in _error(["--model", tmp_path / "empty", "--data", data, *out], capsys)
    assert "--data" in _error(["--model", model_dir, "--data", tmp_path / "missing.jsonl", *out], capsys)
    assert "no such file" in _error(["--model", model_dir, "--data", tmp_path / "missing.jsonl", *out], capsys)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "count : a b", "chosen": " c d", "rejected": " d c"}\nnot json\n')
    assert ":2 is not a JSON object" in _error(["--model", model_dir, "--data", tmp_path / "bad.jsonl", *out], capsys)
    big = tokenizer()
    big.add_tokens([f"w{i}" for i in range(40)])
    save_model(tmp_path / "small", tok=tokenizer())
    big.save_pretrained(tmp_path / "small")  # a tokenizer of 73 tokens for an embedding of 33
    capsys.readouterr()
    assert "the tokenizer has 73 tokens, the model's embedding only 33" in _error(
        ["--model", tmp_path / "small", "--data", data, *out], capsys)
    bare = save_model(tmp_path / "bare", tok=tokenizer(eos=False, pad=False))
    capsys.readouterr()  # save_pretrained's progress bar
    line = _error(["--model", bare, "--data", data, *out], capsys)
    assert "neither a pad token nor an EOS token" in line
    # every prompt ("count : x y ..." is 4 to 6 tokens) fills max_length 3: nothing left to train on
    line = _error(["--model", model_dir, "--data", data, "--max-length", 3, *out], capsys)
    assert "max_length" in line
    line = _error(["--model", model_dir, "--data", data, "--eval", data, "--eval-fraction", 0.1, *out], capsys)
    assert "not both" in line
    assert "--fsdp shards the model over the processes torchrun starts" in _error(
        ["--model", model_dir, "--data", data, "--fsdp", *out], capsys)
    assert "needs an eval set" in _error(["--model", model_dir, "--data", data, "--eval-every", 5, *out], capsys)


def test_what_fsdp_refuses_and_shards(model_dir):
    """``--fsdp --packing auto`` is refused in one line (each process would decide per batch
    whether to pack, and check the model on the first batch it packs: forwards the others do not
    run); the layers sharded one by one are the decoder layers, under peft too; a model with
    none to find is refused in one line."""
    from fastdpo.train import fsdp as train_fsdp

    peft = pytest.importorskip("peft")
    with pytest.raises(ValueError, match="--fsdp with --packing auto") as e:
        train_fsdp.check(True, 2, "auto")
    assert "\n" not in str(e.value)
    for packing in ("none", "pair", "batch"):
        train_fsdp.check(True, 2, packing)
    train_fsdp.check(False, 1, "auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert train_fsdp.decoder_layers(model) == list(model.model.layers)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert train_fsdp.decoder_layers(adapted) == list(model.model.layers)
    model._no_split_modules = None
    with pytest.raises(ValueError, match="found no decoder layers to shard in LlamaForCausalLM"):
        train_fsdp.decoder_layers(model)
    assert not train_fsdp.sharded(model)


def test_a_model_without_a_fused_head_warns_in_one_line(tmp_path, capsys):
    """BERT as a causal LM: its head transforms the hidden states before the output layer, so
    the head fastdpo infers fails its first-call check, and training scores the logits."""
    tok = tokenizer()
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, is_decoder=True,
                                     pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertLMHeadModel(config).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    data = write_jsonl(tmp_path / "train.jsonl", records(8, seed=8))
    assert train_cli("--model", tmp_path / "bert", "--data", data, "--out", tmp_path / "out", "--steps", 1, *QUIET) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastdpo train: warning:")]
    assert len(warned) == 1 and "score this model's logits" in warned[0], warned


def test_a_head_known_unfusable_warns_once_and_scores_logits(model_dir, tmp_path, capsys, monkeypatch):
    """When the model's adapter says up front that its head cannot be fused, fastdpo train says
    so in one line (not DPO's warning too) and trains on the logits route."""
    from fastdpo.models import adapter_for

    class NoHead:
        def __init__(self, model):
            self.real = adapter_for(model)

        def head(self):
            return None, "its output embedding is a Sequential, not a plain nn.Linear"

        def __getattr__(self, name):
            return getattr(self.real, name)

    monkeypatch.setattr(train_mod, "adapter_for", NoHead)
    data = write_jsonl(tmp_path / "train.jsonl", records(8, seed=9))
    assert train_cli("--model", model_dir, "--data", data, "--out", tmp_path / "out", "--steps", 1, *QUIET) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line]
    assert warned == ["fastdpo train: warning: LlamaForCausalLM has no fused head (its output embedding is a Sequential, "
                      "not a plain nn.Linear): fastdpo falls back to scoring its logits, (2B, L-1, V) floats a step"]
    assert "scoring: logits (its output embedding is a Sequential" in captured.out


if __name__ == "__main__":  # torchrun's processes of fsdp_runs
    _torchrun_worker(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()))
