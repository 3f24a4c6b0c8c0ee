"""Hypothesis profiles for fastdpo's property tests.

``ci`` (the default) runs few, derandomized examples so a CI run is short and repeatable;
``deep`` runs many fresh random examples: select it with ``FASTDPO_HYPOTHESIS_PROFILE=deep``.

The profiles are registered here and *applied per test* (``@PROFILE``, or :func:`scaled`),
never loaded globally with ``settings.load_profile``: other test modules (test_losses.py)
keep their own settings.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,  # interpreted Triton kernels and model steps have no steady timing
    derandomize=True,  # the same examples every run: CI never flakes on a fresh draw
    suppress_health_check=_SLOW_IS_FINE,
    print_blob=True,
)
settings.register_profile(
    "deep",
    max_examples=300,
    deadline=None,
    suppress_health_check=_SLOW_IS_FINE,
    print_blob=True,
)

PROFILE_NAME = os.environ.get("FASTDPO_HYPOTHESIS_PROFILE", "ci")
if PROFILE_NAME not in ("ci", "deep"):
    raise ValueError(
        f"FASTDPO_HYPOTHESIS_PROFILE must be 'ci' or 'deep', got {PROFILE_NAME!r}"
    )
PROFILE = settings.get_profile(PROFILE_NAME)


def scaled(factor: float) -> settings:
    """The selected profile with ``factor`` times its examples (at least 3).

    Expensive properties (interpreted Triton kernels, model steps) run fewer examples than
    cheap ones in the same profile; ``deep`` scales them all up together.
    """
    return settings(PROFILE, max_examples=max(3, round(PROFILE.max_examples * factor)))
