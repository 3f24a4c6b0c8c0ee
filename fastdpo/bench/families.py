"""The loss families' providers (``fastdpo bench --loss orpo|cpo|simpo|kto``).

Each runs one step of its loss on the bench's models and sequences (step workload; the same
2B sequences a DPO step scores): fastdpo's module, Liger-Kernel's fused linear module of the
same loss (its chunks compiled, and eager), and TRL 1.16's trainer code run on a stub trainer
(``trl-*``: TRL's own loss and metrics code, its model call answered by the bench's model).
Every one computes the loss in TRL's conventions (log-probs over a target-aligned mask,
summed or averaged as TRL's trainer does), so ``same_loss_as`` names the options under which
fastdpo's module of that loss returns the same number; tests/test_bench.py checks each.

* ``orpo``: ``fastdpo.ORPO`` (beta 0.1; its NLL counts the chosen prompts, as TRL's);
  ``LigerFusedLinearORPOLoss`` with the chosen sequences' real tokens as its ``nll_target``.
* ``cpo``: ``fastdpo.CPO`` (sigmoid, summed log-probs, ``cpo_alpha=1``);
  ``LigerFusedLinearCPOLoss``.
* ``simpo``: ``fastdpo.CPO(loss_type="simpo", beta=2, cpo_alpha=0)`` (SimPO, no NLL);
  ``LigerFusedLinearSimPOLoss``.
* ``kto``: ``fastdpo.KTO`` (summed log-probs) with TRL's KL sequences (``fastdpo-kto``, ``trl-kto``:
  two more scorings, no gradient), and with a given KL estimate (``fastdpo-kto-given-kl``):
  Liger's ``LigerFusedLinearKTOLoss`` takes the estimate as an input and scores no KL
  sequences, so ``liger-kto`` is measured against that one.
"""

from __future__ import annotations

import types
import warnings
from types import SimpleNamespace

import torch

from .config import BETA, Config
from .inputs import kto_batch, make_batch, make_models, make_step
from .registry import Step, Unavailable, register

SIMPO_BETA = 2.0  # SimPO's paper uses beta in [2, 10]; TRL's simpo_gamma default 0.5 stays
KL_GIVEN = 0.05  # the precomputed KL estimate of the *-given-kl providers and of Liger's KTO
IGNORE = -100  # Liger's and TRL's ignore index

# fastdpo's module and options for each loss, in TRL's conventions (what every provider computes)
ORPO_TRL = dict(beta=BETA, mask_alignment="target")
CPO_TRL = dict(beta=BETA, logprob_reduction="sum", mask_alignment="target")
SIMPO_TRL = dict(loss_type="simpo", beta=SIMPO_BETA, cpo_alpha=0.0, mask_alignment="target")
KTO_TRL = dict(beta=BETA, logprob_reduction="sum", mask_alignment="target")
# ``kl`` is a forward argument of fastdpo.KTO, not an option: the test passes it to the call
KTO_GIVEN_KL = dict(KTO_TRL, kl=KL_GIVEN)


def _module(loss: str, policy, options: dict):
    from fastdpo import CPO, ORPO

    return ORPO(policy, **options) if loss == "orpo" else CPO(policy, **options)


# ----------------------------------------------------------------------------- fastdpo


def _fastdpo_pair(loss: str, options: dict):
    def build(workload: str, mode: str, cfg: Config) -> Step:
        bt = make_batch(cfg)
        policy, _ = make_models(cfg)
        module = _module(loss, policy, options)
        return make_step(lambda: module(bt.pref, bt.unpref, **bt.dpo_kwargs), mode, module.parameters())

    return build


for _loss, _options, _what in (("orpo", ORPO_TRL, "fastdpo.ORPO"), ("cpo", CPO_TRL, "fastdpo.CPO (sigmoid)"),
                               ("simpo", SIMPO_TRL, "fastdpo.CPO(loss_type='simpo', cpo_alpha=0)")):
    register(f"fastdpo-{_loss}", workloads=("step",), loss=_loss, same_loss_as=_options,
             help=f"{_what}, TRL's conventions, the fused head ('fused' route)")(_fastdpo_pair(_loss, _options))


