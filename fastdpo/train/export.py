"""``save_pretrained`` directories from sharded states: a sharded run's final model, and
``fastdpo export CHECKPOINT OUT`` (any checkpoint of ``fastdpo train`` to a directory that
``from_pretrained`` loads).

The weights are written one tensor at a time (:func:`write_safetensors`: the safetensors
header first, from the names, dtypes and shapes, then each tensor's bytes), so the largest
tensor is the most any process holds: a sharded run gathers each tensor whole
(``DTensor.full_tensor``, every process taking part) and process 0 writes it; ``fastdpo
export`` reads each from the checkpoint's DCP files.  The optimizer's state is never read.
LoRA adapters are small: gathered whole and written by peft's ``save_pretrained``.

Names are the model's own (``named_parameters``, a tied weight under its first name, and the
persistent buffers), as ``save_pretrained`` writes them for a model that transformers loads
without converting its format.  A model whose format it converts (``get_model_conversion_mapping``:
MoE experts, renamed keys) is written by ``save_pretrained`` itself, from the whole weights in
one process (process 0 for a run's final model; :func:`whole_fallback` says when).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..models.wrappers import inner_model, model_class
from . import fsdp, io, sharded_checkpoint

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip
MAX_SHARD_BYTES = 50 * 10**9  # save_pretrained's default max_shard_size ("50GB")
WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"


def write_safetensors(where: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES) -> None:  # fmt: skip
    """``save_pretrained``'s weight files in ``where``: ``model.safetensors`` (or numbered
    files of at most ``max_shard_bytes`` and their index) of the tensors ``specs`` names (name,
    dtype, shape), whose values ``tensors`` yields in the same order, one at a time."""
    sizes = [torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() for _, dtype, shape in specs]
    files, current, total = [], [], 0
    for i, size in enumerate(sizes):
        if current and total + size > max_shard_bytes:
            files, current, total = [*files, current], [], 0
        current, total = [*current, i], total + size
    files.append(current)
    names = [WEIGHTS_NAME] if len(files) == 1 else [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
                                                    for k in range(len(files))]  # fmt: skip
    values = iter(tensors)
    for name, members in zip(names, files):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in members:
            key, dtype, shape = specs[i]
            header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[i]]}
            offset += sizes[i]
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # (the data starts 8-byte aligned, as safetensors writes it)
        with open(where / name, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for i in members:
                t = next(values)
                if t.dtype != specs[i][1] or tuple(t.shape) != tuple(specs[i][2]):
                    raise AssertionError(f"{specs[i][0]}: got {t.dtype} {tuple(t.shape)}, expected {specs[i][1:]}")
                f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # (its buffer, no copy)
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {specs[i][0]: n for n, members in zip(names, files) for i in members}}  # fmt: skip
        (where / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def whole_fallback(model: nn.Module) -> bool:
    """Whether transformers converts ``model``'s format between the files and the module
    (``save_pretrained`` reverts it): then the weights are written by ``save_pretrained``."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:  # transformers 4: no conversions
        return False
    found = get_model_conversion_mapping(inner_model(model), add_legacy=False) or []
    return any(not isinstance(c, PrefixChange) for c in found)


def write_config(model: nn.Module, where: Path) -> None:
    """The model's ``config.json`` (its class and dtype recorded, as ``save_pretrained``
    does) and its ``generation_config.json`` when it generates."""
    lm = inner_model(model)
    lm.config.architectures = [model_class(lm).__name__]
    lm.config.dtype = str(next(iter(lm.parameters())).dtype).removeprefix("torch.")
    lm.config.save_pretrained(where)
    if getattr(lm, "can_generate", lambda: False)() and getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(where)


# ----------------------------------------------------------------------------- a run's final model


def save_sharded(where: Path, policy: nn.Module, lora: bool, tokenizer, run_config: dict, main: bool) -> None:
    """A sharded run's final model in ``where`` (process 0 writes): the adapters of a LoRA
    policy (gathered whole: small), else the whole weights one tensor at a time.  A
    collective."""
    if lora or whole_fallback(policy):
        weights = fsdp.model_state(policy, trainable_only=lora)
        if main:
            io.save_model(where, policy, tokenizer, run_config, weights)
        return
    fsdp.reshard(policy)
    entries = fsdp.model_entries(policy, trainable_only=False)
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in entries.items()]

    def gathered():
        with torch.no_grad():
            for t in entries.values():
                yield t.full_tensor()

    if main:
        write_config(policy, where)
        write_safetensors(where, specs, gathered())
        tokenizer.save_pretrained(where)
        (where / io.CONFIG_FILE).write_text(json.dumps(run_config, indent=2) + "\n")
    else:
        for _ in gathered():  # (each gather is a collective: process 0 writes what they make)
            pass


