"""Benchmark suite: fastdpo against x-transformers, plain torch, TRL-style and Liger DPO losses.

``fastdpo bench`` (see ``fastdpo bench --help`` and ``benchmarks/README.md``) measures every
*provider* on every *workload* it applies to, in two *modes*, at one or more sizes:

workloads
    ``step``  one DPO step on an x-transformers ``TransformerWrapper``: the reference model
              (no_grad) and the policy on the 2B preferred + unpreferred sequences, the loss,
              and in ``forward+backward`` mode the backward pass through the policy.
    ``head``  the loss head alone: given (2B, L-1, V) logits (a leaf tensor), the per-sequence
              masked log-probs and their gradient w.r.t. the logits.
modes
    ``forward`` (the loss under ``no_grad``: evaluation) and ``forward+backward`` (the loss and
    its ``backward``: training).
providers (the :data:`PROVIDERS` registry; ``fastdpo bench --help`` and ``benchmarks/README.md``
    list them)
    ``floor`` (the work no exact implementation avoids) and ``body`` (step only: the model
    bodies alone, the baseline of the ``head MiB`` column); the reference ``x-transformers``;
    the peers (plain torch in x-transformers' and TRL's conventions, TRL's fused head,
    cut-cross-entropy, Liger-Kernel, torch's chunked ``linear_cross_entropy``); fastdpo's routes
    (``fastdpo-torch``, ``fastdpo-triton``: CUDA only, ``fastdpo-logits``, ``fastdpo-shared``,
    ``fastdpo-precomputed``).
losses (``--loss``, :data:`LOSSES`)
    ``dpo`` (the above); ``orpo``, ``cpo``, ``simpo``, ``kto``: fastdpo's module of that loss
    against Liger-Kernel's fused module and TRL's trainer code (:mod:`fastdpo.bench.families`),
    with the loss's own floor and body and fastdpo's DPO step (``vs_dpo``) for the ratios.

A provider is a builder ``(workload, mode, cfg) -> step`` registered with :func:`register`;
``step()`` runs one iteration and returns the loss (or ``None``).  A builder that cannot run
here raises :class:`Unavailable` (reported as ``unavailable``); any other exception, in the
builder, a step or the memory measurement, is reported as ``failed`` with a one-line reason,
and the suite goes on.

Time: the median over ``--repeats`` calls after ``--warmup`` calls (CUDA events on a GPU,
``time.perf_counter`` on the CPU); ratios to ``x-transformers`` and to ``floor`` come from the
same run.  Isolation (``--isolation``, :func:`fastdpo.bench.suite.run`): ``process`` (the CPU
default) builds and times each provider in a fresh process of its own, forked from a server
that has only imported the modules (:class:`fastdpo.bench.measure.WorkerServer`), so nothing one
provider leaves in a process (a compiled peer's state, the heap it freed, caches) reaches
another's time; the timed calls are interleaved in rounds, each round in a shuffled order, each
timed call right after an untimed one of the same step.  ``shuffle`` (the CUDA default) times
every provider in the running process, one after another in a shuffled order, each one's calls
back to back.  The seed of the orders is printed and written in every row.

Modes: ``forward`` is an evaluation step, the loss under ``torch.no_grad()``;
``forward+backward`` a training step.

Peak memory.  CUDA: ``torch.cuda.max_memory_allocated`` during one call, above what was
allocated before it (after the warm-up), in the timing process.  CPU: one fresh memory worker
per provider, workload, mode and size (forked from the same server); it builds the step, calls
it once (compilation, lazy caches), returns freed heap to the kernel (``malloc_trim``), resets
the peak-RSS watermark (``/proc/self/clear_refs``), calls it again and reports ``VmHWM`` minus
the resident size before that call.  glibc's default malloc keeps large freed blocks for reuse,
so a peak would carry whatever the previous call freed (on the step workload, the model body's
activations); the worker fixes the mmap threshold (``mallopt(M_MMAP_THRESHOLD)``) so every
tensor above it is returned to the kernel when freed, and the RSS tracks live tensors.  For the
step workload the ``head MiB`` column is a provider's peak minus the ``body`` peak (same mode):
the memory its loss head adds to the model.  For the head workload it is the whole peak.

Output columns (the CSV header and the JSON keys, :data:`COLUMNS`): see
``benchmarks/README.md``.
"""

from __future__ import annotations

from . import providers as _providers  # noqa: F401 -- registers the built-in providers
from . import families as _families  # noqa: F401 -- and the loss families' (--loss)
from .cli import _sweep, add_arguments, configs_from_args, main_from_args  # noqa: F401 -- _sweep: tests
from .config import BETA, COLUMNS, DTYPES, LOSSES, MODES, REFERENCES, SIZE_FIELDS, SIZES, SWEEPABLE, WORKLOADS, Config
from .inputs import Batch, head_logits, make_batch, make_models, make_step
from .measure import WorkerServer, environment, measure_memory_cuda, peak_extra_bytes, time_steps
from .registry import PROVIDERS, Builder, Provider, Step, Unavailable, applicable, load_provider_modules, register
from .report import add_ratios, format_table, plot, summary, write_rows
from .suite import ISOLATIONS, default_isolation, run

__all__ = [
    "BETA", "Batch", "Builder", "COLUMNS", "Config", "DTYPES", "ISOLATIONS", "LOSSES", "MODES", "PROVIDERS",
    "Provider", "REFERENCES", "SIZES", "SIZE_FIELDS", "SWEEPABLE", "Step", "Unavailable", "WORKLOADS",
    "WorkerServer", "add_arguments", "add_ratios", "applicable", "configs_from_args", "default_isolation",
    "environment", "format_table", "head_logits", "load_provider_modules", "main_from_args", "make_batch",
    "make_models", "make_step", "measure_memory_cuda", "peak_extra_bytes", "plot", "register", "run", "summary",
    "time_steps", "write_rows",
]
