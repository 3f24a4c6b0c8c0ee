"""``fastdpo train --fsdp``: the models sharded with FSDP2's ``fully_shard``, and what a sharded
run writes and reads back.

* **Sharding** (:func:`shard`), as docs/distributed.md's FSDP2 recipe: every decoder layer (the
  model's ``_no_split_modules`` classes that sit in an ``nn.ModuleList``), then the root, for
  the policy and, when there is one, the frozen reference (whose root reshards after forward:
  it never runs backward).  Each process loads the whole model first (every process reads the
  same files), so each keeps its own shard of the same weights.  :class:`fastdpo.DPO` keeps the
  fused head on a sharded model.
* **Checkpoints.**  The weights are gathered whole on process 0 (:func:`model_state`, CPU) and
  written by ``save_pretrained`` as in an unsharded run (LoRA: the adapters only); the
  optimizer's state is gathered whole too (:func:`optimizer_state`: keyed by parameter name)
  into ``trainer_state.pt``.  A resumed run loads the weights before sharding and scatters
  the optimizer's state into the fresh shards (:func:`load_optimizer_state`): every element is
  copied, so the run continues bit for bit.

Every function here that gathers or scatters is a collective: every process calls it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.wrappers import inner_model


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
    """``fully_shard`` each decoder layer, then the root, of ``policy`` and ``reference`` over
    every process (one mesh dimension)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    for model in (policy, reference):
        if model is None:
            continue
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        # A root keeps its parameters gathered after forward, for backward to reshard; the
        # reference never runs backward, so its root reshards right away.
        fully_shard(model, mesh=mesh, **({"reshard_after_forward": True} if model is reference else {}))


def sharded(model: nn.Module) -> bool:
    """Whether ``model`` went through :func:`shard` (``fully_shard`` at its root)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """A sharded ``model``'s whole weights (the trainable ones only: a LoRA policy's adapters),
    on the CPU, on process 0 (an empty dict elsewhere), under the names ``model.state_dict()``
    gives; None for a model not sharded (``save_pretrained`` reads its own)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not sharded(model):
        return None
    return get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=trainable_only))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """``opt``'s whole state: of a sharded ``model``'s optimizer, each parameter's by its name,
    on the CPU, on process 0 (an empty dict elsewhere); else ``opt.state_dict()``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not sharded(model):
        return opt.state_dict()
    return get_optimizer_state_dict(model, opt, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load :func:`optimizer_state`'s ``state`` (which every process read) into ``opt``, a fresh
    optimizer of ``model``'s parameters: of a sharded model, each process keeps its shard of
    every tensor."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not sharded(model):
        return opt.load_state_dict(state)
    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=_options())
