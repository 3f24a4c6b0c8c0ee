"""``--report-to``: the rows of ``metrics.jsonl`` sent to experiment trackers too -- TensorBoard,
Weights & Biases, Trackio -- as Hugging Face's Trainer sends its logs.

:class:`Trackers` takes the row :class:`~.io.MetricsLog` writes (``{"step": 3, "split":
"train", "epoch": 0.5, "loss": ..., "rewards/accuracies": ..., "lr": ..., "pairs": 8}``; an
evaluation's has ``"split": "eval"``) and logs each number but the step as a scalar named
``{split}/{field}`` (``train/loss``, ``eval/rewards/accuracies``, ``train/lr``, the Trainer's
names) at ``step``.  Construct it on the main process only (process 0 of a torchrun launch: the
process that writes ``metrics.jsonl``); it does not look at the ranks itself.

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` writing ``out/runs/`` (needs the
  ``tensorboard`` package); the run config as the text ``config`` and as hparams, once per
  directory (by the run that starts it).
* ``wandb``: ``wandb.init(project=..., dir=out, id=..., resume="allow")``.  The project:
  ``project`` if given, else ``$WANDB_PROJECT``, else ``"fastdpo"``; ``$WANDB_DIR`` (instead
  of ``out``), ``$WANDB_MODE`` (``offline``, ``disabled``), ``$WANDB_ENTITY``, ``$WANDB_NAME``
  and ``$WANDB_RUN_ID`` work as wandb documents them.
* ``trackio``: ``trackio.init(project=..., name=..., config=..., resume="allow")``, then
  ``trackio.log`` and ``trackio.finish``.  The project: ``project`` if given, else
  ``"fastdpo"``.  Trackio writes its SQLite database under ``$TRACKIO_DIR`` (default:
  ``~/.cache/huggingface/trackio``), not under ``out``: its dashboard (``trackio show``) reads it
  there; ``$TRACKIO_SPACE_ID`` sends it to a Hugging Face Space instead.

**Resuming** (``resume_step``: the step of the checkpoint the run resumes from; None for a new
run).  The interrupted run may have logged steps after its last checkpoint, which the resumed run
logs again.  TensorBoard: the writer is opened with ``purge_step=resume_step + 1``, so TensorBoard
drops every event of the earlier files from that step on and shows the resumed run's values
(those at ``resume_step`` itself are in the checkpoint and are not logged again, so they stay).
W&B: the run id is kept in ``out/trackers.json`` and the resumed run continues the same W&B run
(``resume="allow"``; a run in another ``--out`` starts a new W&B run).  W&B's steps only
increase: it drops, with a warning, the resumed run's rows for steps it already has, keeping the
interrupted run's values there (no duplicates).  Offline (``WANDB_MODE=offline``) each start
writes its own ``offline-run-*`` directory under the same id.  Trackio: the run name is kept in
``out/trackers.json`` and the resumed run continues that run (``resume="allow"``), but Trackio
keeps every row it is given: steps logged after the checkpoint by the interrupted run appear
twice (Trackio has no way to drop them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from .io import first_line

REPORT_TO = ("tensorboard", "wandb", "trackio", "none")  # the CLI's choices for --report-to
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # kind -> pip package
TRACKERS_FILE = "trackers.json"  # the W&B run id and the Trackio run name, for a resumed run
TENSORBOARD_DIR = "runs"  # under out: TensorBoard's log directory (`tensorboard --logdir out/runs`)
DEFAULT_PROJECT = "fastdpo"
# The metrics the hparams tab shows next to each run's config (their scalars, looked up by name).
HPARAMS_METRICS = ("train/loss", "train/rewards/accuracies", "eval/loss", "eval/rewards/accuracies")


def check_report_to(kinds: Sequence[str]) -> list[str]:
    """The trackers of ``--report-to KIND [KIND ...]``, in order, each once; ``["none"]`` gives
    ``[]``.  An unknown kind, or ``none`` with another kind, is a one-line ``ValueError``."""
    if isinstance(kinds, str):
        kinds = [kinds]
    unknown = [k for k in kinds if k not in REPORT_TO]
    if unknown:
        raise ValueError(f"--report-to {unknown[0]!r}: unknown; choose from {', '.join(REPORT_TO)}")
    chosen = list(dict.fromkeys(k for k in kinds if k != "none"))
    if chosen and "none" in kinds:
        raise ValueError(f"--report-to none means no tracker: give it alone, not with {' '.join(chosen)}")
    return chosen


def scalars(row: dict) -> dict[str, float]:
    """The scalars of a ``metrics.jsonl`` row: every number but ``step``, named
    ``{split}/{field}`` (``train/loss``, ``eval/rewards/accuracies``)."""
    if not isinstance(row.get("step"), int) or not isinstance(row.get("split"), str):
        raise ValueError(f"a metrics row needs an integer 'step' and a 'split', got keys {sorted(row)}")
    split = row["split"]
    return {f"{split}/{k}": v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip


def _import(kind: str):
    """The tracker's module; a missing library is a one-line ``ValueError`` naming the package."""
    package = PACKAGES[kind]
    try:
        module = __import__(package)
        if kind == "tensorboard":
            from torch.utils import tensorboard as module
    except ImportError as e:
        reason = "" if isinstance(e, ModuleNotFoundError) and e.name == package else f" ({first_line(e)})"
        raise ValueError(f"--report-to {kind} needs {package}: pip install {package}{reason}") from None
    return module