# ----------------------------------------------------------------------------- fastdpo export


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """``fastdpo export``: the model (or LoRA adapters) of a ``fastdpo train`` checkpoint as a
    ``save_pretrained`` directory ``out``, with its tokenizer and run config.  A sharded
    checkpoint's weights are read from its DCP files one tensor at a time, in this process
    (no ``torchrun``); another checkpoint is a ``save_pretrained`` directory already: its files
    are copied.  Refused in one line: a directory that is no checkpoint, an incomplete one."""
    ckpt, out = Path(checkpoint), Path(out)
    if not ckpt.is_dir():
        raise ValueError(f"fastdpo export {checkpoint}: no such checkpoint directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"fastdpo export {checkpoint} {out}: {out} is not an empty directory (give a new one)")
    if not sharded_checkpoint.is_sharded(ckpt):
        if not (ckpt / io.STATE_FILE).is_file():
            raise ValueError(f"fastdpo export {checkpoint}: not a fastdpo train checkpoint (no {io.STATE_FILE}, "
                             f"no {sharded_checkpoint.COMPLETE_FILE})")  # fmt: skip
        skip = {io.STATE_FILE, io.METRICS_FILE, io.CURVES_FILE}
        out.mkdir(parents=True, exist_ok=True)
        for p in ckpt.iterdir():
            if p.is_file() and p.name not in skip:
                shutil.copyfile(p, out / p.name)
        return out
    sharded_checkpoint.check_complete(ckpt, option="fastdpo export")
    out.mkdir(parents=True, exist_ok=True)
    tensors = sharded_checkpoint.tensor_names(ckpt)
    if (ckpt / "adapter_config.json").is_file():
        _export_adapters(ckpt, out, tensors)
    else:
        _export_weights(ckpt, out, tensors)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ckpt).save_pretrained(out)
    shutil.copyfile(ckpt / io.CONFIG_FILE, out / io.CONFIG_FILE)
    return out


def _meta_model(ckpt: Path) -> nn.Module:
    # (its generation_config.json read: the fallback's save_pretrained writes it)
    return fsdp.empty_model(str(ckpt), "auto", option="fastdpo export")


def _export_weights(ckpt: Path, out: Path, tensors: dict) -> None:
    for name in ("config.json", "generation_config.json"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    model = _meta_model(ckpt)
    expected = {name: tuple(t.shape) for name, t in fsdp.model_entries(model, trainable_only=False).items()}
    differ = sorted(set(expected) ^ set(tensors)) or [n for n in expected if expected[n] != tensors[n][1]]
    if differ:  # (never written by fastdpo train: a checkpoint of another model)
        raise ValueError(f"fastdpo export {ckpt}: its tensors are not its config.json's model's "
                         f"({len(differ)} differ, e.g. {differ[0]})")  # fmt: skip
    if whole_fallback(model):  # save_pretrained converts the format back: the whole weights here
        fsdp.materialize(model, torch.device("cpu"))
        with torch.no_grad():
            for name, t in fsdp.model_entries(model, trainable_only=False).items():
                t.copy_(sharded_checkpoint.read_tensor(ckpt, name, *tensors[name]))
        model.save_pretrained(out)
        return
    specs = [(name, dtype, shape) for name, (dtype, shape) in tensors.items()]
    write_safetensors(out, specs, (sharded_checkpoint.read_tensor(ckpt, *spec) for spec in specs))


def _export_adapters(ckpt: Path, out: Path, tensors: dict) -> None:
    import peft

    config = peft.PeftConfig.from_pretrained(ckpt)
    base = _meta_model(ckpt)
    base.name_or_path = base.config._name_or_path = config.base_model_name_or_path  # (what the adapters adapt)
    model = peft.get_peft_model(base, config)
    state = {name: sharded_checkpoint.read_tensor(ckpt, name, *spec) for name, spec in tensors.items()}
    model.save_pretrained(out, state_dict=state)


def main_from_args(args) -> int:
    """``fastdpo export CHECKPOINT OUT``: a mistake is one line on stderr (exit code 2)."""
    import sys
    import warnings

    try:
        with warnings.catch_warnings():  # (transformers' renames, called by peft: nothing to act on)
            warnings.filterwarnings("ignore", r"`\w+` is deprecated and will be removed in v6", FutureWarning)
            out = export(args.checkpoint, args.out)
    except ValueError as e:
        print(f"fastdpo export: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"exported {args.checkpoint} to {out}", flush=True)
    return 0
