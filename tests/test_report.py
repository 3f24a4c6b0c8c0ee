"""``--report-to`` (fastdpo/train/report.py): what each tracker holds after a run, read back with
the tracker's own reader -- TensorBoard's ``EventAccumulator``, the records of W&B's offline
``.wandb`` file, Trackio's SQLite database -- against the ``metrics.jsonl`` rows sent: every
scalar of every row, by name, step and value; and what a resumed run leaves there.

TensorBoard and wandb are in the ``report`` extra that scripts/test.sh installs; trackio is not
(it pins ``pillow<13``, against the pillow of constraints.txt): its test runs where it is
installed and is skipped elsewhere.  Nothing here reaches the network (W&B runs offline, Trackio
locally)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastdpo.train.report import REPORT_TO, TRACKERS_FILE, Trackers, check_report_to, scalars

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": "/m", "data": "/d.jsonl", "out": "/o", "beta": 0.1, "loss_type": ["sigmoid", "ipo"],
          "lora_alpha": None, "fsdp": False, "steps": 8, "lr": 1e-6}  # fmt: skip
FIELDS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def rows(first: int, last: int, eval_every: int = 2, seed: int = 0, per_epoch: int = 4) -> list[dict]:
    """``metrics.jsonl`` rows as ``fastdpo train`` writes them for steps first..last: a training
    row per step (its grad_norm missing on odd steps, as when clipping is off), an evaluation
    every ``eval_every`` steps; fresh values of both signs."""
    rng = random.Random(seed)
    out = []
    for step in range(first, last + 1):
        train = {"step": step, "split": "train", "epoch": round(step / per_epoch, 4)}
        train |= {k: rng.uniform(-3, 3) for k in FIELDS} | {"lr": rng.uniform(0, 1e-3)}
        if step % 2 == 0:
            train["grad_norm"] = rng.uniform(0, 5)
        out.append(train | {"pairs": 8})
        if step % eval_every == 0:
            ev = {"step": step, "split": "eval", "epoch": round(step / per_epoch, 4)}
            out.append(ev | {k: rng.uniform(-3, 3) for k in FIELDS} | {"pairs": 5})
    return out


def expected(sent: list[dict]) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of the rows, the last value of a step winning."""
    tags: dict[str, dict[int, float]] = {}
    for row in sent:
        for k, v in row.items():
            if k not in ("step", "split"):
                tags.setdefault(f"{row['split']}/{k}", {})[row["step"]] = v
    return tags


# ----------------------------------------------------------------------------- choices, names, errors


def test_report_to_choices():
    assert REPORT_TO == ("tensorboard", "wandb", "trackio", "none")
    assert check_report_to(["none"]) == [] and check_report_to([]) == [] and check_report_to("none") == []
    assert check_report_to(["wandb", "tensorboard", "wandb"]) == ["wandb", "tensorboard"]
    with pytest.raises(ValueError, match=r"^--report-to 'comet': unknown; choose from tensorboard, wandb, trackio, none$"):
        check_report_to(["tensorboard", "comet"])
    with pytest.raises(ValueError, match="^--report-to none means no tracker: give it alone, not with wandb$"):
        Trackers(["none", "wandb"], "unused", CONFIG)


def test_none_writes_nothing(tmp_path):
    with Trackers(["none"], tmp_path / "out", CONFIG) as t:
        for row in rows(1, 2):
            t.log(row)
    assert not (tmp_path / "out").exists()


def test_scalar_names():
    row = {"step": 3, "split": "eval", "epoch": 0.75, "loss": 0.5, "rewards/accuracies": 1, "pairs": 5, "flag": True, "note": "x"}
    assert scalars(row) == {"eval/epoch": 0.75, "eval/loss": 0.5, "eval/rewards/accuracies": 1, "eval/pairs": 5}
    with pytest.raises(ValueError, match="^a metrics row needs an integer 'step' and a 'split'"):
        scalars({"step": 3, "loss": 0.5})


