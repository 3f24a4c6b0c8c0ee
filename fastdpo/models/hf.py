"""Hugging Face ``transformers`` causal LMs (and ``peft`` models around them): the adapter.

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
  (Cohere, Granite), cap them with a tanh (Gemma 2 and 3: the fold caps them, in float32, and
  differentiates through the cap), add a bias (Phi's ``lm_head``: added by the product, its
  gradient the column sums of the logits' gradient).  The classes in
  :data:`HEAD_RULES` had their forwards read and their fused scores are tested against their
  own logits.  Any other causal LM whose output embedding is a plain bias-free linear layer
  gets a head inferred from its config (:func:`inferred_head`: ``logit_scale``,
  ``logits_scaling``, ``final_logit_softcapping``), which its first call checks against the
  model's own logits on a slice of the real batch (:func:`fastdpo.scoring.router.check_head`):
  equal to rounding, it is fused from then on; different, the logits route, with the reason.
* **Padding.**  A batch without padding before a real token (right padding, or none) runs as
  the ids alone: no attention mask, and causality hides the padding after the real tokens.  A
  batch with some (left padding, the default of tokenizers made for generation, or padding on
  both sides) gets ``attention_mask`` (1 on the inputs' real tokens) and ``position_ids``
  (``cumsum - 1``, clamped at 0, as ``generate`` makes them) on both routes, so the real tokens'
  hidden states are the right-padded batch's (with ``mask_alignment="target"``; the input
  alignment refuses it: :func:`fastdpo.batching.batch.model_padding`).  Padding between real tokens is
  an error (:func:`left_padded`).
* **Packed pairs** go in as ``position_ids``; the model attends by parts of the layout
  (:mod:`fastdpo.batching.attention`, registered as an attention implementation with transformers'
  ``AttentionInterface`` for the packed call; sliding windows too), or, as the fallback, through
  a 4-D additive ``attention_mask`` (``eager`` and ``sdpa`` attention without a sliding window).
* **PEFT** models are seen through (:mod:`fastdpo.models.wrappers`): the adapters run inside
  the layers, the reference is the same model with them disabled.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .._checks import YES, Verdict, no
from ..batching.sequence_parallel import by_parts
from ..batching.batch import Padding
from .base import LinearHead, ModelAdapter, check_weight, logits_of
from .wrappers import inner_model, model_class

if TYPE_CHECKING:
    from ..batching.packing import PackedLayout

# -------------------------------------------------------------------------------- recognizing


def causal_lm(model: nn.Module) -> nn.Module | None:
    """The ``transformers.PreTrainedModel`` inside ``model`` (through torch.compile and peft),
    or None when ``model`` is not a Hugging Face model."""
    transformers = sys.modules.get("transformers")
    cls = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    inner = inner_model(model)
    return inner if cls is not None and isinstance(inner, cls) else None


# -------------------------------------------------------------------------------- heads


# A head rule maps a model to its logits transform: (scale or None, softcap or None).
Transform = tuple[float | None, float | None]


def _plain(model: nn.Module) -> Transform:
    return None, None


def _softcap(model: nn.Module) -> Transform:
    # Gemma2/3ForCausalLM: logits = tanh(logits / cap) * cap when final_logit_softcapping is set
    return None, _number(getattr(_text_config(model), "final_logit_softcapping", None))


def _times_logit_scale(model: nn.Module) -> Transform:
    return float(model.logit_scale), None  # CohereForCausalLM: logits * self.logit_scale


def _over_logits_scaling(model: nn.Module) -> Transform:
    # GraniteForCausalLM: logits / config.logits_scaling (fastdpo multiplies by the reciprocal:
    # the same logits to float rounding)
    return 1.0 / float(model.config.logits_scaling), None


# Causal LM classes whose forward is ``logits = post(lm_head(base_model(...).last_hidden_state))``
# with the ``post`` below (read in transformers 5.24), each tested against the model's own
# logits in tests/test_hf.py.
HEAD_RULES: dict[str, Callable[[nn.Module], Transform]] = {
    "LlamaForCausalLM": _plain,
    "MistralForCausalLM": _plain,
    "Qwen2ForCausalLM": _plain,
    "Qwen3ForCausalLM": _plain,
    "GemmaForCausalLM": _plain,
    "Gemma2ForCausalLM": _softcap,
    "Gemma3ForCausalLM": _softcap,
    "Phi3ForCausalLM": _plain,
    "PhiForCausalLM": _plain,  # lm_head with a bias
    "Olmo2ForCausalLM": _plain,
    "GPT2LMHeadModel": _plain,
    "CohereForCausalLM": _times_logit_scale,
    "GraniteForCausalLM": _over_logits_scaling,
}


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def inferred_head(lm: nn.Module) -> tuple[Transform, str]:
    """``((scale, softcap), claim)`` for a causal LM whose forward fastdpo has not read: the
    logits transform its config names, as transformers' classes use the keys (``logit_scale``:
    a product, Cohere's, read from the model or its config; ``logits_scaling``: a division,
    Granite's; ``final_logit_softcapping``: ``tanh(logits / cap) * cap`` after them, Gemma
    2's).  A claim only: the first call checks it (:func:`fastdpo.scoring.router.check_head`)."""
    config = _text_config(lm)
    scale, expr, keys = None, "lm_head(hidden)", []
    times = _number(getattr(lm, "logit_scale", None))
    times = times if times is not None else _number(getattr(config, "logit_scale", None))
    if times is not None:
        scale, expr, keys = times, f"{expr} * {times:g}", keys + ["logit_scale"]
    over = _number(getattr(config, "logits_scaling", None))
    if over is not None:
        scale, expr, keys = (scale or 1.0) / over, f"{expr} / {over:g}", keys + ["logits_scaling"]
    cap = _number(getattr(config, "final_logit_softcapping", None))
    if cap is not None:
        expr, keys = f"tanh({expr} / {cap:g}) * {cap:g}", keys + ["final_logit_softcapping"]
    claim = f"logits = {expr}" + (f" ({', '.join(keys)})" if keys else "")
    return (scale, cap), claim


