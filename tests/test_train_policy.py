"""``fastdpo train``'s memory and precision features, as TRL 1.16's ``DPOConfig`` has them:
gradient checkpointing on by default (the same steps as without it, bitwise on the CPU),
dropout off by default (``--keep-dropout``), and ``--bf16``/``--fp16`` autocast over float32
master weights (the logged loss is the autocast forward's; weights and optimizer state stay
float32; fp16's scaler state resumes).  Checkpointing on every route is tests/test_checkpointing.py."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdpo import DPO  # noqa: E402
from fastdpo.train import command as train_command  # noqa: E402
from fastdpo.train import io as train_io  # noqa: E402
from fastdpo.train import policy as train_policy  # noqa: E402
from test_train import QUIET, _error, records, rows, save_model, tokenizer, train_cli, weights, write_jsonl  # noqa: E402

STEPS = ["--steps", 3, "--batch-size", 4, "--lr", 1e-2, "--seed", 0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records(24, seed=0))


def run_of(*options):
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    config = train_command.config_from_args(parser.parse_args(list(map(str, options))))
    procs = train_command.Processes(None)
    return train_command.Run(config, procs)


def checkpointed(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_checkpointing_is_on_by_default_and_changes_no_step(model_dir, data, tmp_path):
    assert checkpointed(run_of("--model", model_dir, "--data", data, "--out", tmp_path / "a").module.policy_model)
    off = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "b", "--no-gradient-checkpointing")
    assert not checkpointed(off.module.policy_model)
    for name, extra in (("on", []), ("off", ["--no-gradient-checkpointing"])):
        assert train_cli("--model", model_dir, "--data", data, "--out", tmp_path / name, *STEPS, *QUIET, *extra) == 0
    on, off = rows(tmp_path / "on"), rows(tmp_path / "off")
    assert len(on) == 3 and [r["loss"] for r in on] == [r["loss"] for r in off]
    assert on == off
    a, b = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpointing_with_lora_and_packing(model_dir, data, tmp_path):
    for name, extra in (("on", []), ("off", ["--no-gradient-checkpointing"])):
        assert train_cli("--model", model_dir, "--data", data, "--out", tmp_path / name, "--lora", 4,
                         "--packing", "pair", *STEPS, *QUIET, *extra) == 0  # fmt: skip
    assert rows(tmp_path / "on") == rows(tmp_path / "off")


def save_gpt2(path, dropout: float):
    tok = tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def dropouts(model) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]


def test_dropout_off_by_default_as_trl(data, tmp_path):
    model = save_gpt2(tmp_path / "gpt2", dropout=0.2)
    run = run_of("--model", model, "--data", data, "--out", tmp_path / "a")
    assert dropouts(run.module.policy_model) and set(dropouts(run.module.policy_model)) == {0.0}
    assert set(dropouts(run.module.ref_model)) == {0.0}
    kept = run_of("--model", model, "--data", data, "--out", tmp_path / "b", "--keep-dropout")
    assert set(dropouts(kept.module.policy_model)) == {0.2}


def test_attention_dropout_as_a_config_float_is_said(data, tmp_path, capsys):
    model = save_model(tmp_path / "llama-dropout", dropout=0.1)
    capsys.readouterr()
    assert train_cli("--model", model, "--data", data, "--out", tmp_path / "out", "--steps", 1, *QUIET) == 0
    assert "attention_dropout stays on (LlamaAttention 0.1)" in capsys.readouterr().err


def first_batch_metrics_under(model_dir, data, dtype, where) -> dict:
    """The first step's metrics by hand: the run's first batch through fastdpo.DPO under autocast."""
    run = run_of("--model", model_dir, "--data", data, "--out", where, "--batch-size", 4, "--seed", 0)
    indices, batch = next(run._epoch(0, 0))
    dpo = DPO(transformers.AutoModelForCausalLM.from_pretrained(model_dir), logprob_reduction="sum",
              mask_alignment="target")  # fmt: skip
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        _, metrics = dpo(**{k: batch[k] for k in ("preferred_seq", "unpreferred_seq", "prompt_mask",
                                                  "preferred_seq_mask", "unpreferred_seq_mask")}, return_metrics=True)
    return {k: v.item() for k, v in metrics.items()}


@pytest.mark.parametrize("flag, dtype", [("--bf16", torch.bfloat16), ("--fp16", torch.float16)])
def test_mixed_precision_autocasts_over_float32_master_weights(flag, dtype, model_dir, data, tmp_path):
    run = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "probe", flag)
    assert run.precision.dtype == dtype
    assert all(p.dtype == torch.float32 for p in run.module.policy_model.parameters())
    out = tmp_path / "out"
    assert train_cli("--model", model_dir, "--data", data, "--out", out, *STEPS, "--save-every", 2, *QUIET, flag) == 0
    assert train_cli("--model", model_dir, "--data", data, "--out", tmp_path / "fp32", *STEPS, *QUIET) == 0
    mixed, full = rows(out), rows(tmp_path / "fp32")
    # step 1's scores are the autocast forward's (the same as by hand), not float32's
    assert mixed[0]["logps/chosen"] != full[0]["logps/chosen"]
    assert mixed[0]["logps/chosen"] == pytest.approx(full[0]["logps/chosen"], rel=2e-2)
    assert all(abs(m["loss"] - f["loss"]) < 0.05 for m, f in zip(mixed, full))
    trained = weights(out)
    assert all(t.dtype == torch.float32 for t in trained.values())
    state = torch.load(out / "checkpoint-2" / train_io.STATE_FILE, weights_only=False)
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert (state["scaler"] is not None) == (flag == "--fp16")
    if flag == "--fp16":
        assert state["scaler"]["scale"] > 0
    # resumed from step 2, the run ends where the uninterrupted one did
    again = tmp_path / "again"
    assert train_cli("--model", model_dir, "--data", data, "--out", again, *STEPS, *QUIET, flag, "--resume",
                     out / "checkpoint-2") == 0  # fmt: skip
    assert rows(again)[-1] == mixed[-1]
    assert all(torch.equal(weights(again)[k], trained[k]) for k in trained)


def test_the_logged_scores_are_the_autocast_forwards(model_dir, data, tmp_path):
    out = tmp_path / "out"
    assert train_cli("--model", model_dir, "--data", data, "--out", out, "--steps", 1, "--batch-size", 4,
                     "--seed", 0, "--bf16", *QUIET) == 0  # fmt: skip
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    by_hand = first_batch_metrics_under(model_dir, data, torch.bfloat16, tmp_path / "a")
    float32 = first_batch_metrics_under(model_dir, data, None, tmp_path / "b")
    for key in ("logps/chosen", "logps/rejected"):
        assert first[key] == pytest.approx(by_hand[key], rel=1e-6) and first[key] != float32[key]


def test_precision_and_memory_mistakes_are_one_line(model_dir, data, tmp_path, capsys):
    base = ["--model", model_dir, "--data", data, "--out", tmp_path / "out"]
    assert "not both" in _error([*base, "--bf16", "--fp16"], capsys)
    assert "float32 master weights" in _error([*base, "--bf16", "--dtype", "bfloat16"], capsys)
    assert "gradient checkpointing keeps" in _error([*base, "--activation-offloading", "--no-gradient-checkpointing"],
                                                     capsys)  # fmt: skip


def test_precision_refuses_unknown_names():
    with pytest.raises(ValueError, match="precision must be one of"):
        train_policy.Precision("int8", torch.device("cpu"))
