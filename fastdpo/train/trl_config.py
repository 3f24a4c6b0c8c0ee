"""``fastdpo train --config FILE.yaml``: a run's options from a YAML file written with TRL's
names (``DPOConfig``/``CPOConfig``/``KTOConfig`` fields, ``TrainingArguments``', and ``trl dpo``'s
``model_name_or_path``, ``dataset_name``, ``use_peft``, ``lora_r``, ...) or with fastdpo's own
(the :class:`~fastdpo.train.config.TrainConfig` fields).

:func:`read` maps each field to a ``TrainConfig`` field: a field both mean the same is taken
as is (:data:`SAME`, :data:`RENAMED`); one fastdpo takes with a difference is taken and the
difference said in a warning (:data:`DIFFERENT`); one that changes nothing fastdpo does is
skipped with a warning (:data:`IGNORED`); a value fastdpo cannot honour, or a field it does
not know, is a one-line ``ValueError`` naming it.  Command-line flags override the file
(:mod:`fastdpo.train.command`).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from . import io
from .config import TrainConfig

__all__ = ["read", "RENAMED", "DIFFERENT", "IGNORED"]

# TRL's name -> fastdpo's (the same meaning; values taken as they are)
RENAMED = {
    "model_name_or_path": "model",
    "output_dir": "out",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "lr_scheduler",
    "precompute_ref_log_probs": "precompute_reference",
    "dataset_num_proc": "num_proc",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "lora_r": "lora",
}
# Fields fastdpo takes with a difference that a TRL user should hear of.
DIFFERENT = {
    "activation_offloading": "fastdpo offloads what gradient checkpointing keeps (transformers' offload), not every "
                             "saved activation as TRL's context manager does",
    "padding_free": "taken as --packing batch: fastdpo packs the batch's pairs into rows (each prompt once per pair "
                    "with --packing pair), with its own attention by parts",
    "use_liger_kernel": "ignored: fastdpo's fused head replaces Liger's (no logits are built)",
}
# Fields that change nothing fastdpo does (bookkeeping of TRL's own trainer).
IGNORED = {"run_name", "logging_dir", "logging_strategy", "save_strategy", "logging_first_step", "do_train", "do_eval",
           "overwrite_output_dir", "remove_unused_columns", "dataloader_num_workers", "dataset_train_split",
           "ddp_find_unused_parameters"}  # fmt: skip
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
# fastdpo's fields a file may not set (the run's own bookkeeping)
NOT_IN_A_FILE = {"resume"}


def _set(out: dict, key: str, value, field_name: str) -> None:
    if key in out and out[key] != value:
        raise ValueError(f"--config: {out['_from'][key]} and {field_name} both set {key} ({out[key]!r}, {value!r})")
    out[key] = value
    out["_from"][key] = field_name


def _dataset(value, where: str) -> str:
    if not isinstance(value, str) or not Path(value).exists():
        raise ValueError(f"--config: dataset_name {value!r}: fastdpo train reads a local JSONL file or a save_to_disk "
                         f"directory, not a hub dataset (download it and give its path) ({where})")  # fmt: skip
    return value


def translate(fields: dict, where: str) -> dict:
    """TrainConfig field values from a mapping of TRL's or fastdpo's names (see the module
    docstring); warnings say each difference."""
    out: dict = {"_from": {}}
    for name, value in fields.items():
        if name in IGNORED:
            warnings.warn(f"--config {where}: {name} is ignored (it changes nothing fastdpo train does)", stacklevel=3)
            continue
        if name in DIFFERENT:
            warnings.warn(f"--config {where}: {name}: {DIFFERENT[name]}", stacklevel=3)
            if name == "padding_free":
                if value:
                    _set(out, "packing", "batch", name)
            elif name == "activation_offloading":
                _set(out, name, bool(value), name)
            continue
        if name in RENAMED:
            _set(out, RENAMED[name], value, name)
        elif name == "dataset_name":
            _set(out, "data", _dataset(value, where), name)
        elif name == "num_train_epochs":
            if value != int(value):
                raise ValueError(f"--config {where}: num_train_epochs {value}: fastdpo train runs whole epochs (or "
                                 f"max_steps)")  # fmt: skip
            _set(out, "epochs", int(value), name)
        elif name == "max_steps":
            if value not in (-1, None):
                _set(out, "steps", value, name)
        elif name == "disable_dropout":
            _set(out, "keep_dropout", not value, name)
        elif name == "use_peft":
            continue  # (below: it decides what lora_r means)
        elif name == "dtype" or name == "torch_dtype":
            _set(out, "dtype", value, name)
        elif name == "eval_steps":
            if fields.get("eval_strategy") == "steps":  # (TRL's default eval_strategy "no": no evaluations)
                _set(out, "eval_every", value, name)
            else:
                warnings.warn(f"--config {where}: eval_steps is ignored without eval_strategy: steps (as TRL)",
                              stacklevel=3)  # fmt: skip
        elif name == "eval_strategy":
            if value == "no":
                _set(out, "eval_every", 0, name)
            elif value != "steps":
                raise ValueError(f"--config {where}: eval_strategy {value!r}: fastdpo train evaluates every "
                                 f"eval_steps steps (steps) or not at all (no)")  # fmt: skip
        elif name == "warmup_ratio":
            raise ValueError(f"--config {where}: warmup_ratio: give warmup_steps (fastdpo train counts the warmup "
                             f"in steps)")  # fmt: skip
        elif name == "parallelism_config":  # (TrainingArguments': accelerate's ParallelismConfig)
            raise ValueError(f"--config {where}: parallelism_config (accelerate's sp_size, cp_size, ...): fastdpo train "
                             f"takes sequence_parallel: N (its own Ulysses over packed rows; data parallel the rest)")  # fmt: skip
        elif name in NOT_IN_A_FILE:
            raise ValueError(f"--config {where}: {name} is given on the command line only")
        elif name in FIELDS:
            _set(out, name, value, name)
        else:
            raise ValueError(f"--config {where}: unknown field {name!r} (neither a TRL field fastdpo train takes nor "
                             f"one of its own: fastdpo train --help)")  # fmt: skip
    del out["_from"]
    if fields.get("use_peft"):
        out.setdefault("lora", 16)  # TRL's lora_r default
    elif "lora_r" in fields and "lora" not in fields:
        out.pop("lora")  # lora_r without use_peft: TRL trains no adapters
    for key in ("loss_type", "lora_target_modules"):
        if isinstance(out.get(key), str) and (key == "lora_target_modules" or "," in out[key]):
            out[key] = [s.strip() for s in out[key].split(",")]
    for key in ("log_every", "save_every", "eval_every"):
        if isinstance(out.get(key), float):
            if out[key] < 1:
                raise ValueError(f"--config {where}: a {key} of {out[key]} (a fraction of the run): give a number of "
                                 f"steps")  # fmt: skip
            out[key] = int(out[key])
    return out


def read(path: str) -> dict:
    """The TrainConfig field values a YAML file sets (see :func:`translate`)."""
    try:
        import yaml
    except ImportError:
        raise ValueError("--config needs PyYAML: pip install pyyaml") from None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        fields = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not YAML ({io.message(e)})") from None
    if fields is None:
        return {}
    if not isinstance(fields, dict):
        raise ValueError(f"--config {path}: a YAML mapping of field: value expected, got a {type(fields).__name__}")
    return translate(fields, path)
