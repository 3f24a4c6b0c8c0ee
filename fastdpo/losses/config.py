"""The pair losses' options: the loss type names, :class:`LossConfig` and its one check.

:func:`check_loss_config` checks every non-tensor option once (a module's ``__init__``, or
:func:`fastdpo.losses.pairwise.preference_loss`) and returns a frozen :class:`LossConfig`; the losses in
:mod:`fastdpo.losses.pairwise` read it without checking again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .. import _checks

# Order is documentation order; the names are TRL's ``DPOConfig.loss_type`` names (plus
# ``simpo``, which TRL keeps in its CPO trainer).
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "robust",
    "ipo",
    "hinge",
    "bco_pair",
    "nca_pair",
    "exo_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "sigmoid_norm",
    "simpo",
    "aot",
    "aot_unpaired",
    "discopop",
    "sft",
)

# Types that read ``label_smoothing`` and the interval it must lie in, as
# (low, low_inclusive, high, high_inclusive).  The other types do not use it.
_SMOOTHING_RANGE: dict[str, tuple[float, bool, float, bool]] = {
    "sigmoid": (0.0, True, 0.5, False),
    "robust": (0.0, True, 0.5, False),
    "sigmoid_norm": (0.0, True, 0.5, False),
    "simpo": (0.0, True, 0.5, False),
    "exo_pair": (0.0, False, 0.5, False),
    "aot": (0.0, True, 0.5, False),
    "aot_unpaired": (0.0, True, 0.5, False),
}
_REFERENCE_FREE = frozenset({"simpo", "sft"})
_NEEDS_LENGTHS = frozenset({"sigmoid_norm"})
# Types defined on per-token averages: given lengths, they divide (sum) scores by them.
_USES_LENGTHS = frozenset({"sigmoid_norm", "ipo", "simpo"})
# Types whose pair losses depend on the other pairs of the batch (sorted batch log-ratios).
_COUPLED = frozenset({"aot", "aot_unpaired"})

# f-DPO (Wang et al. 2023, arXiv 2309.16240): the regularizers, and the types that may use one
# other than reverse KL -- TRL's list: the types built on the chosen-minus-rejected difference,
# where the partition function cancels (sft reads token log-probs, so any f leaves it alone).
F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_F_DIVERGENCE_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# TRL 1.16's DPOConfig defaults.
DISCOPOP_TAU = 0.05
F_ALPHA_DIVERGENCE_COEF = 0.5

# SimPO's target reward margin: the official trainer's defaults are beta = 2.0 and
# gamma / beta = 0.25, i.e. gamma = 0.5 (TRL's CPOConfig.simpo_gamma default is 0.5 too).
SIMPO_GAMMA = 0.5


@dataclass(frozen=True)
class LossConfig:
    """A checked, normalized loss configuration (see :func:`check_loss_config`); its field
    names are :func:`fastdpo.losses.pairwise.preference_loss`'s keyword arguments."""

    loss_type: tuple[str, ...]
    beta: float
    label_smoothing: float
    loss_weights: tuple[float, ...]
    gamma: float
    bco_delta: float | str | Tensor
    discopop_tau: float = DISCOPOP_TAU
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF

    @property
    def needs_reference(self) -> bool:
        """False when every type is reference-free (``simpo``, ``sft``): no reference model
        needed."""
        return any(t not in _REFERENCE_FREE for t in self.loss_type)

    @property
    def couples_pairs(self) -> bool:
        """True when a pair's loss depends on other pairs of the batch (``aot``,
        ``aot_unpaired``, ``bco_pair`` with ``bco_delta="batch"``): the loss must see the
        whole batch at once (the DPO head op takes it as one group)."""
        batch_shift = "bco_pair" in self.loss_type and isinstance(self.bco_delta, str)
        return batch_shift or any(t in _COUPLED for t in self.loss_type)

    @property
    def needs_lengths(self) -> bool:
        """True when ``chosen_lengths``/``rejected_lengths`` must be passed (``sigmoid_norm``)."""
        return any(t in _NEEDS_LENGTHS for t in self.loss_type)


