"""``fastdpo train``'s configuration: :class:`TrainConfig` (one field per option of the command)
and its checks (:func:`check_config`: a one-line ``ValueError`` naming the option)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import io

__all__ = ["TrainConfig", "check_config", "CHANGEABLE_ON_RESUME"]

# Options a resumed run may change: they do not touch the trajectory of the weights.
CHANGEABLE_ON_RESUME = {"out", "resume", "eval", "eval_every", "save_every", "log_every", "progress", "device"}


@dataclass
class TrainConfig:
    """A training run; each field is the ``fastdpo train`` option of the same name
    (``fastdpo train --help``).  Defaults follow TRL 1.16's ``DPOConfig`` where it has one
    (beta 0.1, lr 1e-6, batch 8, max_length 1024, keep_start truncation, max_grad_norm 1)."""

    model: str
    data: str
    out: str
    eval: str | None = None
    eval_fraction: float | None = None
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    logprob_reduction: str = "sum"
    mask_alignment: str = "target"
    head: str = "auto"
    packing: str = "none"
    lora: int = 0
    lora_alpha: float | None = None
    precompute_reference: bool = False
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    seed: int = 0
    dtype: str = "float32"
    device: str | None = None
    fsdp: bool = False
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    resume: str | None = None
    progress: bool = True


def check_config(c: TrainConfig) -> TrainConfig:
    """``c`` checked (one-line ``ValueError`` naming the option), with absolute paths."""
    def at_least(name, value, low, none_ok=False):
        if value is None and none_ok:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")

    io.check_model_dir(c.model)
    for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0), ("eval_every", 0),
                      ("save_every", 0), ("log_every", 1), ("lora", 0), ("seed", 0)):  # fmt: skip
        at_least(name, getattr(c, name), low)
    at_least("steps", c.steps, 1, none_ok=True)
    at_least("max_length", c.max_length, 2, none_ok=True)
    if not c.lr > 0:
        raise ValueError(f"--lr must be > 0, got {c.lr}")
    if not (c.max_grad_norm >= 0 and c.weight_decay >= 0):
        raise ValueError(f"--max-grad-norm and --weight-decay must be >= 0, got {c.max_grad_norm}, {c.weight_decay}")
    if c.eval is not None and c.eval_fraction is not None:
        raise ValueError("give --eval FILE or --eval-fraction F, not both")
    if c.eval_fraction is not None and not 0 < c.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must be in (0, 1), got {c.eval_fraction}")
    if c.dtype not in (*io.DTYPES, "auto"):
        raise ValueError(f"--dtype must be one of {', '.join((*io.DTYPES, 'auto'))}, got {c.dtype!r}")
    if c.truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"--truncation-mode must be keep_start or keep_end, got {c.truncation_mode!r}")
    if c.eval_every and c.eval is None and c.eval_fraction is None:
        raise ValueError("--eval-every needs an eval set: --eval FILE or --eval-fraction F")
    if c.lora_alpha is not None and not c.lora:
        raise ValueError("--lora-alpha needs --lora R")
    paths = {k: str(Path(v).resolve()) for k in ("model", "data", "eval", "out") if (v := getattr(c, k)) is not None}
    c = dataclasses.replace(c, **paths)
    for option, path in (("--data", c.data), ("--eval", c.eval)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{option} {path}: no such file or directory")
    out = Path(c.out)
    if c.resume is None and out.is_dir() and ((out / io.CONFIG_FILE).exists() or io.latest_checkpoint(out)):
        raise ValueError(f"--out {c.out} holds a previous run: pass --resume to continue it, or another --out")
    return c

