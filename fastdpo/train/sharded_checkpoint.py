"""Checkpoints of a sharded run (``fastdpo train --fsdp``): ``torch.distributed.checkpoint``
(DCP), written by every process in parallel, each its own shards, and read back onto the same
or another number of processes.

``checkpoint-N/`` holds:

* DCP's files: ``.metadata`` and one ``__R_0.distcp`` per process R, of these entries:
  ``model`` (the policy's tensors by name, :func:`fastdpo.train.fsdp.model_entries`: LoRA's
  adapters only), ``optimizer`` (AdamW's state by parameter name,
  ``get_optimizer_state_dict``: sharded as the parameters), ``trainer`` (the run's state:
  step, data position, scheduler, loss scaler, precomputed reference scores, the number of
  processes and pairs per micro-batch) and ``rng.R`` (process R's RNG states).  No process
  gathers anything: each writes its own shards and entries (DCP keeps one copy of an entry
  every process holds alike, as ``trainer``).
* ``config.json`` (and ``generation_config.json``; LoRA: ``adapter_config.json``), the
  tokenizer, ``fastdpo_train.json`` and ``metrics.jsonl``, which process 0 writes.
* ``complete.json``, written last by process 0: every other file and its size.  The directory
  is written as ``checkpoint-N.tmp`` and renamed; a checkpoint without ``complete.json``, or
  whose files are not the sizes it lists, is refused by name (:func:`check_complete`).

A resumed run reads its shards of ``model`` and ``optimizer`` from the DCP files (DCP reshards:
another number of processes reads the slices it now owns) and process R the RNG states of
process R of the run that wrote it (modulo its number of processes).
"""

from __future__ import annotations

import io as bytes_io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from . import fsdp
from .io import COMPLETE_FILE

DCP_METADATA = ".metadata"


def _packed(obj) -> bytes:
    buf = bytes_io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpacked(data: bytes):
    return torch.load(bytes_io.BytesIO(data), weights_only=True)


def is_sharded(path: Path) -> bool:
    """Whether the directory holds a sharded checkpoint (complete or not)."""
    return (path / COMPLETE_FILE).is_file() or (path / DCP_METADATA).is_file() or any(path.glob("*.distcp"))


def save(where: Path, policy: nn.Module, opt: torch.optim.Optimizer, lora: bool, trainer: dict, rng: dict) -> None:
    """DCP's part of the checkpoint in ``where``: this process's shards of the policy (LoRA:
    the adapters) and of the optimizer's state, ``trainer`` (the same on every process) and
    this process's ``rng``.  A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    rank = torch.distributed.get_rank()
    fsdp.reshard(policy)
    state = {
        "model": fsdp.model_entries(policy, trainable_only=lora),
        "optimizer": get_optimizer_state_dict(policy, opt),
        "trainer": _packed(trainer),
        f"rng.{rank}": _packed(rng),
    }
    dcp.save(state, checkpoint_id=str(where))


def mark_complete(where: Path) -> None:
    """``complete.json``: every file of the checkpoint and its size (process 0, last)."""
    files = {p.name: p.stat().st_size for p in sorted(where.iterdir()) if p.is_file() and p.name != COMPLETE_FILE}
    (where / COMPLETE_FILE).write_text(json.dumps({"format": "torch.distributed.checkpoint", "files": files}, indent=1))


def check_complete(path: Path, option: str = "--resume") -> None:
    """A one-line ``ValueError`` naming the checkpoint (and the file) unless ``complete.json``
    is there and every file it lists has its size."""
    marker = path / COMPLETE_FILE
    if not marker.is_file():
        raise ValueError(f"{option} {path}: an incomplete checkpoint (no {COMPLETE_FILE}: it was not finished); "
                         f"give an earlier checkpoint")  # fmt: skip
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{option} {path}: an incomplete checkpoint ({COMPLETE_FILE} is unreadable)") from None
    for name, size in files.items():
        p = path / name
        if not p.is_file():
            raise ValueError(f"{option} {path}: an incomplete checkpoint ({name} is missing)")
        if p.stat().st_size != size:
            raise ValueError(f"{option} {path}: an incomplete checkpoint ({name} has {p.stat().st_size} bytes, "
                             f"{COMPLETE_FILE} says {size})")  # fmt: skip


def _load_entries(path: Path, entries: dict) -> dict:
    """Read plain entries (``trainer``, ``rng.R``) of the checkpoint in this process alone."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # (that it reads in one process, even under torchrun: as asked)
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(entries, checkpoint_id=str(path), no_dist=True)
    return entries


def read_trainer(path: Path, rank: int) -> tuple[dict, dict]:
    """(the run's state, the RNG states this process resumes with: process ``rank``'s, modulo
    the number of processes that wrote the checkpoint).  Reads no collective."""
    trainer = _unpacked(_load_entries(path, {"trainer": b""})["trainer"])
    key = f"rng.{rank % trainer['world']}"
    return trainer, _unpacked(_load_entries(path, {key: b""})[key])


def load_model(path: Path, policy: nn.Module, lora: bool) -> None:
    """The checkpoint's policy tensors (LoRA: its adapters) into sharded ``policy``'s shards,
    in place.  A collective."""
    import torch.distributed.checkpoint as dcp

    dcp.load({"model": fsdp.model_entries(policy, trainable_only=lora)}, checkpoint_id=str(path))


def load_optimizer(path: Path, policy: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer state into ``opt`` (fresh, of sharded ``policy``'s
    parameters): each process reads the slices of its shards.  A collective.

    The state's tensors are allocated from the checkpoint's metadata (a tensor of a
    parameter's shape sharded as the parameter, a plain one else: AdamW's step), for DCP to
    read into: ``get_optimizer_state_dict`` would otherwise make them with a step of zero
    gradients, which costs a gradient's memory more (measured)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    names = {id(p): n for n, p in policy.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            prefix = f"optimizer.state.{names[id(p)]}."
            found = {k[len(prefix):]: m for k, m in saved.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
            opt.state[p] = {key: torch.zeros_like(p.detach()) if tuple(m.size) == tuple(p.shape)
                            else torch.zeros(m.size, dtype=m.properties.dtype) for key, m in found.items()}  # fmt: skip
    state = get_optimizer_state_dict(policy, opt)
    dcp.load({"optimizer": state}, checkpoint_id=str(path))
    set_optimizer_state_dict(policy, opt, state)


def tensor_names(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The checkpoint's ``model`` tensors: name -> (dtype, whole shape), from DCP's metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k.removeprefix("model."): (m.properties.dtype, tuple(m.size)) for k, m in meta.items()
            if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}  # fmt: skip


def read_tensor(path: Path, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The checkpoint's ``model`` tensor ``name``, whole, read in this process alone."""
    t = torch.empty(shape, dtype=dtype)
    _load_entries(path, {"model": {name: t}})
    return t