class Trackers:
    """The trackers of ``kinds`` (``"tensorboard"``, ``"wandb"``, ``"trackio"``; ``"none"`` or
    ``[]``: none), started for a run writing ``out`` with config ``run_config`` (the
    ``fastdpo_train.json`` dict), resuming from the checkpoint of step ``resume_step`` (None: a
    new run).  See the module docstring for what each tracker gets and what resuming does.

    Construct it on the main process only.  Every library is imported before any tracker starts:
    a kind whose library is missing, or an unknown kind, is a one-line ``ValueError``.
    :meth:`log` sends one ``metrics.jsonl`` row to each, :meth:`close` finishes them (also on
    leaving a ``with`` block).
    """

    def __init__(self, kinds: Sequence[str], out: str | Path, run_config: dict, resume_step: int | None = None,
                 project: str | None = None):  # fmt: skip
        self.kinds = check_report_to(kinds)
        modules = {k: _import(k) for k in self.kinds}
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int) or resume_step < 0):
            raise ValueError(f"resume_step must be None or an integer >= 0, got {resume_step!r}")
        self.out = Path(out)
        self._trackers: list = []
        if not self.kinds:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        ids_path = self.out / TRACKERS_FILE
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.is_file() else {}
        start = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}
        try:
            for kind in self.kinds:
                self._trackers.append(start[kind](modules[kind], self.out, run_config, resume_step, project, ids))
        except BaseException:
            self.close()
            raise
        if "wandb" in self.kinds or "trackio" in self.kinds:
            ids_path.write_text(json.dumps(ids, indent=2) + "\n")

    def log(self, row: dict) -> None:
        """Send one ``metrics.jsonl`` row (a training step's or an evaluation's) to each tracker."""
        if not self._trackers:
            return
        values = scalars(row)
        for tracker in self._trackers:
            tracker.log(row["step"], values)

    def close(self) -> None:
        """Finish every tracker (flush and close the event file, finish the runs); a second call
        does nothing."""
        trackers, self._trackers = self._trackers, []
        for tracker in reversed(trackers):
            tracker.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- one class per tracker


def _hparam(v):
    """A config value as the hparams plugin takes it (a number, string or bool)."""
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v)


class _TensorBoard:
    def __init__(self, tb, out: Path, config: dict, resume_step: int | None, project, ids: dict):
        log_dir = out / TENSORBOARD_DIR
        first = not any(log_dir.glob("events.out.tfevents.*"))
        purge = None if resume_step is None else resume_step + 1
        self.writer = tb.SummaryWriter(log_dir=str(log_dir), purge_step=purge)
        if first:
            step = resume_step or 0
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```", global_step=step)
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams({k: _hparam(v) for k, v in config.items() if v is not None},
                                   dict.fromkeys(HPARAMS_METRICS, 0.0)):  # fmt: skip
                self.writer.file_writer.add_summary(summary, step)

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, wandb, out: Path, config: dict, resume_step: int | None, project: str | None, ids: dict):
        self.run = wandb.init(
            project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            dir=None if os.environ.get("WANDB_DIR") else str(out),
            id=os.environ.get("WANDB_RUN_ID") or ids.get("wandb"),
            resume="allow",
        )
        # (not init's config=: a resumed run may change a few options, which W&B would refuse)
        self.run.config.update(config, allow_val_change=True)
        ids["wandb"] = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, trackio, out: Path, config: dict, resume_step: int | None, project: str | None, ids: dict):
        self.trackio = trackio
        run = trackio.init(project=project or DEFAULT_PROJECT, name=ids.get("trackio"), config=config, resume="allow")
        ids["trackio"] = run.name

    def log(self, step: int, values: dict) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()