def find_head(lm: nn.Module) -> tuple[LinearHead | None, str]:
    """The fusable head of a Hugging Face causal LM ``lm`` (what :func:`causal_lm` found), or
    ``(None, reason)``: a class of :data:`HEAD_RULES` as its rule says; any other with the
    head :func:`inferred_head` claims, to be checked on its first call."""
    cls = model_class(lm)
    name = cls.__name__
    rule = HEAD_RULES.get(name) if cls.__module__.startswith("transformers.models.") else None
    head = lm.get_output_embeddings()
    if model_class(head) is not nn.Linear:
        return None, f"its output embedding is a {type(head).__name__}, not a plain nn.Linear"
    usable = check_weight(head.weight)
    if usable and head.bias is not None:
        usable = check_weight(head.bias)
    if not usable:
        return None, usable.why_not
    biased = head.bias is not None
    if _backbone(lm) is None:
        return None, "it has no separate backbone (base_model, get_decoder()) to run for its hidden states"
    if rule is not None:
        scale, cap = rule(lm)
        if cap is not None and not cap > 0:
            return None, f"its final_logit_softcapping is {cap:g}, not a cap > 0"
        return LinearHead(head.weight, scale, head, softcap=cap, has_bias=biased), ""
    (scale, cap), claim = inferred_head(lm)
    if cap is not None and not cap > 0:
        return None, f"its final_logit_softcapping is {cap:g}, not a cap > 0"
    claim = f"{claim}, inferred for a {name} (not in HEAD_RULES)"
    return LinearHead(head.weight, scale, head, inferred=claim, softcap=cap, has_bias=biased), ""


# -------------------------------------------------------------------------------- calls


def _backbone(lm: nn.Module) -> nn.Module | None:
    """The module a causal LM's forward runs before its head: ``base_model``, or, where a
    class's ``base_model_prefix`` does not name it (Gemma 3 in transformers 4.x),
    ``get_decoder()``."""
    body = lm.base_model
    if body is lm:
        body = lm.get_decoder()
    return None if body is lm else body