def _fastdpo_kto(given_kl: bool):
    def build(workload: str, mode: str, cfg: Config) -> Step:
        from fastdpo import KTO

        policy, ref = make_models(cfg)
        kto = KTO(policy, **KTO_TRL)
        kto.ref_model.load_state_dict(ref.state_dict())
        batch = kto_batch(cfg, kl=not given_kl)
        extra = {"kl": KL_GIVEN} if given_kl else {}
        return make_step(lambda: kto(**batch, **extra), mode, kto.parameters())

    return build


register("fastdpo-kto", workloads=("step",), loss="kto", same_loss_as=KTO_TRL,
         help="fastdpo.KTO, TRL's conventions, with TRL's KL sequences (two more no-grad scorings)")(_fastdpo_kto(False))
register("fastdpo-kto-given-kl", workloads=("step",), loss="kto", same_loss_as=KTO_GIVEN_KL,
         help=f"fastdpo.KTO with a given KL estimate ({KL_GIVEN}): the work of liger-kto")(_fastdpo_kto(True))


# ----------------------------------------------------------------------------- Liger-Kernel


def _liger_class(name: str):
    try:
        import liger_kernel.chunked_loss as chunked
    except Exception as e:  # noqa: BLE001 -- any failure: the peer cannot run here
        raise Unavailable(f"liger-kernel not importable ({type(e).__name__}: {e})") from None
    return getattr(chunked, name)


def _liger_pair(loss: str, compiled: bool):
    """Liger's paired fused losses take the chosen rows then the rejected ones, a target with
    the ignore index on every position that does not count (TRL's target-aligned mask)."""

    def build(workload: str, mode: str, cfg: Config) -> Step:
        from . import providers

        bt = make_batch(cfg)
        model, _ = make_models(cfg)
        compiled_ = compiled and providers.LIGER_COMPILED
        target = bt.tgt.masked_fill(~bt.mask_target, IGNORE)
        extra = {}
        if loss == "orpo":
            fn = _liger_class("LigerFusedLinearORPOLoss")(beta=BETA, ignore_index=IGNORE, compiled=compiled_)
            real = torch.cat((bt.pref_mask, bt.unpref_mask))[:, 1:]
            extra["nll_target"] = bt.tgt.masked_fill(~real, IGNORE)  # TRL's ORPO NLL: the prompt too
        elif loss == "cpo":
            fn = _liger_class("LigerFusedLinearCPOLoss")(beta=BETA, alpha=1.0, ignore_index=IGNORE,
                                                         average_log_prob=False, compiled=compiled_)
        else:
            fn = _liger_class("LigerFusedLinearSimPOLoss")(beta=SIMPO_BETA, gamma=0.5, alpha=0.0,
                                                           compute_nll_loss=False, ignore_index=IGNORE,
                                                           compiled=compiled_)

        def step_loss():
            hidden = model(bt.src, return_embeddings=True)
            out = fn(model.to_logits.weight, hidden, target, **extra)
            return out[0] if isinstance(out, tuple) else out

        return make_step(step_loss, mode, model.parameters())

    return build


def _liger_kto(compiled: bool):
    """Liger's KTO takes the policy's and the reference's hidden states, the labels and the KL
    estimate; it has no class weights (1.0 here, as fastdpo's defaults)."""

    def build(workload: str, mode: str, cfg: Config) -> Step:
        from . import providers

        bt = make_batch(cfg)
        model, ref = make_models(cfg)
        fn = _liger_class("LigerFusedLinearKTOLoss")(beta=BETA, ignore_index=IGNORE, use_ref_model=True,
                                                     average_log_prob=False,
                                                     compiled=compiled and providers.LIGER_COMPILED)
        target = bt.tgt.masked_fill(~bt.mask_target, IGNORE)
        labels = torch.arange(2 * cfg.batch, device=cfg.device) < cfg.batch  # preferred: desirable
        kl = torch.tensor(KL_GIVEN, device=cfg.device)

        def step_loss():
            with torch.no_grad():
                ref_hidden = ref(bt.src, return_embeddings=True)
            hidden = model(bt.src, return_embeddings=True)
            out = fn(hidden, model.to_logits.weight, target, preference_labels=labels, ref_input=ref_hidden,
                     ref_weight=ref.to_logits.weight, kl=kl)
            return out[0] if isinstance(out, tuple) else out

        return make_step(step_loss, mode, model.parameters())

    return build


