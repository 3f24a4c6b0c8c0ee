"""``fastdpo train``'s configuration: :class:`TrainConfig` (one field per option of the command)
and its checks (:func:`check_config`: a one-line ``ValueError`` naming the option)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from . import io, methods, report

__all__ = ["TrainConfig", "check_config", "CHANGEABLE_ON_RESUME", "LR_SCHEDULERS"]

# transformers' schedules (get_scheduler) that fastdpo train offers: their names in TRL's configs.
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")

# Fields added since checkpoints were first written: a checkpoint's config without one ran as this.
ADDED_SINCE = {"sequence_parallel": 1}
# Options a resumed run may change: they do not touch the trajectory of the weights.
CHANGEABLE_ON_RESUME = {"out", "resume", "eval", "eval_every", "save_every", "log_every", "progress", "device",
                        "save_total_limit", "num_proc", "report_to"}


@dataclass
class TrainConfig:
    """A training run; each field is the ``fastdpo train`` option of the same name
    (``fastdpo train --help``).  Defaults follow TRL 1.16's ``DPOConfig`` where it has one (lr
    1e-6, batch 8, max_length 1024, keep_start truncation, max_grad_norm 1, gradient
    checkpointing on, dropout off; the loss options' are the modules' own: beta 0.1, ...), except
    ``bf16`` (TRL: on unless ``fp16``; here float32 unless asked)."""

    model: str
    data: str
    out: str
    eval: str | None = None
    eval_fraction: float | None = None
    method: str = "dpo"
    # The loss options (fastdpo.train.methods.LOSS_OPTIONS): None leaves the method's module its
    # own default.
    loss_type: str | list[str] | None = None
    loss_weights: list[float] | None = None
    beta: float | None = None
    label_smoothing: float | None = None
    gamma: float | None = None
    bco_delta: float | str | None = None
    discopop_tau: float | None = None
    f_divergence_type: str | None = None
    f_alpha_divergence_coef: float | None = None
    ld_alpha: float | None = None
    use_weighting: bool | None = None
    reference_free: bool | None = None
    router_aux_loss_coef: float | None = None
    cpo_alpha: float | None = None
    simpo_gamma: float | None = None
    alpha: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None
    sync_kl: bool | None = None
    logprob_reduction: str | None = None  # None: the method's TRL trainer's (methods.Method.reduction)
    mask_alignment: str = "target"
    head: str = "auto"
    packing: str = "none"
    lora: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None
    precompute_reference: bool = False
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    max_grad_norm: float = 1.0
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    seed: int = 0
    dtype: str = "float32"
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = True
    activation_offloading: bool = False
    keep_dropout: bool = False
    device: str | None = None
    fsdp: bool = False
    sequence_parallel: int = 1
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    save_total_limit: int | None = None
    report_to: str | list[str] = "none"
    num_proc: int | None = None
    resume: str | None = None
    progress: bool = True

    def loss_options(self) -> dict:
        """The loss options as given (None: not given), by name."""
        return {k: getattr(self, k) for k in methods.LOSS_OPTIONS}


def check_config(c: TrainConfig) -> TrainConfig:
    """``c`` checked (one-line ``ValueError`` naming the option), with absolute paths."""
    def at_least(name, value, low, none_ok=False):
        if value is None and none_ok:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")

    io.check_model_dir(c.model)
    method = methods.method_of(c.method)
    methods.loss_options(c.method, c.loss_options())
    if c.precompute_reference and not method.reference:
        raise ValueError(f"--precompute-reference: --method {c.method} reads no reference model")
    if c.precompute_reference and not method.paired:
        raise ValueError("--precompute-reference is not implemented for --method kto (the reference scores the KL "
                         "sequences of each batch too): leave it out")  # fmt: skip
    for name, low in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0), ("eval_every", 0),
                      ("save_every", 0), ("log_every", 1), ("lora", 0), ("seed", 0)):  # fmt: skip
        at_least(name, getattr(c, name), low)
    at_least("steps", c.steps, 1, none_ok=True)
    at_least("sequence_parallel", c.sequence_parallel, 1)
    if c.sequence_parallel > 1:
        if c.packing not in ("batch", "pair"):
            raise ValueError(f"--sequence-parallel {c.sequence_parallel} splits packed rows across processes: it needs "
                             f"--packing batch or pair, got --packing {c.packing}")  # fmt: skip
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
    if c.bf16 and c.fp16:
        raise ValueError("give --bf16 or --fp16, not both")
    if (c.bf16 or c.fp16) and c.dtype != "float32":
        raise ValueError(f"--{'bf16' if c.bf16 else 'fp16'} computes under autocast over float32 master weights: it needs "
                         f"--dtype float32, got {c.dtype} (--dtype alone trains weights of that dtype)")  # fmt: skip
    if c.activation_offloading and not c.gradient_checkpointing:
        raise ValueError("--activation-offloading offloads what gradient checkpointing keeps: leave "
                         "--no-gradient-checkpointing out")  # fmt: skip
    for name in ("lora_alpha", "lora_target_modules"):
        if getattr(c, name) is not None and not c.lora:
            raise ValueError(f"--{name.replace('_', '-')} needs --lora R")
    if c.lora_dropout and not c.lora:
        raise ValueError("--lora-dropout needs --lora R")
    if c.lora_dropout and not c.keep_dropout:
        raise ValueError("--lora-dropout: dropout is off in the policy, LoRA's too (as TRL's disable_dropout, its "
                         "default, zeroes it): add --keep-dropout to train with it")  # fmt: skip
    if not 0 <= c.lora_dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {c.lora_dropout}")
    if c.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {c.lr_scheduler!r}")
    if c.lr_scheduler == "constant" and c.warmup_steps:
        raise ValueError("--lr-scheduler constant has no warmup: use constant_with_warmup with --warmup-steps")
    report.check_report_to(c.report_to)
    at_least("save_total_limit", c.save_total_limit, 1, none_ok=True)
    at_least("num_proc", c.num_proc, 1, none_ok=True)
    paths = {k: str(Path(v).resolve()) for k in ("model", "data", "eval", "out") if (v := getattr(c, k)) is not None}
    c = dataclasses.replace(c, **paths)
    for option, path in (("--data", c.data), ("--eval", c.eval)):
        if path is not None and not Path(path).exists():
            raise ValueError(f"{option} {path}: no such file or directory")
    out = Path(c.out)
    if c.resume is None and out.is_dir() and ((out / io.CONFIG_FILE).exists() or io.latest_checkpoint(out)):
        raise ValueError(f"--out {c.out} holds a previous run: pass --resume to continue it, or another --out")
    return c

