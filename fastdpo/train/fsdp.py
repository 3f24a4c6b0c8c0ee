"""``fastdpo train --fsdp``: the models built empty, sharded with FSDP2's ``fully_shard``, and
filled shard by shard, so that no process ever holds a whole model.

* **Building** (:func:`empty_model`): the model's class from its ``config.json``, its
  parameters on the meta device (no memory), its buffers real (computed in ``__init__``, as
  rotary ``inv_freq``: the meta device would leave them garbage).  LoRA adapters are added to
  the empty model; their initial values, drawn on the CPU as in one process, are kept by name
  (:func:`new_parameters`, :func:`initial_values`).  The reference of a full fine-tuning run is
  the DPO module's frozen copy of the empty policy (LoRA's is the policy with its adapters off).
* **Sharding** (:func:`shard`), as docs/distributed.md's FSDP2 recipe: every decoder layer (the
  model's ``_no_split_modules`` classes that sit in an ``nn.ModuleList``), then the root (the
  reference's root reshards after forward: it never runs backward).  Then each process
  allocates its shards (:func:`materialize`).
* **Filling** (:func:`load_pretrained`): each process reads its own slices of the
  ``save_pretrained`` safetensors files (``torch.distributed.checkpoint``'s
  ``HuggingFaceStorageReader``, into the DTensor parameters in place, at most
  :data:`READ_CHUNK_BYTES` copied at a time).  Where the files' names
  are not the model's (transformers converts some formats on load, e.g. MoE experts), process
  0 reads the model whole with ``from_pretrained`` and ``set_model_state_dict(...,
  broadcast_from_rank0=True)`` sends each process its shards.

Checkpoints of a sharded run are :mod:`fastdpo.train.sharded_checkpoint`'s; its final model is
written by :mod:`fastdpo.train.export`.  Every function here that reads into a sharded model is
a collective: every process calls it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..models.wrappers import inner_model

# The most a process copies from the weights files at a time (its shards are read in pieces).
READ_CHUNK_BYTES = 16 * 2**20


def check(fsdp: bool, world: int, packing: str) -> None:
    """One-line refusals of what ``--fsdp`` cannot do (nothing to check without it)."""
    if not fsdp:
        return
    if world < 2:
        raise ValueError(
            "--fsdp shards the model over the processes torchrun starts (WORLD_SIZE > 1): run under "
            "torchrun --nproc-per-node N, or leave --fsdp off"
        )
    if packing == "auto":
        # 'auto' decides per batch whether to pack, and checks the model on the first batch it
        # packs: one process would run forwards the other does not, and each forward of a
        # sharded model is a collective.
        raise ValueError("--fsdp with --packing auto: each process decides per batch whether to pack, and the "
                         "processes must run the same forwards; pass --packing pair or batch (or none)")  # fmt: skip


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (under ``peft``/``torch.compile``
    wrappers): the modules of its ``_no_split_modules`` classes that are entries of an
    ``nn.ModuleList`` (``model.layers[i]`` for Llama); a one-line ``ValueError`` if none."""
    lm = inner_model(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [child for m in lm.modules() if isinstance(m, nn.ModuleList)
              for child in m if type(child).__name__ in names]  # fmt: skip
    if not layers:
        raise ValueError(f"--fsdp: found no decoder layers to shard in {type(lm).__name__} (no module list of "
                         f"its _no_split_modules classes {sorted(names)})")  # fmt: skip
    return layers


def shard(policy: nn.Module, reference: nn.Module | None, device: torch.device) -> None:
    """``fully_shard`` each decoder layer, then the root (resharding after forward), of
    ``policy`` and ``reference`` over every process (one mesh dimension)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for model in (policy, reference):
        if model is None:
            continue
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        # The root (the embedding, the final norm, the head) reshards after forward, the policy's
        # too (FSDP2 would keep a root gathered for backward): the fused head gathers its weight
        # itself (models.base.live_weight; its gradient reduce-scattered as soon as the head's
        # backward made it), and backward gathers the root again for the embedding only at its
        # end.  Kept gathered, the embedding, the head and both their whole gradients sat on
        # every process through backward, with the reduce-scatter's copy of them: measured, two
        # steps' peak at 4 processes fell from 4473 to 3797 MiB, with the reference's gathered head
        # scored first (modules/dpo.py; docs/distributed.md, benchmarks/fsdp_startup_memory.py).
        fully_shard(model, mesh=mesh, reshard_after_forward=True)


def sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard` (``fully_shard`` at its root)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Every group of sharded ``model`` back to its shards, what a checkpoint reads and the
    optimizer takes (a no-op after :func:`shard`'s forwards, whose roots reshard; a root sharded
    otherwise keeps its group gathered after a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ----------------------------------------------------------------------------- building empty


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device, buffers stay where they are
    made (accelerate's ``init_empty_weights(include_buffers=False)``, through torch's public
    parameter-registration hook rather than a patched ``register_parameter``)."""

    def to_meta(module, name, param):
        if param is None or param.device.type == "meta":
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def torch_dtype(config, dtype: str) -> torch.dtype:
    """The parameters' dtype for ``--dtype`` (``"auto"``: the config's, else float32, as
    ``from_pretrained`` reads it)."""
    from .io import DTYPES

    if dtype != "auto":
        return DTYPES[dtype]
    given = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(given, str):
        given = getattr(torch, given, None)
    return given if isinstance(given, torch.dtype) else torch.float32


def empty_model(path: str, dtype: str, option: str = "--model") -> nn.Module:
    """``AutoModelForCausalLM`` of the directory's ``config.json``, its parameters on the meta
    device (of ``dtype``), its buffers computed, its ``generation_config.json`` read; its
    weights are read after sharding.  Refused in one line naming ``option`` and ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .io import first_line

    try:
        config = AutoConfig.from_pretrained(path)
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(config, dtype))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{option} {path}: cannot build it as a causal LM ({first_line(e)})") from None
    if model.can_generate():  # the directory's generation_config.json, as from_pretrained reads it
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # none: the one from_config made from the model's config
            pass
    return model


def base_names(model: nn.Module) -> dict[int, str]:
    """Each module of ``model`` (a transformers model, before peft wraps it) by identity ->
    its name in it: what its parameters are called in the ``save_pretrained`` files, however
    peft or FSDP2 rename them later."""
    return {id(m): name for name, m in model.named_modules()}


@contextmanager
def new_parameters() -> Iterator[list]:
    """The ``(module, name, parameter)`` of every parameter registered inside, as registered
    (the parameter object keeps the values its initializer wrote, after peft moves its module
    to the meta device of the layer it adapts)."""
    found: list = []

    def record(module, name, param):
        if param is not None:
            found.append((module, name, param))

    handle = nn.modules.module.register_module_parameter_registration_hook(record)
    try:
        yield found
    finally:
        handle.remove()


def initial_values(model: nn.Module, found: list) -> dict[str, torch.Tensor]:
    """Of :func:`new_parameters`' ``found``, the values of those that are ``model``'s meta
    parameters now, by their name in ``model``."""
    names = {id(m): name for name, m in model.named_modules()}
    out = {}
    for module, name, param in found:
        now = getattr(module, name, None)
        if isinstance(now, nn.Parameter) and now.device.type == "meta" and id(module) in names:
            out[_joined(names[id(module)], name)] = param.detach()
    return out


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate ``model``'s shards (uninitialized) on ``device``; its buffers keep their values
    (``to_empty`` would leave them garbage)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


# ----------------------------------------------------------------------------- filling


def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def model_entries(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """``model``'s tensors by name, each once (a tied weight under its first name): its
    parameters (those that train only, with ``trainable_only``: LoRA's adapters) and, unless
    ``trainable_only``, its persistent buffers.  Sharded, they are the DTensors themselves: a
    checkpoint reads into them in place."""
    out = {name: p for name, p in model.named_parameters() if not trainable_only or p.requires_grad}
    if not trainable_only:  # (named_parameters and named_buffers name a tied tensor once)
        persistent = {_joined(mod_name, name) for mod_name, m in model.named_modules()
                      for name in m._buffers if name not in m._non_persistent_buffers_set}  # fmt: skip
        out |= {name: b for name, b in model.named_buffers() if name in persistent}
    return out


def _file_names(model: nn.Module, names: dict[int, str]) -> dict[str, str]:
    """``model``'s parameters and persistent buffers (each once) -> their names in the
    ``save_pretrained`` files (:func:`base_names`), for those of the base model (not LoRA's)."""
    out, seen = {}, set()
    for mod_name, m in model.named_modules():
        if id(m) not in names:
            continue
        tensors = [(n, t) for n, t in m._parameters.items() if t is not None]
        tensors += [(n, t) for n, t in m._buffers.items() if t is not None and n not in m._non_persistent_buffers_set]
        for n, t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out[_joined(mod_name, n)] = _joined(names[id(m)], n)
    return out


def load_pretrained(model: nn.Module, path: str, names: dict[int, str]) -> str:
    """Fill sharded ``model``'s base weights from the ``save_pretrained`` directory ``path``
    (``names``: :func:`base_names` of the model as built); returns how ("sharded read" or
    "broadcast from process 0").  Buffers the files lack keep their values."""
    import torch.distributed.checkpoint as dcp

    mine = dict(model.named_parameters()) | dict(model.named_buffers())
    wanted = _file_names(model, names)
    files = _chunked_reader(path).read_metadata().state_dict_metadata
    params = {n for n, _ in model.named_parameters()}
    if all(wanted[n] in files and tuple(files[wanted[n]].size) == tuple(mine[n].shape) for n in wanted if n in params):
        dcp.load({wanted[n]: mine[n] for n in wanted if wanted[n] in files}, storage_reader=_chunked_reader(path))
        return "sharded read"
    _broadcast_pretrained(model, path, wanted)
    return "broadcast from process 0"


def _chunked_reader(path: str):
    """``HuggingFaceStorageReader`` of ``path`` whose reads copy at most ``READ_CHUNK_BYTES``
    at a time, each from a fresh mapping of the file: its own map the file once per read and
    keep every page of a process's slices resident until the read ends (measured: the
    start-up peak of 4 processes grew by the largest tensor's slice)."""
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.futures import Future

    class ChunkedReader(HuggingFaceStorageReader):
        def read_data(self, plan, planner):
            for req in plan.items:
                file = self.storage_data[req.storage_index].relative_path  # (what the reader's metadata names)
                target = planner.resolve_tensor(req).detach()
                name, offsets, lengths = req.storage_index.fqn, req.storage_offsets, req.lengths
                rows = lengths[0] if len(lengths) else 1
                step = max(1, READ_CHUNK_BYTES // max(1, target[0].numel() * target.element_size())) if len(lengths) else 1
                for start in range(0, rows, step):
                    n = min(step, rows - start)
                    with safe_open(file, framework="pt") as f:
                        if not len(lengths):
                            target.copy_(f.get_tensor(name))
                            continue
                        rest = tuple(slice(o, o + k) for o, k in zip(offsets[1:], lengths[1:]))
                        target[start:start + n].copy_(f.get_slice(name)[(slice(offsets[0] + start, offsets[0] + start + n), *rest)])
                planner.commit_tensor(req, target)
            done: Future = Future()
            done.set_result(None)
            return done

    return ChunkedReader(str(path))


def _broadcast_pretrained(model: nn.Module, path: str, wanted: dict[str, str]) -> None:
    # The files' names are not the model's (a format transformers converts on load): process 0
    # loads the model whole, and sends each process its shards.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    state = {}
    if torch.distributed.get_rank() == 0:
        from .io import load_model

        dtype = next(iter(model.parameters())).dtype
        whole = load_model(path, str(dtype).removeprefix("torch.")).state_dict()
        state = {n: whole[f] for n, f in wanted.items() if f in whole}
        del whole
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state, options=options)


def load_whole(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` (whole tensors by name, the same on every process: LoRA's initial
    adapters) into sharded ``model``'s shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(model, values, options=StateDictOptions(full_state_dict=True, strict=False))


def model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """A sharded ``model``'s whole weights (the trainable ones only: a LoRA policy's adapters,
    small), on the CPU, on process 0 (an empty dict elsewhere), under the names
    ``model.state_dict()`` gives; None for a model not sharded (``save_pretrained`` reads its
    own)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    if not sharded(model):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)