class _Hooks:
    """Forward hooks, registered once on a causal LM's backbone and head, that act only while
    armed: keep the backbone's output; hand the head's (empty) input on as its output, so the
    forward's "logits" are a zero-width slice of the hidden states and the head's product
    takes no part in autograd."""

    def __init__(self):
        self.armed = False
        self.out = None
        # (backbone, head) hooked, held weakly: this entry of the weak-keyed _hooks must not keep
        # its model alive (under FSDP2 the backbone reaches the root through its groups)
        self.on: tuple[weakref.ref, weakref.ref] | None = None
        self.handles: list = []

    def attach(self, body: nn.Module, head: nn.Module) -> None:
        """Hook ``body`` and ``head`` (again, if other modules were swapped in since)."""
        if self.on is not None and self.on[0]() is body and self.on[1]() is head:
            return
        for h in self.handles:
            h.remove()
        self.handles = [body.register_forward_hook(self.backbone), head.register_forward_hook(self.head)]
        self.on = (weakref.ref(body), weakref.ref(head))

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


def hidden_states(model: nn.Module, lm: nn.Module, src: Tensor, outputs: list | None = None, **kwargs) -> Tensor:
    """What a Hugging Face causal LM ``lm`` (inside ``model``, its wrappers) feeds its
    ``lm_head`` for ``src``: its backbone's ``last_hidden_state``.

    The model's own forward runs (so do the hooks of whatever wraps it: FSDP2's root, peft),
    asked for the logits of no position (``logits_to_keep`` an empty index tensor); hooks on
    the backbone and the head (:class:`_Hooks`) keep the hidden states and skip the head's
    product, and the hidden states stay tied to the forward's output (:class:`_Anchor`).  A
    class whose forward takes no ``logits_to_keep`` gets its backbone called directly.  The
    backbone and head are looked up at every call, so modules swapped in later are the ones
    that run.  ``outputs``, when given, receives the forward's output (its ``aux_loss``).
    """
    body = _backbone(lm)
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        if outputs is not None:
            raise NotImplementedError(f"the forward of {type(lm).__name__} takes no logits_to_keep: its output is not run")
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
    if outputs is not None:
        outputs.append(out)
    hidden, anchor = _last_hidden(hidden), logits_of(out)
    return _Anchor.apply(hidden, anchor) if anchor.requires_grad else hidden


# -------------------------------------------------------------------------------- padding


def left_padded(name: str, mask: Tensor | None) -> bool:
    """Whether ``mask`` (True = a real token) has padding before a real token in some row
    (left padding: the model must then get an attention mask and positions); raise unless
    every row's real tokens are contiguous (padding before them, after them, or both).

    With right padding alone a causal model's real tokens never see the padding after them, so
    the model gets the ids alone and scores the unpadded sequences.  Padding before a real token
    would be attended to and shift its position unless the model is told (:class:`Padding`);
    padding between real tokens (a hole) would shift the positions of the tokens after it even
    then.  One host sync, to choose the call.
    """
    if mask is None or mask.shape[1] < 2:
        return False
    starts = mask[:, 1:] & ~mask[:, :-1]  # a real token right after padding
    runs = starts.sum(1) + mask[:, 0]  # runs of real tokens in each row
    hole, left = torch.stack(((runs > 1).any(), starts.any())).tolist()
    if hole:
        row = int((runs > 1).nonzero()[0])
        raise ValueError(
            f"{name} has padding between real tokens (row {row}): a Hugging Face model takes padding "
            f"before a sequence's real tokens (left), after them (right) or both, not inside it (with "
            f"pad_id, a pad id inside a sequence is padding)"
        )
    return bool(left)


# -------------------------------------------------------------------------------- packing


def _text_config(lm: nn.Module):
    return lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config


