"""What every preference-loss module shares: :class:`PreferenceModule`.

A loss family (:class:`fastdpo.DPO`, :class:`fastdpo.ORPO`, :class:`fastdpo.CPO`) is a small
subclass: it checks its loss options, says whether it needs a reference model and whether its
loss lets the DPO head op run (:class:`fastdpo.scoring.router.Scorer`'s ``independent_pairs``), and writes
``forward``: batch (:meth:`PreferenceModule._batch`) -> bodies and sums (the reference's
first, :meth:`PreferenceModule._reference_input`, then the policy's,
:meth:`PreferenceModule._policy_sums`) -> its loss function -> scalar (and metrics).  Here
lives everything else: the policy, the frozen reference copy (or a ``peft`` policy's adapters
switched off), the routes, the checked and possibly packed batch, ``parameters()``.

What is pair-specific here says so (:meth:`PreferenceModule._batch`,
:meth:`PreferenceModule._token_metrics`); the rest works on any N sequences, so a family on
unpaired data (KTO: N labelled sequences, plus a KL batch of mismatched prompts and
completions, a second batch through the same bodies and sums) needs only its own batch builder.

Dimensions: B pairs, N sequences (2B for a pair batch: the B chosen, then the B rejected), T
positions.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import replace

import torch
from torch import Tensor, nn

from .. import _checks
from ..batching.batch import Batch, pair_batch, plan_packing
from ..batching.options import PackingOptions, TokenOptions
from ..models import adapter_for, adapters_disabled, check_first_pairs, check_wrappers, peft_model
from ..scoring.options import ComputeOptions
from ..scoring.router import ALIGNMENTS, REDUCTIONS, HeadInput, Route, Scorer

# A warning about the user's own arguments points at the user's call: warnings.warn <-
# PreferenceModule.__init__ <- a family's _build <- its __init__ (fastdpo.modules.options) <- the call.
USER_CALL = 4
# Under sequence parallelism, the first packed call checks the first pairs' first tokens only.
CHECK_TOKENS = 64


def _remap_cell(cell: types.CellType, memo: dict[int, object]) -> types.CellType:
    try:
        value = cell.cell_contents
    except ValueError:  # an empty cell
        return types.CellType()
    if isinstance(value, types.MethodType) and id(value.__self__) in memo:  # a method of the original: the copy's
        return types.CellType(types.MethodType(value.__func__, memo[id(value.__self__)]))
    return types.CellType(memo.get(id(value), value))


def _rebuilt(fn: types.FunctionType, memo: dict[int, object]) -> types.FunctionType:
    """``fn`` with its closure's cells re-pointed at the copies in ``memo``, its attributes kept
    (``functools.wraps``' ``__wrapped__``, which ``inspect.signature`` follows)."""
    cells = tuple(_remap_cell(c, memo) for c in fn.__closure__)
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


def deepcopy_module(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also re-points closures over the original at the copy.

    ``copy.deepcopy`` copies a function attribute by reference, so a head stored as a closure
    over the original module (x-transformers' ``tie_embedding=True`` head is
    ``lambda t: t @ self.token_emb.emb.weight.t() * scale``) would keep reading the
    *original's* live weights from inside the copy: x-transformers' own DPO has that flaw,
    and its reference model drifts with the policy's embedding during training.  Function
    attributes of the copy's submodules are rebuilt over the copied objects, and so are the
    functions of method attributes (a forward patched as ``types.MethodType(f, model)`` with
    ``f`` closing over the original's forward, as TRL's ``add_fused_lm_head`` does: the copy
    would otherwise run the original model).
    """
    memo: dict[int, object] = {}
    copy = deepcopy(model, memo)
    for module in copy.modules():
        for name, fn in list(vars(module).items()):
            if isinstance(fn, types.FunctionType) and fn.__closure__:
                setattr(module, name, _rebuilt(fn, memo))
            elif isinstance(fn, types.MethodType) and isinstance(fn.__func__, types.FunctionType) and fn.__func__.__closure__:
                setattr(module, name, types.MethodType(_rebuilt(fn.__func__, memo), fn.__self__))
    return copy


def router_coefficient(model: nn.Module, adapter, coef) -> float:
    """The router load-balancing coefficient in force for ``model`` (0.0: off), as TRL 1.16
    decides it: ``coef`` if given, else the config's ``router_aux_loss_coef``; on only for a
    model whose config has ``output_router_logits``, and a nonzero ``coef`` for one without
    is an error."""
    has_router, config_coef = adapter.router()
    if coef is not None:
        coef = _checks.real_number("router_aux_loss_coef", coef)
        if coef and not has_router:
            raise ValueError(
                f"router_aux_loss_coef={coef:g} but {type(model).__name__} is not a Mixture-of-Experts model "
                f"that returns its router logits (no output_router_logits in its config): there is no "
                f"auxiliary loss to weight"
            )
    value = config_coef if coef is None else coef
    return value if has_router else 0.0


def given_reference(ref_model: nn.Module | None, model: nn.Module, reference: bool, family: str) -> nn.Module | None:
    """``ref_model`` checked as the reference of a module around ``model``, its parameters frozen
    (``requires_grad=False``: it never trains, and a ``DistributedDataParallel`` around the
    module must not wait for its gradients); None when not given.  A ``TypeError`` for a
    non-module, a ``ValueError`` for the policy itself or for a loss that reads no reference."""
    if ref_model is None:
        return None
    if not isinstance(ref_model, nn.Module):
        raise TypeError(f"ref_model must be a torch.nn.Module or None, got {type(ref_model).__name__}")
    if not reference:
        raise ValueError(f"ref_model was given, but this {family} loss reads no reference model: drop ref_model")
    policy = {id(p) for p in model.parameters()}
    if ref_model is model or any(id(p) in policy for p in ref_model.parameters()):
        raise ValueError("ref_model shares its parameters with the policy model: the reference must be a model of "
                         "its own (ref_model=None makes a frozen copy of the policy)")
    check_wrappers(ref_model)
    for p in ref_model.parameters():
        p.requires_grad_(False)
    return ref_model


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` sharing nothing with it (:func:`deepcopy_module`), frozen."""
    copy = deepcopy_module(model)
    for p in copy.parameters():
        p.requires_grad = False
    return copy


class PreferenceModule(nn.Module):
    """The shared part of a preference-loss module around a model (see the module docstring).

    A family is a subclass decorated with :func:`fastdpo.modules.options.with_options`, which
    writes its constructor from its loss options and the shared groups; its ``_build`` checks its
    loss options and calls this ``__init__`` with the shared ones.

    Args:
        model: the policy (``policy_model``), as :class:`fastdpo.DPO` takes it.
        tokens, packing, compute: the shared options (:class:`~fastdpo.batching.options.TokenOptions`,
            :class:`~fastdpo.batching.options.PackingOptions`,
            :class:`~fastdpo.scoring.options.ComputeOptions`); each family's docstring says what
            ``logprob_reduction`` means for its loss.
        reference: whether the loss reads a reference model's scores.  Then ``ref_model`` is the
            given ``ref_model``, else a frozen deep copy (:func:`frozen_copy`), or None for a
            ``peft`` policy, whose reference is itself with its adapters disabled; without,
            ``ref_model`` is None and :meth:`has_reference` False.
        independent_pairs: whether each pair's loss depends on its own scores only, so that the DPO head
            (:mod:`fastdpo.scoring.dpo_head_op`) may score it; False sends the fused head to the
            "fused" route.
        with_wpo: whether the policy's ``log sum_v p_v^2`` is needed (WPO; :class:`~fastdpo.scoring.router.Scorer`).
        router_aux_loss_coef: for a family that adds an MoE policy's router load-balancing loss
            (DPO, KTO): ``None`` reads the model's config; 0.0 is off.
            :attr:`router_aux_loss_coef` holds the value in force (0.0: off), and
            :meth:`_policy_input` asks for the loss when it is on.
        ref_model: for a family that reads a reference (DPO, KTO), the reference model to use
            instead of a copy (:func:`given_reference`); None: the copy, or a peft policy's
            adapters off.
    """

    def __init__(
        self,
        model: nn.Module,
        tokens: TokenOptions,
        packing: PackingOptions,
        compute: ComputeOptions,
        *,
        reference: bool,
        independent_pairs: bool,
        with_wpo: bool = False,
        router_aux_loss_coef: float | None = 0.0,
        ref_model: nn.Module | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_wrappers(model)
        pad_id = tokens.pad_id
        if pad_id is not None and (isinstance(pad_id, bool) or not isinstance(pad_id, int)):
            raise TypeError(f"pad_id must be an int or None, got {type(pad_id).__name__}")
        self.token_options, self.packing_options, self.compute_options = tokens, packing, compute
        self.pad_id = pad_id
        self.logprob_reduction = _checks.choice("logprob_reduction", tokens.logprob_reduction, REDUCTIONS)
        self.mask_alignment = _checks.choice("mask_alignment", tokens.mask_alignment, ALIGNMENTS)
        # Under sequence parallelism the sums are all-reduced before any loss: no DPO head op.
        split = packing.sequence_parallel is not None
        self.scorer = Scorer(compute, independent_pairs=independent_pairs and not split, with_wpo=with_wpo)
        self.head, self.impl, self.matmul = self.scorer.head, self.scorer.impl, self.scorer.matmul
        self.inplace_backward = self.scorer.inplace_backward
        share_prompt, layout = packing.share_prompt, packing.packing
        if not isinstance(share_prompt, bool):
            raise TypeError(f"share_prompt must be a bool, got {type(share_prompt).__name__}")
        if share_prompt and layout not in ("none", "pair"):
            raise ValueError(f"share_prompt=True is packing='pair'; it contradicts packing={layout!r}")
        adapter = adapter_for(model)
        self.packing = plan_packing(adapter, "pair" if share_prompt else layout, packing.pack_attention,
                                    packing.pack_length, packing.sequence_parallel)
        self.share_prompt = self.packing.layout == "pair"
        self.router_aux_loss_coef = router_coefficient(model, adapter, router_aux_loss_coef)
        if self.router_aux_loss_coef and self.packing.layout != "none":
            raise ValueError(
                f"packing={self.packing.layout!r} with the MoE router's load-balancing loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef:g}) is not supported: pass packing='none', or router_aux_loss_coef=0.0"
            )
        self._packing_checked: set[str] = set()
        if compute.head != "logits":
            found, why = adapter.head()
            if found is None and compute.head == "fused":
                raise ValueError(f"head='fused' but the model's head cannot be fused: {why}")
            if found is None:  # said once, here, not at every step
                name = type(self).__name__
                warnings.warn(
                    f"fastdpo.{name} will score this model's logits (no fused head, so (2B, L-1, V) "
                    f"logits are built): {why}; pass head='logits' to silence this",
                    stacklevel=USER_CALL,
                )
        self.policy_model = model
        given = given_reference(ref_model, model, reference, type(self).__name__)
        # A peft policy's reference is itself with its adapters off: no copy (as TRL does).
        self._ref_is_base = reference and given is None and peft_model(model) is not None
        self.ref_model = given if given is not None else (
            frozen_copy(model) if reference and not self._ref_is_base else None)

    def parameters(self, recurse: bool = True):
        """The policy's parameters only (the reference model is frozen), as x-transformers;
        for a ``peft`` policy, its trainable parameters only (the adapters')."""
        if peft_model(self.policy_model) is not None:
            return (p for p in self.policy_model.parameters(recurse) if p.requires_grad)
        return self.policy_model.parameters(recurse)

    def route(self, model: nn.Module, device: torch.device | str) -> Route:
        """The :class:`~fastdpo.scoring.router.Route` this module takes for ``model`` (its policy or
        reference) on ``device``: decided on the first call there and kept (``head="fused"``
        raises on any call whose model cannot be fused)."""
        return self.scorer.route(model, device)

    def has_reference(self) -> bool:
        """Whether a reference model scores the batches (a frozen copy, or a peft policy with
        its adapters off), as opposed to a zero reference or a loss that needs none."""
        return self.ref_model is not None or self._ref_is_base

    @contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        """The reference model, in eval mode, to call under ``no_grad``."""
        if self.ref_model is not None:
            self.ref_model.eval()
            yield self.ref_model
        else:
            with adapters_disabled(self.policy_model) as ref:
                yield ref

    # ------------------------------------------------------------------------- the step

    def _batch(self, preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask) -> Batch:
        """The checked batch of 2B sequences (packed as ``packing`` says; on the first packed
        call per device, two pairs are also run packed and unpacked, which must agree)."""
        return self._packed_batch(pair_batch, preferred_seq.device if isinstance(preferred_seq, Tensor) else None,
                                  preferred_seq, unpreferred_seq, prompt_mask, pref_mask, unpref_mask)

    def _packed_batch(self, build, device, *args, **kwargs) -> Batch:
        """``build(adapter_on, *args, ..., packing_plan=, check_packed=)`` (:func:`pair_batch`,
        :func:`unpaired_batch`) with this module's packing, the first packed call on ``device``
        checked (:func:`check_first_pairs`; under sequence parallelism on the first tokens only:
        no process runs a whole long row, not even to check it)."""
        device = str(device)
        check = None
        if device not in self._packing_checked and not torch.compiler.is_compiling():
            check = check_first_pairs
            if self.packing.group is not None:
                check = functools.partial(check_first_pairs, tokens=CHECK_TOKENS)
        batch = build(
            lambda dev: self.route(self.policy_model, dev).adapter, *args, pad_id=self.pad_id,
            alignment=self.mask_alignment, packing_plan=self.packing, check_packed=check, **kwargs,
        )
        if batch.packed is not None:
            self._packing_checked.add(device)
        return batch

    def _policy_input(self, batch: Batch) -> HeadInput:
        """The policy's head input of ``batch``, with its router's load-balancing loss (``HeadInput.aux``)
        when :attr:`router_aux_loss_coef` is on."""
        return self.scorer.head_input(self.policy_model, batch, router=self.router_aux_loss_coef != 0.0)

    def _reference_input(self, batch: Batch) -> HeadInput | None:
        """The reference model's head input of ``batch`` (None without a reference model)."""
        if not self.has_reference():
            return None
        with torch.no_grad(), self._reference() as ref:
            return self.scorer.head_input(ref, batch)

    def _scores(self, inputs: HeadInput | None, batch: Batch) -> Tensor:
        """(N,) scores in ``logprob_reduction`` of a head input (a zero reference for None)."""
        if inputs is None:
            return torch.zeros(batch.src.shape[0], dtype=torch.float32, device=batch.src.device)
        sums = self.scorer.sums(inputs, batch)[0]
        return sums / batch.count if self.logprob_reduction == "mean" else sums

    def _policy_sums(
        self, batch: Batch, *, count_hits: bool = False, more: Batch | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The policy's (N,) float32 summed log-probs of ``batch`` on the "fused" or "logits"
        route (a module whose fused head takes the DPO head op calls it itself), the (N,) argmax
        hits with ``count_hits`` (:meth:`~fastdpo.scoring.router.Scorer.sums`), and, given ``more``
        -- a batch of the first K of these sequences scored at other positions (its ``tgt``
        and ``mask``; its ``src`` is not run) --, its (K,) sums from the same head input: the model
        runs once."""
        policy = self.scorer.head_input(self.policy_model, batch)
        if more is None:
            sums, hits, _ = self.scorer.sums(policy, batch, count_hits=count_hits)
            return sums, hits, None
        # Two ops read the same head input: neither may write its gradient over shared logits.
        sums, hits, _ = self.scorer.sums(policy, batch, count_hits=count_hits, inplace=False)
        if batch.shard is not None:  # (this process's slots: the same head input, scored at more's positions)
            part, more = policy, replace(more, shard=batch.shard)
        else:
            part = HeadInput(policy.route, policy.out[: more.tgt.shape[0]], policy.weight, bias=policy.bias)
        return sums, hits, self.scorer.sums(part, more, inplace=False)[0]

    @staticmethod
    def _token_metrics(batch: Batch, hits: Tensor | None, b: int) -> dict[str, Tensor]:
        """``tokens/chosen``, ``tokens/rejected`` (mean scored tokens per sequence) and, when
        ``hits`` were counted, ``token_accuracy/chosen`` (the fraction of scored chosen tokens
        whose target is the policy's argmax) of a pair batch."""
        tokens = batch.mask.sum(-1).float()
        metrics = {"tokens/chosen": tokens[:b].mean(), "tokens/rejected": tokens[b:].mean()}
        if hits is not None:
            metrics["token_accuracy/chosen"] = hits[:b].sum().float() / tokens[:b].sum().clamp(min=1)
        return metrics
