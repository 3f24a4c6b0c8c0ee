"""Every option on ``fastdpo train``'s command line: ``--method`` with each module's loss
options (the run's module is the one the method names, with the options given; the first
step's logged numbers are that module's on the first batch), LoRA's targets and dropout, the
learning-rate schedule, ``--save-total-limit`` and ``--num-proc``; and each option that cannot
apply refused in one line."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdpo import CPO, ORPO  # noqa: E402
from fastdpo.train import command as train_command  # noqa: E402
from fastdpo.train import io as train_io  # noqa: E402
from fastdpo.train import methods  # noqa: E402
from fastdpo.train.config import TrainConfig  # noqa: E402
from test_train import QUIET, records, rows, save_model, train_cli, write_jsonl  # noqa: E402
from test_train_policy import run_of  # noqa: E402

KEYS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records(24, seed=0))


def test_every_loss_option_of_every_method_is_a_flag_and_a_config_field():
    names = {f.name for m in methods.METHODS.values() for f in dataclasses.fields(m.options)}
    names -= set(methods.MADE_BY_THE_RUN)
    assert set(methods.LOSS_OPTIONS) == names
    assert names <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(train_command.LOSS_FLAGS) == names
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= dests


# (method, options, the module and options it must equal)
SAME_AS = [
    ("orpo", ["--beta", 0.2], ORPO, dict(beta=0.2, logprob_reduction="mean")),
    ("cpo", ["--cpo-alpha", 0.5, "--label-smoothing", 0.1], CPO, dict(cpo_alpha=0.5, label_smoothing=0.1)),
    ("cpo", ["--loss-type", "hinge", "--beta", 0.3], CPO, dict(loss_type="hinge", beta=0.3)),
    ("simpo", ["--simpo-gamma", 0.7, "--beta", 2.0], CPO, dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7,
                                                               beta=2.0)),  # fmt: skip
    ("alphapo", ["--alpha", 0.25], CPO, dict(loss_type="alphapo", alpha=0.25)),
]


@pytest.mark.parametrize("method, options, module, kwargs", SAME_AS, ids=lambda x: str(x) if isinstance(x, str) else None)
def test_the_first_step_is_the_methods_module_on_the_first_batch(method, options, module, kwargs, model_dir, data,
                                                                 tmp_path):  # fmt: skip
    out = tmp_path / "out"
    common = ["--batch-size", 4, "--seed", 0]
    assert train_cli("--model", model_dir, "--data", data, "--out", out, "--steps", 1, "--method", method, *options,
                     *common, *QUIET) == 0  # fmt: skip
    logged = rows(out)[0]
    run = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "unused", *common)
    _, batch = next(run._epoch(0, 0))
    by_hand = module(transformers.AutoModelForCausalLM.from_pretrained(model_dir), mask_alignment="target",
                     **{"logprob_reduction": "sum", **kwargs})  # fmt: skip
    with torch.no_grad():
        loss, metrics = by_hand(**{k: batch[k] for k in KEYS}, return_metrics=True)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for key in (*methods.PAIR_METRICS, *methods.METHODS[method].extra_metrics):
        if key in metrics:
            assert logged[key] == pytest.approx(metrics[key].item(), rel=1e-5, abs=1e-7), key
    assert "nll_loss" in logged and ("log_odds_ratio" in logged) == (method == "orpo")


def test_dpo_options_reach_the_module(model_dir, data, tmp_path):
    run = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "a", "--f-divergence-type",
                 "alpha_divergence", "--f-alpha-divergence-coef", 0.3, "--ld-alpha", 0.5, "--use-weighting",
                 "--discopop-tau", 0.07, "--bco-delta", "batch")  # fmt: skip
    o = run.module.loss_options
    assert (o.f_divergence_type, o.f_alpha_divergence_coef, o.ld_alpha, o.use_weighting, o.discopop_tau) == (
        "alpha_divergence", 0.3, 0.5, True, 0.07)
    assert o.bco_delta == "batch"
    mixed = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "c", "--loss-type", "sigmoid", "sft",
                   "--loss-weights", 1, 0.5).module.loss_options  # fmt: skip
    assert list(mixed.loss_type) == ["sigmoid", "sft"] and list(mixed.loss_weights) == [1.0, 0.5]
    default = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "b").module.loss_options
    assert (default.beta, default.loss_type, default.f_divergence_type) == (0.1, "sigmoid", "reverse_kl")


def test_options_that_cannot_apply_are_one_line(model_dir, data, tmp_path, capsys):
    base = ["--model", model_dir, "--data", data, "--out", tmp_path / "out"]
    assert "--cpo-alpha is an option of --method cpo, simpo, alphapo, not of dpo" in _error([*base, "--cpo-alpha", 1],
                                                                                            capsys)  # fmt: skip
    assert "--desirable-weight is an option of --method kto, not of orpo" in _error(
        [*base, "--method", "orpo", "--desirable-weight", 2], capsys)
    assert "--method simpo sets loss_type to 'simpo'" in _error([*base, "--method", "simpo", "--loss-type", "ipo"],
                                                                capsys)  # fmt: skip
    assert "reads no reference model" in _error([*base, "--method", "cpo", "--precompute-reference"], capsys)
    assert "--lora-target-modules needs --lora R" in _error([*base, "--lora-target-modules", "q_proj"], capsys)
    assert "add --keep-dropout" in _error([*base, "--lora", 4, "--lora-dropout", 0.1], capsys)
    assert "constant has no warmup" in _error([*base, "--lr-scheduler", "constant", "--warmup-steps", 2], capsys)
    assert "--save-total-limit must be an integer >= 1" in _error([*base, "--save-total-limit", 0], capsys)
    assert "Target modules {'nope'} not found" in _error([*base, "--lora", 4, "--lora-target-modules", "nope"], capsys)
    # a module's own checks, through the command line: one line too
    assert "beta" in _error([*base, "--method", "orpo", "--beta", -1], capsys)
    assert "--method dpo: loss_type 'sft' with ld_alpha" in _error([*base, "--loss-type", "sigmoid", "sft", "--ld-alpha",
                                                                    0.5], capsys)  # fmt: skip


def _error(args, capsys) -> str:
    """The one error line of a refused setup (after transformers' weight-loading bar, when the
    refusal comes after the weights loaded)."""
    assert train_cli(*args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("fastdpo train: error: "), err
    return lines[0]


def adapted(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}


def test_lora_targets_and_dropout(model_dir, data, tmp_path):
    default = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "a", "--lora", 4).module.policy_model
    assert adapted(default) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    every = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "b", "--lora", 4, "--lora-target-modules",
                   "all-linear").module.policy_model  # fmt: skip
    assert adapted(every) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    two = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "c", "--lora", 4, "--lora-target-modules",
                 "q_proj", "v_proj", "--lora-dropout", 0.1, "--keep-dropout").module.policy_model  # fmt: skip
    assert adapted(two) == {"q_proj", "v_proj"}
    drops = {m.p for n, m in two.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n}
    assert drops == {0.1}


@pytest.mark.parametrize("schedule", ["cosine", "constant_with_warmup", "constant"])
def test_the_learning_rate_schedule_is_transformers(schedule, model_dir, data, tmp_path):
    warmup = 0 if schedule == "constant" else 2
    out = tmp_path / "out"
    assert train_cli("--model", model_dir, "--data", data, "--out", out, "--steps", 5, "--batch-size", 4,
                     "--lr", 1e-3, "--lr-scheduler", schedule, "--warmup-steps", warmup, *QUIET) == 0  # fmt: skip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = transformers.get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=5)
    want = []
    for _ in range(5):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert [r["lr"] for r in rows(out)] == pytest.approx(want, rel=1e-12)
    assert len(set(want)) > 1 or schedule == "constant"


def test_save_total_limit_keeps_the_latest(model_dir, data, tmp_path):
    out = tmp_path / "out"
    assert train_cli("--model", model_dir, "--data", data, "--out", out, "--steps", 5, "--batch-size", 4,
                     "--save-every", 1, "--save-total-limit", 2, *QUIET) == 0  # fmt: skip
    assert [p.name for p in train_io.checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]
    assert not list(out.glob("checkpoint-*.tmp"))


def test_num_proc_tokenizes_the_same(model_dir, data, tmp_path):
    one = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "a")
    two = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "b", "--num-proc", 2)
    assert len(one.train_ds) == len(two.train_ds) == 24
    for i in range(len(one.train_ds)):
        a, b = one.train_ds[i], two.train_ds[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_report_to_tensorboard_holds_the_rows_of_metrics_jsonl(model_dir, data, tmp_path):
    pytest.importorskip("tensorboard")
    from test_report import _float32, _scalars, _tensorboard

    out = tmp_path / "out"
    held = write_jsonl(tmp_path / "eval.jsonl", records(8, seed=1))
    assert train_cli("--model", model_dir, "--data", data, "--eval", held, "--out", out, "--steps", 3, "--batch-size",
                     4, "--eval-every", 2, "--report-to", "tensorboard", *QUIET) == 0  # fmt: skip
    logged = rows(out)
    assert {r["split"] for r in logged} == {"train", "eval"}
    want = {}
    for r in logged:
        for k, v in r.items():
            if k not in ("step", "split"):
                want.setdefault(f"{r['split']}/{k}", {})[r["step"]] = _float32(v)
    assert _scalars(_tensorboard(out / "runs")) == want
