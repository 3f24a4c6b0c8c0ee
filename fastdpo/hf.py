"""Hugging Face ``transformers`` causal LMs and ``peft`` adapters in :class:`fastdpo.DPO`.

Nothing here imports ``transformers`` or ``peft``: a model is recognized as one of theirs only
when the package is already imported (whoever built the model imported it), so fastdpo works,
and imports fast, without them.

* **Calls.**  The logits route calls the model as ``model(input_ids=src, use_cache=False)`` and
  takes ``.logits``.  The fused route calls it the same way with ``logits_to_keep`` set to no
  position, takes the ``last_hidden_state`` of the backbone its forward runs
  (``model.base_model``, or ``get_decoder()``), which is exactly what it feeds its ``lm_head``,
  and fuses ``lm_head``'s product into the scores (:func:`hidden_states`): ``lm_head``'s own
  forward sees no row.
* **Heads.**  A causal LM's forward may do more than ``lm_head(hidden)``: scale the logits
  (Cohere, Granite), cap them with a tanh (Gemma 2 and 3), add a bias.  Only the classes in
  :data:`HEAD_RULES`, whose forwards were read and whose fused scores are tested against their
  own logits, are fused; any other class takes the logits route, with the reason.
* **PEFT.**  A ``peft`` model (LoRA, IA3, ... : adapters injected into the layers) runs as its
  base model with the adapters active; its reference is the same model with the adapters
  disabled (``disable_adapter()``) in eval mode, so no copy of the model is made.
  Prompt-learning adapters (prompt/prefix tuning) change the inputs and are refused.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .heads import LinearHead, check_weight, eval_mode, model_class, unwrap

# -------------------------------------------------------------------------------- recognizing


def peft_model(model: nn.Module) -> nn.Module | None:
    """``model`` (seen through ``torch.compile``) when it is a ``peft.PeftModel``, else None."""
    peft = sys.modules.get("peft")
    cls = getattr(peft, "PeftModel", None) if peft is not None else None
    inner = unwrap(model)
    return inner if cls is not None and isinstance(inner, cls) else None


def check_peft(model: nn.Module) -> None:
    """Raise for the ``peft`` models DPO cannot run: prompt learning prepends virtual tokens."""
    peft = peft_model(model)
    if peft is not None and peft.active_peft_config.is_prompt_learning:
        kind = type(peft.active_peft_config).__name__
        raise ValueError(
            f"fastdpo.DPO does not take prompt-learning peft adapters ({kind}): they prepend "
            f"virtual tokens, so the model's outputs no longer line up with the sequences; "
            f"use a tuner adapter (LoRA, IA3, ...)"
        )


def inner_model(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile`` and ``peft`` wrappers (where the head lives)."""
    peft = peft_model(model)
    return unwrap(peft.get_base_model()) if peft is not None else unwrap(model)


def module_to_call(model: nn.Module) -> nn.Module:
    """What to call for a model that is not a Hugging Face one: itself, or a peft model's base
    model (its adapters injected into the layers), whose forward takes the base model's
    arguments (x-transformers' ``return_embeddings``, ``pos``, ...)."""
    return inner_model(model) if peft_model(model) is not None else model


def causal_lm(model: nn.Module) -> nn.Module | None:
    """The ``transformers.PreTrainedModel`` inside ``model`` (through torch.compile and peft),
    or None when ``model`` is not a Hugging Face model."""
    transformers = sys.modules.get("transformers")
    cls = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    inner = inner_model(model)
    return inner if cls is not None and isinstance(inner, cls) else None


def vocab_rows(model: nn.Module) -> int | None:
    """The number of token ids a Hugging Face model's input embedding accepts."""
    lm = causal_lm(model)
    emb = lm.get_input_embeddings() if lm is not None else None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


# -------------------------------------------------------------------------------- heads


def _plain(model: nn.Module) -> tuple[float | None, str]:
    return None, ""


def _softcap(model: nn.Module) -> tuple[float | None, str]:
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is None:
        return None, ""
    return None, f"it caps its logits with a tanh (final_logit_softcapping={cap}), which fastdpo does not fuse"


