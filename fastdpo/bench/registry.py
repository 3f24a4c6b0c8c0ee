"""The provider registry: :func:`register`, :data:`PROVIDERS`, :class:`Unavailable`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .config import LOSSES, WORKLOADS, Config


class Unavailable(Exception):
    """A provider cannot run in this setting (device, missing package): a row, not a failure."""


Step = Callable[[], "torch.Tensor | None"]
Builder = Callable[[str, str, Config], Step]


@dataclass(frozen=True)
class Provider:
    name: str
    build: Builder
    workloads: tuple[str, ...]
    help: str
    # The fastdpo.DPO options whose loss this provider's step returns (the same model, batch
    # and beta): tests/test_bench.py checks every provider against it.  None: no loss (floor, body).
    same_loss_as: dict | None = None
    # The loss its step computes (one of LOSSES; same_loss_as are options of that loss's
    # fastdpo module), and the bench's --loss values under which it is measured: its own, or
    # every one for the floor, the body and the DPO step every other loss is compared with.
    loss: str = "dpo"
    losses: tuple[str, ...] = ("dpo",)


PROVIDERS: dict[str, Provider] = {}


def register(name: str, *, workloads: Iterable[str] = WORKLOADS, help: str = "", same_loss_as: dict | None = None,
             loss: str = "dpo", losses: Iterable[str] | None = None):
    """Decorator adding ``builder(workload, mode, cfg) -> step`` to :data:`PROVIDERS`.

    ``step()`` runs one iteration of ``mode`` (``forward`` or ``forward+backward``) and
    returns the loss or ``None``; the builder allocates everything ``step`` needs (model,
    inputs) so that only the iteration is timed, and raises :class:`Unavailable` when the
    provider cannot run with ``cfg`` (e.g. on this device).  ``same_loss_as``: the
    ``fastdpo.DPO`` options (conventions) under which fastdpo computes the loss ``step()``
    returns, for the test that checks every provider computes what it claims.  ``loss``: the
    loss ``step()`` computes (``same_loss_as`` then holds options of that loss's module:
    ``fastdpo.ORPO``, ``CPO``, ``KTO``); ``losses``: the ``--loss`` runs that measure it
    (default: ``(loss,)``).
    """
    workloads = tuple(workloads)
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"workloads must be among {WORKLOADS}, got {sorted(unknown)}")
    losses = (loss,) if losses is None else tuple(losses)
    bad = {loss, *losses} - set(LOSSES)
    if bad:
        raise ValueError(f"losses must be among {LOSSES}, got {sorted(bad)}")

    def deco(builder: Builder) -> Builder:
        PROVIDERS[name] = Provider(name, builder, workloads, help, same_loss_as, loss, losses)
        return builder

    return deco


def load_provider_modules(modules: Iterable[str]) -> None:
    """Import modules that call :func:`register` (``--provider-module``): dotted names or
    ``.py`` paths.  The worker processes import them too, so their providers are measured
    like the built-in ones."""
    import importlib
    import importlib.util

    for name in modules:
        if not name.endswith(".py"):
            importlib.import_module(name)
            continue
        path = os.path.abspath(name)
        mod_name = f"_fastdpo_bench_providers_{abs(hash(path))}"
        if mod_name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[mod_name]
            raise


def is_own(name: str) -> bool:
    """fastdpo's own providers: its routes and loss modules (``fastdpo-*``) and the bench's own
    baselines (``floor``, ``body``).  One of them failing is a fastdpo bug, which the summary
    puts first and ``fastdpo bench`` exits non-zero for; a peer failing is a row like any other."""
    return name.startswith("fastdpo") or name in ("floor", "body")


def applicable(workload: str, names: Iterable[str], loss: str = "dpo") -> list[str]:
    """The providers among ``names`` that have a form for ``workload`` and are measured under
    ``--loss loss``, in registry order."""
    names = set(names)
    return [n for n, p in PROVIDERS.items() if n in names and workload in p.workloads and loss in p.losses]
