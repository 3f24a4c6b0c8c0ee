"""``fastdpo train --method``: which module computes the loss, with which of its options.

Each method is a fastdpo module and the options it fixes (TRL 1.16's trainers and their
shorthands): ``dpo`` :class:`fastdpo.DPO` (TRL's ``DPOTrainer``), ``orpo``
:class:`fastdpo.ORPO`, ``cpo`` :class:`fastdpo.CPO`, ``simpo`` (CPO with ``loss_type="simpo"``
and ``cpo_alpha=0``, as TRL's CPO docs define SimPO), ``alphapo`` (CPO with
``loss_type="alphapo"``), ``kto`` :class:`fastdpo.KTO` (unpaired records).  The loss options
of the run (:data:`LOSS_OPTIONS`, the union of the modules' own option fields) are ``None``
unless given; a given one must be an option of the method's module and not one the method
fixes, else a one-line ``ValueError`` naming it.  The module's own defaults (and its own checks)
do the rest: no option is declared twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import nn

from ..modules.cpo import CPO, CPOOptions
from ..modules.dpo import DPO, DPOOptions
from ..modules.kto import KTO, KTOOptions
from ..modules.orpo import ORPO, ORPOOptions
from . import io

__all__ = ["METHODS", "LOSS_OPTIONS", "Method", "method_of", "loss_options", "build"]


@dataclass(frozen=True)
class Method:
    module: type[nn.Module]
    options: type
    fixed: dict = field(default_factory=dict)
    # metrics logged besides the loss and :data:`PAIR_METRICS` (when the module returns them)
    extra_metrics: tuple[str, ...] = ()
    paired: bool = True  # pairs of completions (else KTO's unpaired ones)
    reference: bool = True  # reads a reference model (before its loss type says otherwise)
    reduction: str = "sum"  # the sequence score TRL's trainer uses (ORPO's odds: per-token means)


METHODS: dict[str, Method] = {
    "dpo": Method(DPO, DPOOptions, extra_metrics=("aux_loss",)),
    "orpo": Method(ORPO, ORPOOptions, extra_metrics=("nll_loss", "log_odds_ratio", "log_odds_chosen"), reference=False,
                   reduction="mean"),
    "cpo": Method(CPO, CPOOptions, extra_metrics=("nll_loss",), reference=False),
    "simpo": Method(CPO, CPOOptions, {"loss_type": "simpo", "cpo_alpha": 0.0}, ("nll_loss",), reference=False),
    "alphapo": Method(CPO, CPOOptions, {"loss_type": "alphapo"}, ("nll_loss",), reference=False),
    "kto": Method(KTO, KTOOptions, paired=False, extra_metrics=("kl", "aux_loss")),
}

# Module options that are objects, not settings: the run makes them (ref_model: the reference is
# the --model itself, frozen, or with LoRA the policy with its adapters off).
MADE_BY_THE_RUN = ("ref_model",)
# Every loss option of every method's module, in a stable order (the TrainConfig fields).
LOSS_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(f.name for m in METHODS.values() for f in fields(m.options)
                                                    if f.name not in MADE_BY_THE_RUN))

# Logged for every paired method: the loss, then these (means over pairs).
PAIR_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected")  # fmt: skip
# Logged for KTO: the loss, then these (the chosen ones means over the desirable completions, the
# rejected ones over the undesirable ones; the margin is chosen minus rejected, as TRL's).
UNPAIRED_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def method_of(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def loss_options(method: str, given: dict) -> dict:
    """The options for ``method``'s module: those of ``given`` (name -> value, None for not
    given) that are set, each checked to belong to the method, plus what the method fixes."""
    m = method_of(method)
    own = {f.name for f in fields(m.options)}
    chosen = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in own:
            takes = [k for k, other in METHODS.items() if name in {f.name for f in fields(other.options)}]
            raise ValueError(f"{_flag(name)} is an option of --method {', '.join(takes)}, not of {method}")
        if name in m.fixed and value != m.fixed[name]:
            raise ValueError(f"--method {method} sets {name} to {m.fixed[name]!r}: leave {_flag(name)} out "
                             f"(or use --method {m.module.__name__.lower()})")  # fmt: skip
        chosen[name] = value
    return chosen | m.fixed


def build(method: str, model: nn.Module, given: dict, **shared) -> nn.Module:
    """``method``'s module around ``model`` with the ``given`` loss options (see
    :func:`loss_options`) and the ``shared`` ones (head, packing, the conventions).  The module's
    own refusals (``TypeError``, ``NotImplementedError`` for a combination it does not support)
    become one-line ``ValueError``s, as every setup mistake of the command."""
    options = loss_options(method, given)
    try:
        return method_of(method).module(model, **options, **shared)
    except (TypeError, NotImplementedError) as e:
        raise ValueError(f"--method {method}: {io.message(e)}") from e
