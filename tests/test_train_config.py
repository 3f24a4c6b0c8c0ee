"""``fastdpo train --config FILE.yaml``: a YAML file written the way TRL's docs write one for
``trl dpo --config`` (its field names, its ``key:\\n  value`` layout) sets the same run as the
flags it stands for; flags given on the command line win; fastdpo's own field names work too;
an unknown field is one line naming it; a field fastdpo treats differently is a warning saying
the difference."""

from __future__ import annotations

import argparse
import dataclasses
import warnings

import pytest

pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

from fastdpo.train import command as train_command  # noqa: E402
from fastdpo.train import trl_config  # noqa: E402
from fastdpo.train.config import TrainConfig  # noqa: E402
from test_train import QUIET, records, rows, save_model, train_cli, write_jsonl  # noqa: E402

TRL_STYLE = """\
# dpo_config.yaml: trl dpo --config dpo_config.yaml
model_name_or_path:
  {model}
dataset_name:
  {data}
report_to:
  none
learning_rate:
  5.0e-3
num_train_epochs: 1
max_steps: 3
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
gradient_checkpointing: true
logging_steps: 1
eval_strategy: "no"
output_dir: {out}
beta: 0.2
loss_type: [sigmoid, sft]
loss_weights: [1.0, 0.5]
max_length: 512
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: all-linear
seed: 3
"""
FLAGS = ["--lr", 5e-3, "--epochs", 1, "--steps", 3, "--batch-size", 4, "--grad-accum", 2, "--log-every", 1,
         "--beta", 0.2, "--loss-type", "sigmoid", "sft", "--loss-weights", 1.0, 0.5, "--max-length", 512,
         "--lora", 8, "--lora-alpha", 16, "--lora-target-modules", "all-linear", "--seed", 3]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records(24, seed=0))


def config_of(*argv) -> TrainConfig:
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    return train_command.config_from_args(parser.parse_args(list(map(str, argv))))


def test_a_trl_style_file_is_the_flags_it_stands_for(model_dir, data, tmp_path):
    file = tmp_path / "dpo_config.yaml"
    file.write_text(TRL_STYLE.format(model=model_dir, data=data, out=tmp_path / "by-file"))
    by_file = config_of("--config", file)
    by_flags = config_of("--model", model_dir, "--data", data, "--out", tmp_path / "by-file", *FLAGS)
    assert dataclasses.asdict(by_file) == dataclasses.asdict(by_flags)
    # and the run is the same run
    assert train_cli("--config", file, *QUIET) == 0
    assert train_cli("--model", model_dir, "--data", data, "--out", tmp_path / "by-flags", *FLAGS, *QUIET) == 0
    assert rows(tmp_path / "by-file") == rows(tmp_path / "by-flags")


def test_flags_win_over_the_file_and_own_names_work(model_dir, data, tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"model": str(model_dir), "data": str(data), "out": str(tmp_path / "o"),
                                    "beta": 0.5, "lr_scheduler": "cosine", "bf16": True, "keep_dropout": True}))
    c = config_of("--config", file, "--beta", 0.1, "--lr-scheduler", "linear")
    assert (c.beta, c.lr_scheduler, c.bf16, c.keep_dropout) == (0.1, "linear", True, True)
    # a flag given with its default value still wins over the file
    assert config_of("--config", file, "--beta", 0.1).beta == 0.1
    assert config_of("--config", file).beta == 0.5


def test_trl_names_and_their_meaning():
    t = trl_config.translate
    assert t({"disable_dropout": False}, "f") == {"keep_dropout": True}
    assert t({"precompute_ref_log_probs": True, "dataset_num_proc": 4, "save_total_limit": 2}, "f") == {
        "precompute_reference": True, "num_proc": 4, "save_total_limit": 2}
    assert t({"max_steps": -1}, "f") == {}
    assert t({"use_peft": True}, "f") == {"lora": 16}  # TRL's lora_r default
    assert t({"lora_r": 8}, "f") == {}  # without use_peft TRL trains no adapters
    assert t({"eval_strategy": "steps", "eval_steps": 5}, "f") == {"eval_every": 5}
    assert t({"lora_target_modules": "q_proj, v_proj", "use_peft": True}, "f") == {
        "lora_target_modules": ["q_proj", "v_proj"], "lora": 16}
    assert t({"desirable_weight": 1.5, "cpo_alpha": 0.0}, "f") == {"desirable_weight": 1.5, "cpo_alpha": 0.0}
    assert t({"sequence_parallel": 2, "packing": "batch"}, "f") == {"sequence_parallel": 2, "packing": "batch"}


def test_differences_are_warnings_naming_them():
    with pytest.warns(UserWarning, match="padding_free: taken as --packing batch"):
        assert trl_config.translate({"padding_free": True}, "f") == {"packing": "batch"}
    with pytest.warns(UserWarning, match="use_liger_kernel: ignored"):
        assert trl_config.translate({"use_liger_kernel": True}, "f") == {}
    with pytest.warns(UserWarning, match="eval_steps is ignored without eval_strategy"):
        assert trl_config.translate({"eval_steps": 5}, "f") == {}
    with pytest.warns(UserWarning, match="run_name is ignored"):
        trl_config.translate({"run_name": "x"}, "f")


@pytest.mark.parametrize("fields, said", [
    ({"optim": "adamw_torch_fused"}, "unknown field 'optim'"),
    ({"dataset_name": "trl-lib/ultrafeedback_binarized"}, "not a hub dataset"),
    ({"num_train_epochs": 1.5}, "whole epochs"),
    ({"warmup_ratio": 0.1}, "give warmup_steps"),
    ({"eval_strategy": "epoch"}, "eval_strategy 'epoch'"),
    ({"logging_steps": 0.1}, "fraction of the run"),
    ({"resume": "latest"}, "command line only"),
    ({"learning_rate": 1e-3, "lr": 2e-3}, "learning_rate and lr both set lr"),
    ({"parallelism_config": {"sp_size": 2}}, "parallelism_config .*takes sequence_parallel: N"),
])  # fmt: skip
def test_what_a_file_cannot_say_is_one_line(fields, said):
    with warnings.catch_warnings(), pytest.raises(ValueError, match=said) as e:
        warnings.simplefilter("ignore")
        trl_config.translate(fields, "f.yaml")
    assert "\n" not in str(e.value)


def test_file_mistakes_through_the_command(tmp_path, capsys):
    assert train_cli("--config", tmp_path / "missing.yaml") == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert train_cli("--config", tmp_path / "list.yaml") == 2
    assert "a YAML mapping" in capsys.readouterr().err
    (tmp_path / "partial.yaml").write_text("beta: 0.2\n")
    assert train_cli("--config", tmp_path / "partial.yaml") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fastdpo train: error: --model, --data, --out required (as flags, or in --config as "
                   "model_name_or_path, dataset_name, output_dir)"]