def router_support(lm: nn.Module) -> tuple[bool, float]:
    """(whether the model returns its MoE router's load-balancing loss, ``aux_loss``, when asked
    with ``output_router_logits``; its config's ``router_aux_loss_coef``, 0.0 when it declares
    none), as TRL 1.16's trainers read them: from the text config, ``output_router_logits``
    present at all."""
    config = _text_config(lm)
    return hasattr(config, "output_router_logits"), float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def packing_support(lm: nn.Module) -> Verdict:
    """Whether a Hugging Face causal LM can run packed pairs at all: their positions go in as
    ``position_ids``."""
    params = inspect.signature(lm.forward).parameters
    if "attention_mask" not in params or "position_ids" not in params:
        return no("its forward takes no attention_mask and position_ids")
    return YES


def dense_support(lm: nn.Module) -> Verdict:
    """Whether the dense mask can carry packed pairs: it goes in as a 4-D additive
    ``attention_mask`` (used as it is since transformers 4.44) by eager or SDPA attention, which
    a sliding window would replace."""
    config = _text_config(lm)
    impl = getattr(config, "_attn_implementation", None) or getattr(lm.config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return no(f"its attention implementation {impl!r} takes no 4-D mask (use 'sdpa' or 'eager')")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        return no(f"it uses sliding-window attention (sliding_window={window}), which a 4-D mask would replace")
    return YES


def segments_support(lm: nn.Module) -> Verdict:
    """Whether attention by parts can stand in for the model's attention: it computes softmax
    attention with a scale, grouped or not, causal, optionally within a sliding window; a tanh
    cap on the scores or attention sinks it does not reproduce."""
    config = _text_config(lm)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return no(f"it caps its attention scores with a tanh (attn_logit_softcapping={config.attn_logit_softcapping})")
    if any("sink" in name for name, _ in lm.named_parameters()):
        return no("its attention has learned sinks")
    return YES


# The attention implementation a packed call runs under (transformers' AttentionInterface), and
# the layout it attends by parts: set for the duration of the call (_attending_by_parts).
ATTENTION_NAME = "fastdpo_parts"
_by_parts: contextvars.ContextVar = contextvars.ContextVar("fastdpo_parts", default=None)


def _attention_by_parts(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        sliding_window=None, softcap=None, **kwargs):
    """An ``AttentionInterface`` function: (out (R, T, H, d), None) as SDPA's returns them."""
    parts = _by_parts.get()
    if parts is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside fastdpo's packed calls")
    if softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention by parts reproduces no score cap and no attention sinks")
    heads = query.shape[1]
    if key.shape[1] != heads:  # grouped queries: transformers repeats each kv head in place
        key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = parts(query, key, value, scale=scale, dropout_p=dropout, window=sliding_window)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def _attending_by_parts(lm: nn.Module, layout: PackedLayout) -> Iterator[None]:
    """``lm`` attends by parts of ``layout`` (or of one process's share of it, a
    :class:`~fastdpo.batching.sequence_parallel.ShardedLayout`) for the duration: its attention implementation
    switched to :data:`ATTENTION_NAME` (registered with transformers once) and back; a layer
    under gradient checkpointing attends by parts again when backward recomputes it
    (:func:`_recomputing_by_parts`)."""
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention_by_parts)
    parts = by_parts(layout)
    with _by_parts_in(lm, parts), _recomputing_by_parts(lm, parts):
        yield


@contextmanager
def _by_parts_in(lm: nn.Module, parts) -> Iterator[None]:
    config = lm.config
    before = config._attn_implementation
    token = _by_parts.set(parts)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = before
        _by_parts.reset(token)


@contextmanager
def _recomputing_by_parts(lm: nn.Module, parts) -> Iterator[None]:
    """For the duration, each checkpointed layer of ``lm`` (transformers' gradient checkpointing,
    which recomputes a layer's forward in backward, after the call has returned and the
    attention switched back) gets a checkpoint function whose recompute attends by ``parts``:
    otherwise the recompute would attend across the packed segments (the number of saved
    tensors would differ, or worse, not).  Whatever checkpoint function the user enabled
    (reentrant or not, offloading) still runs."""
    swapped = []
    for module in lm.modules():
        checkpoint = module.__dict__.get("_gradient_checkpointing_func")
        if checkpoint is None or not getattr(module, "gradient_checkpointing", False):
            continue

        def by_parts(function, *args, _checkpoint=checkpoint, **kwargs):
            def again(*a, **kw):
                with _by_parts_in(lm, parts):
                    return function(*a, **kw)

            return _checkpoint(again, *args, **kwargs)

        module._gradient_checkpointing_func = by_parts
        swapped.append((module, checkpoint))
    try:
        yield
    finally:
        for module, checkpoint in swapped:
            module._gradient_checkpointing_func = checkpoint


