"""TRL 1.16's own DPO loss, run on stubs: ``DPOTrainer._compute_loss`` called unbound.

The trainer's ``_compute_loss`` is the definition of every DPO option TRL ships (loss types,
f-divergences, LD-DPO's ``ld_alpha``, WPO's ``use_weighting``, the metrics it logs).  Building
a real ``DPOTrainer`` needs datasets, a tokenizer and accelerate; this harness instead calls
the method on a small stand-in for the trainer (the attributes the method reads) and stand-ins
for the models: TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``) makes a model
called with ``labels=..., fused_lm_head=True`` return per-token fields instead of logits; the
stub models return those same fields, computed in float64 from real logits you give:

    log_probs[i, j]         log softmax(logits[i, j])[labels[i, j + 1]], 0 where that label
                            is -100 (TRL's ``labels = input_ids`` masked by ``completion_mask``)
    entropy, log_sum_sq_probs (log sum_v p_v^2, detached), mean_logits (detached), is_top1
                            the same positions, the same zeros; shape (2B, L - 1)

So TRL's code itself does everything after the head: the sums, the reference, the
f-divergence, each loss type, the weights, the mean.  Its gradients flow back through the
float64 log-probs into whatever made the policy's logits (pass a function of the token ids,
e.g. a model's forward, and its parameters get ``.grad``).

Usage::

    ids, completion, attention = trl_batch(pref, unpref, prompt_mask, pref_mask, unpref_mask)
    loss = trl_dpo_loss(lambda i, a: policy(i).double(), lambda i, a: ref(i).double(),
                        ids, completion, attention, beta=0.1, loss_type=["sigmoid", "sft"])
    loss.backward()

Keyword arguments are ``trl.DPOConfig`` fields (a name that is not one is a ``TypeError``),
with ``DPOConfig``'s own defaults; ``DPOTrainer.__init__``'s validation does NOT run (tests
check fastdpo's errors against it by name, not through this harness).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections import defaultdict
from collections.abc import Callable

import torch
from torch import Tensor, nn

Logits = Tensor | Callable[[Tensor, Tensor], Tensor]

# DPOConfig fields the harness sets from its own arguments, not from **config.
_OWN = {"precompute_ref_log_probs"}


@functools.cache
def dpo_config_defaults() -> dict:
    """Every ``trl.DPOConfig`` field's default (read from the dataclass, not instantiated:
    a ``DPOConfig`` is a ``TrainingArguments`` and wants a device)."""
    from trl import DPOConfig

    out = {}
    for f in dataclasses.fields(DPOConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def trl_batch(
    preferred_seq: Tensor,
    unpreferred_seq: Tensor,
    prompt_mask: Tensor,
    preferred_seq_mask: Tensor | None = None,
    unpreferred_seq_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A fastdpo/x-transformers batch (``DPO.forward``'s arguments, right padded) as TRL's
    collator lays it out: ``(input_ids, completion_mask, attention_mask)``, each (2B, L), the B
    chosen rows then the B rejected ones; masks int64 0/1 as TRL's collator makes them."""
    seq = torch.cat((preferred_seq, unpreferred_seq))
    keep = torch.ones_like(seq, dtype=torch.bool)
    if preferred_seq_mask is not None:
        keep = torch.cat((preferred_seq_mask, unpreferred_seq_mask)).bool()
    completion = ~prompt_mask.repeat(2, 1).bool() & keep
    return seq, completion.long(), keep.long()


class _FusedHeadStub(nn.Module):
    """Stands in for a model patched by ``add_fused_lm_head``, called with ``fused_lm_head=True``."""

    is_gradient_checkpointing = False

    def __init__(self, logits: Logits, dtype: torch.dtype, aux_loss: Tensor | None):
        super().__init__()
        self.logits, self.dtype, self.aux_loss = logits, dtype, aux_loss
        self.calls: list[dict] = []

    def forward(self, *, input_ids, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head and labels is not None, "TRL's _compute_loss asks for the fused head"
        self.calls.append(dict(kwargs))
        z = self.logits(input_ids, attention_mask) if callable(self.logits) else self.logits
        if z.shape[:2] != input_ids.shape:
            raise ValueError(f"logits must be (N, L, V) for input_ids {tuple(input_ids.shape)}, got {tuple(z.shape)}")
        z = z[:, :-1].double()  # the model's own shift: position j predicts label j + 1
        y = labels[:, 1:]
        mask = y != -100
        logp = z.log_softmax(-1)
        lp = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * logp, -1)
            mean_logits = z.mean(-1)
            # TRL's kernel: the label's logit is a maximum and no earlier logit equals it
            # (ties go to the lowest index), i.e. argmax == label.
            is_top1 = z.argmax(-1) == y.clamp(min=0)

        def out(x: Tensor) -> Tensor:
            return x.masked_fill(~mask, 0).to(self.dtype)

        return types.SimpleNamespace(
            loss=-(lp * mask).sum() / mask.sum().clamp(min=1),
            log_probs=out(lp), entropy=out(entropy), log_sum_sq_probs=out(log_sum_sq),
            mean_logits=out(mean_logits), is_top1=is_top1 & mask, label_mask=mask,
            aux_loss=self.aux_loss if kwargs.get("output_router_logits") else None,
        )