@pytest.mark.parametrize("kind", ["tensorboard", "wandb", "trackio"])
def test_missing_library_is_one_line(kind, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, kind, None)  # `import kind` now fails as if not installed
    with pytest.raises(ValueError, match=f"^--report-to {kind} needs {kind}: pip install {kind}$"):
        Trackers([kind], tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_every_library_is_imported_before_any_tracker_starts(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="needs wandb"):
        Trackers(["tensorboard", "wandb"], tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()  # no TensorBoard event file left behind


def test_broken_library_says_why(tmp_path, monkeypatch):
    """An installed library whose import fails is not reported as missing only."""
    real_import = __import__

    def broken(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("cannot import name 'Message' from 'google.protobuf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", broken)
    with pytest.raises(ValueError, match=r"^--report-to wandb needs wandb: pip install wandb \(ImportError: cannot import"):
        Trackers(["wandb"], tmp_path / "out", CONFIG)


# ----------------------------------------------------------------------------- TensorBoard


def _tensorboard(log_dir: Path):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    return acc


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]  # TensorBoard keeps scalars as float32


def _scalars(acc) -> dict[str, dict[int, float]]:
    got = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step twice: {steps}"
        got[tag] = {e.step: e.value for e in events}
    return got


def test_tensorboard_holds_every_scalar_of_every_row(tmp_path):
    pytest.importorskip("tensorboard")
    sent = rows(1, 6)
    with Trackers(["tensorboard"], tmp_path, CONFIG) as t:
        for row in sent:
            t.log(row)
    acc = _tensorboard(tmp_path / "runs")
    want = {tag: {s: _float32(v) for s, v in by_step.items()} for tag, by_step in expected(sent).items()}
    assert "train/rewards/accuracies" in want and "eval/loss" in want and "train/grad_norm" in want
    assert _scalars(acc) == want
    # The config, once: as text (JSON) and as hparams (the non-None values).
    (text,) = acc.Tensors("config/text_summary")
    assert json.loads(text.tensor_proto.string_val[0].decode().strip("`\njson")) == CONFIG
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert set(start.session_start_info.hparams) == {k for k, v in CONFIG.items() if v is not None}
    assert start.session_start_info.hparams["loss_type"].string_value == '["sigmoid", "ipo"]'


def test_tensorboard_resumed_run_replaces_the_steps_after_the_checkpoint(tmp_path):
    """A run that logged steps 1..7 and was interrupted, resumed from its checkpoint of step 4:
    TensorBoard shows steps 1..4 of the first run (step 4's training row and evaluation
    included) and 5..8 of the resumed one, each step once."""
    pytest.importorskip("tensorboard")
    first, resumed = rows(1, 7, seed=1), rows(5, 8, seed=2)
    with Trackers(["tensorboard"], tmp_path, CONFIG) as t:
        for row in first:
            t.log(row)
    with Trackers(["tensorboard"], tmp_path, CONFIG, resume_step=4) as t:
        for row in resumed:
            t.log(row)
    assert len(list((tmp_path / "runs").glob("events.out.tfevents.*"))) == 2
    acc = _tensorboard(tmp_path / "runs")
    kept = [r for r in first if r["step"] <= 4] + resumed
    want = {tag: {s: _float32(v) for s, v in by_step.items()} for tag, by_step in expected(kept).items()}
    assert _scalars(acc) == want
    eval4 = next(r for r in first if r["step"] == 4 and r["split"] == "eval")
    assert (acc.Scalars("eval/loss")[1].step, acc.Scalars("eval/loss")[1].value) == (4, _float32(eval4["loss"]))
    assert len(acc.Tensors("config/text_summary")) == 1  # written by the run that started the directory


# ----------------------------------------------------------------------------- W&B (offline)


def _wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file: W&B's LevelDB-log format (a 7-byte header
    ``:W&B``, magic 0xBEE1, version 0; then 32 KiB blocks of chunks, each with a 7-byte header:
    CRC-32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(run_dir: Path) -> tuple:
    """(run id, project, config, {step: {name: value}}) of an offline run directory."""
    import wandb

    # run.finish() can return before W&B's service process has written the file (seen: 1 run in 8
    # left only the 7-byte header); stopping the service flushes it.
    wandb.teardown()
    (file,) = run_dir.glob("run-*.wandb")
    run_id = project = None
    config, history = {}, {}
    for r in _wandb_records(file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id, project = r.run.run_id, r.run.project
            config |= {i.key: json.loads(i.value_json) for i in r.run.config.update}
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in r.config.update}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return run_id, project, config, history


def _by_step(sent: list[dict]) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for row in sent:
        steps.setdefault(row["step"], {}).update(scalars(row))
    return steps


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_NAME", "WANDB_ENTITY", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "fastdpo-test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    return tmp_path / "out"


def test_wandb_offline_run_holds_every_scalar_of_every_row(wandb_offline):
    out, sent = wandb_offline, rows(1, 6)
    with Trackers(["wandb"], out, CONFIG) as t:
        for row in sent:
            t.log(row)
    run_id = json.loads((out / TRACKERS_FILE).read_text())["wandb"]
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    got_id, project, config, history = _wandb_run(run_dir)
    assert (got_id, project) == (run_id, "fastdpo-test")
    assert {k: config[k] for k in CONFIG} == CONFIG
    assert history == _by_step(sent)  # a step's training row and evaluation in one history row


def test_wandb_resumed_run_keeps_its_id(wandb_offline):
    """The resumed run logs into the W&B run of the interrupted one (its id from
    out/trackers.json, resume="allow"); a new run in the same --out gets a new id."""
    out = wandb_offline
    with Trackers(["wandb"], out, CONFIG) as t:
        for row in rows(1, 5, seed=1):
            t.log(row)
    run_id = json.loads((out / TRACKERS_FILE).read_text())["wandb"]
    resumed = rows(5, 8, seed=2)
    with Trackers(["wandb"], out, CONFIG | {"eval_every": 3}, resume_step=4) as t:
        for row in resumed:
            t.log(row)
    assert json.loads((out / TRACKERS_FILE).read_text())["wandb"] == run_id
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # offline: one directory per start, under the same id
    got_id, _, config, history = _wandb_run(runs[1])
    assert got_id == run_id and config["eval_every"] == 3
    assert history == _by_step(resumed)
    with Trackers(["wandb"], out, CONFIG) as t:
        pass
    assert json.loads((out / TRACKERS_FILE).read_text())["wandb"] != run_id


# ----------------------------------------------------------------------------- Trackio (local SQLite)

TRACKIO_SCRIPT = """
import json, sys
from fastdpo.train.report import Trackers
out, config, first, resumed = sys.argv[1], *map(json.loads, sys.argv[2:])
with Trackers(["trackio"], out, config, project="fastdpo-test") as t:
    for row in first:
        t.log(row)
with Trackers(["trackio"], out, config, resume_step=4, project="fastdpo-test") as t:
    for row in resumed:
        t.log(row)
"""


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="trackio is not installed (not in CI: see the docstring)")
def test_trackio_local_run_holds_every_scalar_of_every_row(tmp_path):
    """In a fresh process: trackio reads $TRACKIO_DIR when it is imported."""
    first, resumed = rows(1, 6, seed=1), rows(5, 7, seed=2)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    env.pop("TRACKIO_SPACE_ID", None)
    args = [str(tmp_path / "out"), json.dumps(CONFIG), json.dumps(first), json.dumps(resumed)]
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(TRACKIO_SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = json.loads((tmp_path / "out" / TRACKERS_FILE).read_text())["trackio"]
    db = sqlite3.connect(tmp_path / "trackio" / "fastdpo-test.db")
    logged = list(db.execute("SELECT run_id, run_name, step, metrics FROM metrics ORDER BY id"))
    db.close()
    assert {r[1] for r in logged} == {name} and len({r[0] for r in logged}) == 1  # one run, resumed
    # Each row as one log call, in order: Trackio keeps them all, the steps after the
    # checkpoint (5 and 6) twice, as documented.
    assert [(step, json.loads(m)) for _, _, step, m in logged] == [(r["step"], scalars(r)) for r in first + resumed]