# -------------------------------------------------------------------------------- the adapter


class HFAdapter(ModelAdapter):
    """A ``transformers`` causal LM, or a ``torch.compile`` / ``peft`` wrapper around one."""

    family = "hf"

    def __init__(self, model: nn.Module, lm: nn.Module):
        super().__init__(model)
        self.lm = lm  # the PreTrainedModel under the wrappers

    @classmethod
    def adapt(cls, model: nn.Module) -> HFAdapter | None:
        lm = causal_lm(model)
        return cls(model, lm) if lm is not None else None

    def head(self) -> tuple[LinearHead | None, str]:
        return find_head(self.lm)

    def vocab_size(self) -> int | None:
        emb = self.lm.get_input_embeddings()
        return emb.num_embeddings if isinstance(emb, nn.Embedding) else None

    def check_padding(self, name: str, mask: Tensor | None) -> bool:
        left = left_padded(name, mask)
        supported = packing_support(self.lm)
        if left and not supported:
            raise ValueError(f"{name} has padding before a real token, which a {type(self.lm).__name__} "
                             f"cannot be told of: {supported.why_not}; pad at the end")
        return left

    def can_pack(self) -> Verdict:
        return packing_support(self.lm)

    def can_take_dense_mask(self) -> Verdict:
        return dense_support(self.lm)

    def can_attend_by_parts(self) -> Verdict:
        return segments_support(self.lm)

    def _run(self, call, tokens: Tensor, layout: PackedLayout | None, padding: Padding | None) -> Tensor:
        if layout is None:  # (right padding, or none: the ids alone)
            return call(tokens) if padding is None else call(tokens, attention_mask=padding.mask, position_ids=padding.pos)
        if layout.attention == "segments":
            with _attending_by_parts(self.lm, layout):
                return call(tokens, position_ids=layout.pos)
        mask = layout.additive_mask(next(self.lm.parameters()).dtype)
        return call(tokens, attention_mask=mask, position_ids=layout.pos)

    def router(self) -> tuple[bool, float]:
        return router_support(self.lm)

    def _routed(self, run, tokens: Tensor, padding: Padding, aux: list) -> Tensor:
        """``run(tokens, outputs, **kwargs)`` asked for the router's load-balancing loss as TRL
        asks: ``output_router_logits`` and the attention mask of the real tokens (with their
        positions); the forward's ``aux_loss`` goes into ``aux``."""
        outputs: list = []
        out = run(tokens, outputs, attention_mask=padding.mask, position_ids=padding.pos, output_router_logits=True)
        value = getattr(outputs[0], "aux_loss", None) if outputs else None
        if not isinstance(value, Tensor):
            raise RuntimeError(f"{type(self.lm).__name__} returned no aux_loss tensor with output_router_logits=True")
        aux.append(value)
        return out

    def hidden(self, tokens: Tensor, layout: PackedLayout | None = None, padding: Padding | None = None,
               aux: list | None = None) -> Tensor:
        if aux is not None:
            return self._routed(lambda t, o, **kw: hidden_states(self.model, self.lm, t, o, **kw), tokens, padding, aux)
        return self._run(lambda t, **kw: hidden_states(self.model, self.lm, t, **kw), tokens, layout, padding)

    def logits(self, tokens: Tensor, layout: PackedLayout | None = None, padding: Padding | None = None,
               aux: list | None = None) -> Tensor:
        def call(t, outputs=None, **kw):
            out = self.model(input_ids=t, use_cache=False, **kw)
            if outputs is not None:
                outputs.append(out)
            return logits_of(out)

        if aux is not None:
            return self._routed(call, tokens, padding, aux)
        return self._run(call, tokens, layout, padding)