def _interval(lo: float, lo_in: bool, hi: float, hi_in: bool) -> str:
    return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def check_loss_config(
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Sequence[float] | None = None,
    *,
    gamma: float = SIMPO_GAMMA,
    bco_delta: float | str | Tensor = 0.0,
    discopop_tau: float = DISCOPOP_TAU,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = F_ALPHA_DIVERGENCE_COEF,
) -> LossConfig:
    """Check the non-tensor loss options once (e.g. in a module's ``__init__``).

    Returns a frozen :class:`LossConfig` with ``loss_type`` as a tuple of names and
    ``loss_weights`` as a tuple of floats of the same length.  Raises ``TypeError`` (wrong
    kind) or ``ValueError`` (bad value) naming the argument:

    - ``loss_type``: a name in :data:`LOSS_TYPES` or a non-empty sequence of distinct names.
    - ``beta``: finite, > 0.
    - ``label_smoothing``: finite; in [0, 0.5) for ``sigmoid``, ``robust``, ``sigmoid_norm``,
      ``simpo``, ``aot``, ``aot_unpaired``; in (0, 0.5) for ``exo_pair``; must lie in every range of the chosen types that
      read it (one value is shared, as in TRL), and be 0 when none of them does.
    - ``loss_weights``: ``None`` (all 1) or one finite weight >= 0 per type, not all 0.
    - ``gamma``: finite, >= 0 (SimPO's target margin).
    - ``bco_delta``: a finite float, ``"batch"``, or a 0-D/1-D floating tensor.
    - ``discopop_tau``: finite, > 0 (DiscoPOP's temperature).
    - ``f_divergence_type``: one of :data:`F_DIVERGENCES`; other than ``"reverse_kl"`` only
      with types among ``sigmoid``, ``sigmoid_norm``, ``hinge``, ``ipo``, ``exo_pair``,
      ``robust``, ``discopop``, ``sft`` (TRL's list: the others have no f-DPO form).
    - ``f_alpha_divergence_coef``: finite.
    """
    types = _loss_types(loss_type)
    beta = _checks.positive_finite("beta", beta)
    eps = _label_smoothing(label_smoothing, types)
    weights = _loss_weights(loss_weights, types)
    gamma = _checks.real_number("gamma", gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (SimPO's target reward margin), got {gamma!r}")
    bco_delta = _bco_delta(bco_delta)
    tau = _checks.positive_finite("discopop_tau", discopop_tau)
    f = _checks.choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    if f != "reverse_kl" and not set(types) <= _F_DIVERGENCE_TYPES:
        bad = tuple(t for t in types if t not in _F_DIVERGENCE_TYPES)
        raise ValueError(
            f"f_divergence_type={f!r} is only defined for loss_type in "
            f"{tuple(sorted(_F_DIVERGENCE_TYPES))}, got {bad}: use f_divergence_type='reverse_kl' "
            f"with them"
        )
    alpha = _checks.real_number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    return LossConfig(types, beta, eps, weights, gamma, bco_delta, tau, f, alpha)


def _loss_types(loss_type) -> tuple[str, ...]:
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif isinstance(loss_type, Sequence) and all(isinstance(t, str) for t in loss_type):
        types = tuple(loss_type)
    else:
        raise TypeError(
            f"loss_type must be a name or a sequence of names, got {type(loss_type).__name__}"
        )
    if not types:
        raise ValueError(f"loss_type must name at least one of {LOSS_TYPES}, got an empty list")
    for t in types:
        if t not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {t!r}")
    if len(set(types)) != len(types):
        raise ValueError(f"loss_type lists a name twice ({types}); use loss_weights instead")
    return types


def _label_smoothing(label_smoothing, types: tuple[str, ...]) -> float:
    eps = _checks.real_number("label_smoothing", label_smoothing)
    readers = [t for t in types if t in _SMOOTHING_RANGE]
    if not readers and eps != 0.0:
        raise ValueError(
            f"label_smoothing must be 0 for loss_type {types} (only "
            f"{tuple(_SMOOTHING_RANGE)} use it), got {eps!r}"
        )
    for t in readers:
        lo, lo_in, hi, hi_in = _SMOOTHING_RANGE[t]
        if not ((lo <= eps if lo_in else lo < eps) and (eps <= hi if hi_in else eps < hi)):
            raise ValueError(
                f"label_smoothing must be in {_interval(lo, lo_in, hi, hi_in)} for "
                f"loss_type {t!r}, got {eps!r}"
            )
    return eps


def _loss_weights(loss_weights, types: tuple[str, ...]) -> tuple[float, ...]:
    if loss_weights is None:
        return (1.0,) * len(types)
    if isinstance(loss_weights, (str, Tensor)) or not isinstance(loss_weights, Sequence):
        raise TypeError(
            f"loss_weights must be a sequence of numbers or None, got "
            f"{type(loss_weights).__name__}"
        )
    if len(loss_weights) != len(types):
        raise ValueError(
            f"loss_weights must have one weight per loss type ({len(types)}: {types}), "
            f"got {len(loss_weights)}"
        )
    weights = tuple(_checks.real_number("loss_weights", w) for w in loss_weights)
    if any(w < 0 for w in weights):
        raise ValueError(f"loss_weights must be >= 0, got {tuple(loss_weights)}")
    if not any(w > 0 for w in weights):
        raise ValueError(f"loss_weights must not all be 0, got {tuple(loss_weights)}")
    return weights


def _bco_delta(bco_delta):
    if isinstance(bco_delta, str):
        if bco_delta != "batch":
            raise ValueError(f"bco_delta must be a number, 'batch' or a tensor, got {bco_delta!r}")
    elif isinstance(bco_delta, Tensor):
        if bco_delta.ndim > 1 or not bco_delta.is_floating_point():
            raise TypeError(
                f"bco_delta must be a 0-D or (B,) floating tensor, got shape "
                f"{tuple(bco_delta.shape)} and dtype {bco_delta.dtype}"
            )
    else:
        bco_delta = _checks.real_number("bco_delta", bco_delta)
    return bco_delta