def _times_logit_scale(model: nn.Module) -> tuple[float | None, str]:
    return float(model.logit_scale), ""  # CohereForCausalLM: logits * self.logit_scale


def _over_logits_scaling(model: nn.Module) -> tuple[float | None, str]:
    # GraniteForCausalLM: logits / config.logits_scaling (fastdpo multiplies by the reciprocal:
    # the same logits to float rounding)
    return 1.0 / float(model.config.logits_scaling), ""


# Causal LM classes whose forward is ``logits = post(lm_head(base_model(...).last_hidden_state))``
# with the ``post`` below (read in transformers 5.24), each tested against the model's own
# logits in tests/test_hf.py.  A rule returns (scale, "") or (None, why it cannot be fused).
HEAD_RULES: dict[str, Callable[[nn.Module], tuple[float | None, str]]] = {
    "LlamaForCausalLM": _plain,
    "MistralForCausalLM": _plain,
    "Qwen2ForCausalLM": _plain,
    "Qwen3ForCausalLM": _plain,
    "GemmaForCausalLM": _plain,
    "Gemma2ForCausalLM": _softcap,
    "Gemma3ForCausalLM": _softcap,
    "Phi3ForCausalLM": _plain,
    "Olmo2ForCausalLM": _plain,
    "GPT2LMHeadModel": _plain,
    "CohereForCausalLM": _times_logit_scale,
    "GraniteForCausalLM": _over_logits_scaling,
}


def find_head(model: nn.Module) -> tuple[LinearHead | None, str]:
    """The fusable head of a Hugging Face causal LM (``causal_lm(model)`` is not None), or
    ``(None, reason)``."""
    lm = causal_lm(model)
    cls = model_class(lm)
    name = cls.__name__
    rule = HEAD_RULES.get(name) if cls.__module__.startswith("transformers.models.") else None
    if rule is None:
        return None, (
            f"fastdpo has not checked the head of a {name} (the classes it fuses are "
            f"fastdpo.hf.HEAD_RULES)"
        )
    head = lm.get_output_embeddings()
    if model_class(head) is not nn.Linear:
        return None, f"its output embedding is a {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return None, "its output embedding has a bias"
    why = check_weight(head.weight)
    if why:
        return None, why
    if _backbone(lm) is None:
        return None, "it has no separate backbone (base_model, get_decoder()) to run for its hidden states"
    scale, why = rule(lm)
    return (LinearHead(head.weight, scale, head), "") if not why else (None, why)


# -------------------------------------------------------------------------------- calls


def _backbone(lm: nn.Module) -> nn.Module | None:
    """The module a causal LM's forward runs before its head: ``base_model``, or, where a
    class's ``base_model_prefix`` does not name it (Gemma 3 in transformers 4.x),
    ``get_decoder()``."""
    body = lm.base_model
    if body is lm:
        body = lm.get_decoder()
    return None if body is lm else body


def logits_of(out) -> Tensor:
    """A model's logits: its output itself, or the output's ``.logits`` (a ``ModelOutput``)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model must return its logits as a tensor or as an output with a .logits tensor, "
        f"got {type(out).__name__}"
    )


def logits(model: nn.Module, src: Tensor, **kwargs) -> Tensor:
    """A Hugging Face model's (N, T, V) logits of ``src``, without a key/value cache (``kwargs``:
    more forward arguments, e.g. a packed batch's mask and positions)."""
    return logits_of(model(input_ids=src, use_cache=False, **kwargs))


class _Hooks:
    """Forward hooks, registered once on a causal LM's backbone and head, that act only while
    armed: keep the backbone's output; hand the head's (empty) input on as its output, so the
    forward's "logits" are a zero-width slice of the hidden states and the head's product
    takes no part in autograd."""

    def __init__(self):
        self.armed = False
        self.out = None
        self.on: tuple[nn.Module, nn.Module] | None = None  # (backbone, head) hooked
        self.handles: list = []

    def attach(self, body: nn.Module, head: nn.Module) -> None:
        """Hook ``body`` and ``head`` (again, if other modules were swapped in since)."""
        if self.on is not None and self.on[0] is body and self.on[1] is head:
            return
        for h in self.handles:
            h.remove()
        self.handles = [body.register_forward_hook(self.backbone), head.register_forward_hook(self.head)]
        self.on = (body, head)

    def backbone(self, module, args, output):
        if self.armed:
            self.out = output

    def head(self, module, args, output):
        return args[0] if self.armed else None