class _Accelerator:
    """A single process: gathers are the identity."""

    def __init__(self, device: torch.device):
        self.device = device

    def gather_for_metrics(self, x):
        return x

    gather = gather_for_metrics

    def unwrap_model(self, model):
        return model


def trl_trainer(policy: nn.Module, reference: nn.Module | None, *, precompute: bool, training: bool,
                aux_loss_coef: float, device: torch.device, **config):
    """The stand-in trainer: the attributes ``DPOTrainer.__init__`` sets and ``_compute_loss``
    reads, from ``DPOConfig`` fields (``config`` overrides TRL's defaults)."""
    defaults = dpo_config_defaults()
    unknown = sorted(set(config) - set(defaults) - {"router_aux_loss_coef"})
    if unknown or _OWN & set(config):
        raise TypeError(f"not DPOConfig fields the harness takes: {unknown or sorted(_OWN & set(config))}")
    args = types.SimpleNamespace(**{**defaults, **config, "precompute_ref_log_probs": precompute})
    if isinstance(args.loss_type, str):  # DPOConfig.__post_init__
        args.loss_type = [args.loss_type]
    policy.train(training)
    t = types.SimpleNamespace(
        args=args, model=policy, ref_model=reference, accelerator=_Accelerator(device),
        beta=args.beta, precompute_ref_logps=precompute, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting,
        router_aux_loss_coef=aux_loss_coef, aux_loss_enabled=aux_loss_coef != 0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    return t


def trl_dpo_loss(
    policy: Logits,
    reference: Logits | None,
    input_ids: Tensor,
    completion_mask: Tensor,
    attention_mask: Tensor | None = None,
    *,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    aux_loss: Tensor | None = None,
    router_aux_loss_coef: float = 0.0,
    training: bool = True,
    metrics: dict | None = None,
    **config,
) -> Tensor:
    """TRL 1.16's DPO loss of a batch, by ``DPOTrainer._compute_loss`` itself.

    Args:
        policy, reference: the models' logits (N, L, V) for ``input_ids``: a tensor, or a
            function ``(input_ids, attention_mask) -> logits`` (called as TRL calls the model).
            Differentiable through the policy's.  ``reference`` may be None when
            ``ref_chosen_logps``/``ref_rejected_logps`` are given (TRL's
            ``precompute_ref_log_probs``: the batch then carries them).
        input_ids, completion_mask, attention_mask: (2B, L), chosen rows then rejected rows
            (:func:`trl_batch` makes them from a fastdpo batch).  ``attention_mask`` defaults
            to all ones.
        dtype: the dtype of the per-token fields the stub head returns (computed in float64,
            then cast): TRL's alpha-divergence clamp table has no float64 entry, so it needs
            float32 here.
        aux_loss: an MoE load-balancing loss the policy's output carries when asked
            (``output_router_logits``), added with weight ``router_aux_loss_coef`` (non-zero
            turns TRL's ``aux_loss_enabled`` on).
        training: the policy's mode (TRL logs under "train" or "eval").
        metrics: a dict to receive what TRL logged (``trainer._metrics[mode]``: lists).
        **config: ``DPOConfig`` fields (``beta``, ``loss_type``, ``loss_weights``,
            ``label_smoothing``, ``f_divergence_type``, ``f_alpha_divergence_coef``,
            ``discopop_tau``, ``ld_alpha``, ``use_weighting``, ...).

    Returns: the scalar loss, in ``dtype``.
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    precompute = ref_chosen_logps is not None
    if precompute != (ref_rejected_logps is not None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if reference is None and not precompute:
        raise ValueError("reference is None: pass its logits, or precomputed reference log-probs")
    pol = _FusedHeadStub(policy, dtype, aux_loss)
    ref = _FusedHeadStub(reference, dtype, None).eval() if reference is not None else None
    trainer = trl_trainer(pol, ref, precompute=precompute, training=training,
                          aux_loss_coef=router_aux_loss_coef, device=input_ids.device, **config)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    if precompute:
        inputs |= {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    loss = DPOTrainer._compute_loss(trainer, pol, inputs, return_outputs=False)
    if metrics is not None:
        metrics.update(trainer._metrics["train" if training else "eval"])
    return loss