for _loss, _cls, _same in (("orpo", "LigerFusedLinearORPOLoss", ORPO_TRL), ("cpo", "LigerFusedLinearCPOLoss", CPO_TRL),
                           ("simpo", "LigerFusedLinearSimPOLoss", SIMPO_TRL)):
    register(f"liger-{_loss}", workloads=("step",), loss=_loss, same_loss_as=_same,
             help=f"Liger-Kernel {_cls} on the body's hidden states (torch.compile'd chunks)")(_liger_pair(_loss, True))
    register(f"liger-{_loss}-eager", workloads=("step",), loss=_loss, same_loss_as=_same,
             help=f"as liger-{_loss}, its chunks run eagerly (compiled=False)")(_liger_pair(_loss, False))
register("liger-kto", workloads=("step",), loss="kto", same_loss_as=KTO_GIVEN_KL,
         help=f"Liger-Kernel LigerFusedLinearKTOLoss (torch.compile'd chunks), the KL estimate given ({KL_GIVEN})")(
    _liger_kto(True))
register("liger-kto-eager", workloads=("step",), loss="kto", same_loss_as=KTO_GIVEN_KL,
         help="as liger-kto, its chunks run eagerly (compiled=False)")(_liger_kto(False))


# ----------------------------------------------------------------------------- TRL 1.16's trainers


def _trl_import(module: str, name: str):
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 -- any failure: the peer cannot run here
        raise Unavailable(f"{module}.{name} not importable ({type(e).__name__}: {str(e).splitlines()[0]})") from None


class _LogitsModel:
    """What TRL's ORPO and CPO trainers call: the bench model's logits (they materialize them)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        return SimpleNamespace(logits=self.model(input_ids))


def _trl_pair_self(cls, methods, device, **attrs):
    """A stub trainer: the attributes TRL's ``get_batch_loss_metrics`` reads, its methods bound."""
    ns = SimpleNamespace(
        is_encoder_decoder=False, aux_loss_enabled=False,
        accelerator=SimpleNamespace(device=torch.device(device), gather_for_metrics=lambda x: x),
        concatenated_inputs=cls.concatenated_inputs, get_batch_logps=cls.get_batch_logps, **attrs,
    )
    for name in methods:
        setattr(ns, name, types.MethodType(getattr(cls, name), ns))
    return ns


def _trl_pair(loss: str):
    def build(workload: str, mode: str, cfg: Config) -> Step:
        bt = make_batch(cfg)
        model, _ = make_models(cfg)
        if loss == "orpo":
            cls = _trl_import("trl.experimental.orpo.orpo_trainer", "ORPOTrainer")
            trainer = _trl_pair_self(cls, ("concatenated_forward", "odds_ratio_loss"), cfg.device,
                                     beta=BETA, padding_value=0)
        else:
            cls = _trl_import("trl.experimental.cpo.cpo_trainer", "CPOTrainer")
            opts = dict(beta=BETA, loss_type="sigmoid", cpo_alpha=1.0) if loss == "cpo" else \
                dict(beta=SIMPO_BETA, loss_type="simpo", cpo_alpha=0.0)
            trainer = _trl_pair_self(cls, ("concatenated_forward", "cpo_loss"), cfg.device, pad_token_id=0,
                                     label_smoothing=0.0, simpo_gamma=0.5, alpha=0.0, **opts)
        batch = {  # TRL's padded batch: labels are the ids with the prompt and the padding at -100
            "chosen_input_ids": bt.pref, "chosen_attention_mask": bt.pref_mask.long(),
            "chosen_labels": bt.pref.masked_fill(bt.prompt_mask | ~bt.pref_mask, IGNORE),
            "rejected_input_ids": bt.unpref, "rejected_attention_mask": bt.unpref_mask.long(),
            "rejected_labels": bt.unpref.masked_fill(bt.prompt_mask | ~bt.unpref_mask, IGNORE),
        }
        stub = _LogitsModel(model)

        def step_loss():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return cls.get_batch_loss_metrics(trainer, stub, batch)[0]

        return make_step(step_loss, mode, model.parameters())

    return build