_hooks: weakref.WeakKeyDictionary[nn.Module, _Hooks] = weakref.WeakKeyDictionary()


def _last_hidden(output) -> Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if isinstance(hidden, Tensor) else output[0]


class _Anchor(torch.autograd.Function):
    """``hidden`` unchanged, made to depend on the model's output ``anchor`` (zero-size): in
    backward the output gets its (empty) gradient, so hooks that wrappers put on a forward's
    outputs run -- FSDP2 gathers a root's parameters again there for the backward of the
    layers it owns (the embedding)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, anchor: Tensor) -> Tensor:
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor):
        shape, dtype, device = ctx.anchor
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def hidden_states(model: nn.Module, src: Tensor, **kwargs) -> Tensor:
    """What a Hugging Face causal LM feeds its ``lm_head`` for ``src``: its backbone's
    ``last_hidden_state``.

    The model's own forward runs (so do the hooks of whatever wraps it: FSDP2's root, peft),
    asked for the logits of no position (``logits_to_keep`` an empty index tensor); hooks on
    the backbone and the head (:class:`_Hooks`) keep the hidden states and skip the head's
    product, and the hidden states stay tied to the forward's output (:class:`_Anchor`).  A
    class whose forward takes no ``logits_to_keep`` gets its backbone called directly.  The
    backbone and head are looked up at every call, so modules swapped in later are the ones
    that run.
    """
    lm = causal_lm(model)
    body = _backbone(lm)
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return _last_hidden(body(input_ids=src, use_cache=False, **kwargs))
    head = lm.get_output_embeddings()
    hooks = _hooks.get(lm)
    if hooks is None:
        hooks = _hooks[lm] = _Hooks()
    hooks.attach(body, head)
    hooks.armed, hooks.out = True, None
    try:
        no_rows = torch.empty(0, dtype=torch.long, device=src.device)
        out = model(input_ids=src, use_cache=False, logits_to_keep=no_rows, **kwargs)
        hidden = hooks.out
    finally:
        hooks.armed, hooks.out = False, None
    if hidden is None:
        raise RuntimeError(f"the forward of {type(lm).__name__} did not run its backbone {type(body).__name__}")
    hidden, anchor = _last_hidden(hidden), logits_of(out)
    return _Anchor.apply(hidden, anchor) if anchor.requires_grad else hidden


# -------------------------------------------------------------------------------- padding


def check_right_padding(name: str, mask: Tensor | None) -> None:
    """Raise unless ``mask`` (True = a real token) is right padding in every row.

    DPO does not give a Hugging Face model an attention mask: with right padding a causal
    model's real tokens never see the padding after them, so the scores are those of the
    unpadded sequences.  Padding before a real token (left padding, or a hole) would be seen by
    that token and shift its position: the scores would change silently, so it is an error.
    """
    if mask is None or mask.shape[1] < 2:
        return
    hole = ~mask[:, :-1] & mask[:, 1:]
    if mask.device.type == "cpu":
        if bool(hole.any()):
            row = int(hole.any(1).nonzero()[0])
            raise ValueError(
                f"{name} has padding before a real token (row {row}): a Hugging Face model gets "
                f"no attention mask from fastdpo.DPO, so only right padding leaves the scores "
                f"unchanged; pad at the end of each sequence"
            )
    else:  # no host sync on accelerators
        torch._assert_async(~hole.any(), f"{name} has padding before a real token; pad at the end")


# -------------------------------------------------------------------------------- reference


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The reference of a ``peft`` policy: the same model, adapters off, in eval mode (every
    module's train/eval flag is restored after)."""
    peft = peft_model(model)
    with eval_mode(peft), peft.disable_adapter():
        yield model
