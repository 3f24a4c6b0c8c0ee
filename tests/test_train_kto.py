"""``fastdpo train --method kto``: unpaired records (``prompt``, ``completion``, ``label``, or
preference pairs unpaired as TRL's ``KTOTrainer`` does) tokenized by
``TokenizedKTODataset.from_records``, trained with ``fastdpo.KTO``.  The logged numbers are the
module's on the same batches, the desirable completions' means over the desirable completions
of every micro-batch (and the undesirable ones' likewise), and a run resumes bitwise."""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastdpo import KTO  # noqa: E402
from test_train import LETTERS, QUIET, records, rows, save_model, train_cli, weights, write_jsonl  # noqa: E402
from test_train_options import _error  # noqa: E402
from test_train_policy import run_of  # noqa: E402


def unpaired(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, 4)
        s = rng.randrange(0, len(LETTERS) - k - 2)
        good = rng.random() < 0.5
        nxt = LETTERS[s + k:s + k + 2]
        out.append({"prompt": "count : " + " ".join(LETTERS[s:s + k]),
                    "completion": " " + " ".join(nxt if good else nxt[::-1]), "label": good})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "kto.jsonl", unpaired(24, seed=0))


def test_logged_numbers_are_ktos_over_the_steps_completions(model_dir, data, tmp_path):
    out = tmp_path / "out"
    options = ["--method", "kto", "--batch-size", 3, "--grad-accum", 2, "--seed", 0]
    assert train_cli("--model", model_dir, "--data", data, "--out", out, "--steps", 1, *options, *QUIET) == 0
    logged = rows(out)[0]
    run = run_of("--model", model_dir, "--data", data, "--out", tmp_path / "probe", *options)
    batches = run._epoch(0, 0)
    kto = KTO(transformers.AutoModelForCausalLM.from_pretrained(model_dir), logprob_reduction="sum",
              mask_alignment="target")  # fmt: skip
    losses, sums, counts = [], {"chosen": 0.0, "rejected": 0.0}, {"chosen": 0, "rejected": 0}
    with torch.no_grad():
        for _ in range(2):
            _, batch = next(batches)
            loss, metrics = kto(**batch, return_metrics=True)
            losses.append(loss.item())
            for kind, mask in (("chosen", batch["label"]), ("rejected", ~batch["label"])):
                if mask.any():
                    sums[kind] += metrics[f"logps/{kind}"].item() * int(mask.sum())
                    counts[kind] += int(mask.sum())
    assert counts["chosen"] and counts["rejected"]
    assert logged["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    for kind in ("chosen", "rejected"):
        assert logged[f"logps/{kind}"] == pytest.approx(sums[kind] / counts[kind], rel=1e-6)
    assert logged["completions"] == 6 and "kl" in logged and "rewards/accuracies" not in logged
    assert logged["rewards/margins"] == pytest.approx(logged["rewards/chosen"] - logged["rewards/rejected"])


def test_kto_learns_and_resumes_bitwise(model_dir, data, tmp_path):
    common = ["--model", model_dir, "--data", data, "--method", "kto", "--steps", 6, "--batch-size", 4, "--lr",
              1e-2, *QUIET]  # fmt: skip
    assert train_cli(*common, "--out", tmp_path / "whole", "--save-every", 3) == 0
    assert train_cli(*common, "--out", tmp_path / "resumed", "--resume", tmp_path / "whole" / "checkpoint-3") == 0
    whole, resumed = rows(tmp_path / "whole"), rows(tmp_path / "resumed")
    assert whole == resumed
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole[-1]["rewards/margins"] > whole[0]["rewards/margins"]


def test_preference_pairs_are_unpaired_as_trl_does(model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records(8, seed=0))
    run = run_of("--model", model_dir, "--data", pairs, "--out", tmp_path / "o", "--method", "kto")
    assert len(run.train_ds) == 16
    assert sorted(bool(run.train_ds[i][2]) for i in range(16)) == [False] * 8 + [True] * 8


def test_what_kto_cannot_do_is_one_line(model_dir, data, tmp_path, capsys):
    base = ["--model", model_dir, "--data", data, "--out", tmp_path / "out", "--method", "kto"]
    assert "not implemented for --method kto" in _error([*base, "--precompute-reference"], capsys)
    assert "--cpo-alpha is an option of --method cpo, simpo, alphapo, not of kto" in _error([*base, "--cpo-alpha", 1], capsys)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "count : a b", "completion": " c d", "label": 1}) + "\n")
    line = _error(["--model", model_dir, "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "o2", "--method",
                   "kto"], capsys)  # fmt: skip
    assert "label" in line