for _loss, _same, _what in (("orpo", ORPO_TRL, "ORPOTrainer"), ("cpo", CPO_TRL, "CPOTrainer (sigmoid)"),
                            ("simpo", SIMPO_TRL, "CPOTrainer (simpo, cpo_alpha=0)")):
    register(f"trl-{_loss}", workloads=("step",), loss=_loss, same_loss_as=_same,
             help=f"TRL 1.16's {_what}.get_batch_loss_metrics on a stub trainer: the model's full logits, "
                  "log_softmax + gather")(_trl_pair(_loss))


class _FusedHeadModel(torch.nn.Module):
    """What TRL's KTO trainer calls: a model patched by ``add_fused_lm_head``, called with
    ``fused_lm_head=True``; the per-token fields come from TRL's own ``ChunkedLogProbFunction``
    on the bench model's hidden states (:func:`fastdpo.bench.peers.trl_token_outputs`)."""

    is_gradient_checkpointing = False

    def __init__(self, model, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, *, input_ids, labels, fused_lm_head, attention_mask=None, use_cache=None, **kwargs):
        from . import peers

        hidden = self.model(input_ids, return_embeddings=True)[:, :-1]
        y = labels[:, 1:]
        fields = peers.trl_token_outputs(hidden, self.model.to_logits.weight, y, y != IGNORE, outputs=self.outputs)
        return SimpleNamespace(**dict(zip(("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
                                          fields)))


def _trl_kto(workload: str, mode: str, cfg: Config) -> Step:
    from collections import defaultdict

    cls = _trl_import("trl.trainer.kto_trainer", "KTOTrainer")
    collator = _trl_import("trl.trainer.kto_trainer", "DataCollatorForUnpairedPreference")
    try:
        from . import peers

        peers.trl_route()
    except ImportError as e:
        raise Unavailable(str(e)) from None
    model, ref = make_models(cfg)
    kb = kto_batch(cfg)
    examples = []  # TRL's tokenized examples, from the very sequences fastdpo-kto's collate made
    for i in range(kb["seq"].shape[0]):
        real, prompt = kb["seq_mask"][i], kb["prompt_mask"][i]
        kl_real, kl_prompt = kb["kl_seq_mask"][i], kb["kl_prompt_mask"][i]
        examples.append({"prompt_ids": kb["seq"][i][prompt].tolist(),
                         "completion_ids": kb["seq"][i][real & ~prompt].tolist(),
                         "KL_completion_ids": kb["kl_seq"][i][kl_real & ~kl_prompt].tolist(),
                         "label": bool(kb["label"][i])})
    batch = {k: v.to(cfg.device) if isinstance(v, torch.Tensor) else v
             for k, v in collator(pad_token_id=0)(examples).items()}
    policy = _FusedHeadModel(model, ("entropy", "mean_logits")).train(mode != "forward")  # as KTOTrainer patches it
    reference = _FusedHeadModel(ref, ()).eval()
    trainer = SimpleNamespace(
        beta=BETA, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0, calculate_KL=True,
        precompute_ref_logps=False, model=policy, ref_model=reference,
        accelerator=SimpleNamespace(device=torch.device(cfg.device), gather_for_metrics=lambda x: x,
                                    unwrap_model=lambda m: m),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, aux_loss_enabled=False,
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
    )
    trainer._compute_kl_logps = types.MethodType(cls._compute_kl_logps, trainer)
    return make_step(lambda: cls._compute_loss(trainer, policy, batch, return_outputs=False), mode, model.parameters())


register("trl-kto", workloads=("step",), loss="kto", same_loss_as=KTO_TRL,
         help="TRL 1.16's KTOTrainer._compute_loss on a stub trainer, with its KL sequences and its fused head "
              "(ChunkedLogProbFunction) on the bodies' hidden states")(_trl_kto)
