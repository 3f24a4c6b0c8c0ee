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
providers (the :data:`PROVIDERS` registry)
    ``floor``           the work no implementation avoids.  step: the model bodies
                        (``return_embeddings=True``) plus the four head products
                        (2B(L-1), D) x (D, V) -- reference forward, policy forward, two
                        policy backward -- as plain ``torch.mm``; head: one ``logsumexp`` over
                        the logits, plus writing the softmax-sized gradient once.
    ``body``            step only: the model bodies alone, no head.  Its peak memory is what
                        the ``head MiB`` column subtracts.
    ``x-transformers``  ``x_transformers.dpo.DPO`` (step), its ``log_softmax`` + ``einx``
                        gather + ``masked_mean`` (head).
    ``torch``           plain torch with x-transformers' numbers: one batch of 2B,
                        ``log_softmax`` + ``gather`` + masked sum / count.
    ``trl``             TRL's convention, written here (no trl dependency): one batch of 2B,
                        ``log_softmax`` + ``gather``, the mask aligned with the *target*
                        (``mask[:, 1:]``), the *sum* of token log-probs.
    ``liger``           step only: Liger-Kernel's ``LigerFusedLinearDPOLoss`` on the body's
                        hidden states and the head weight (Liger never builds logits, so it has
                        no head-workload form).  Liger's chunked loss computes the gradient
                        inside its forward, so its ``forward`` mode already pays for it.
    ``fastdpo-torch``   ``fastdpo.DPO`` / ``sequence_logprobs`` with ``impl="torch"``.
    ``fastdpo-triton``  the same with ``impl="triton"``: CUDA only (a row says so elsewhere).

A provider is a builder ``(workload, mode, cfg) -> step`` registered with :func:`register`;
``step()`` runs one iteration and returns the loss (or ``None``).  A builder that cannot run
here raises :class:`Unavailable` (reported as ``unavailable``); any other exception, in the
builder, a step or the memory measurement, is reported as ``failed`` with a one-line reason,
and the suite goes on.

Time: the median over ``--repeats`` calls after ``--warmup`` calls (CUDA events on a GPU,
``time.perf_counter`` on the CPU), each provider's calls back to back, as a training loop
repeats its step (:func:`fastdpo.bench.measure.time_steps` says why not interleaved); ratios
to ``x-transformers`` and to ``floor`` come from the same run.

Modes: ``forward`` is an evaluation step, the loss under ``torch.no_grad()``;
``forward+backward`` a training step.

Peak memory.  CUDA: ``torch.cuda.max_memory_allocated`` during one call, above what was
allocated before it (after the warm-up), in the timing process.  CPU: one fresh process per
provider, workload, mode and size (forked from a server that has only imported the modules,
to skip a 4 s import per measurement); it builds the step, calls it once (compilation, lazy
caches), returns freed heap to the kernel (``malloc_trim``), resets the peak-RSS watermark
(``/proc/self/clear_refs``), calls it again and reports ``VmHWM`` minus the resident size
before that call.  glibc's default malloc keeps large freed blocks for reuse, so a peak would
carry whatever the previous call freed (on the step workload, the model body's activations);
the worker fixes the mmap threshold (``mallopt(M_MMAP_THRESHOLD)``) so every tensor above it
is returned to the kernel when freed, and the RSS tracks live tensors.  For the step workload
the ``head MiB`` column is a provider's peak minus the ``body`` peak (same mode): the memory
its loss head adds to the model.  For the head workload it is the whole peak.

Output columns (the CSV header and the JSON keys, :data:`COLUMNS`): see
``benchmarks/README.md``.
"""

from __future__ import annotations

from . import providers as _providers  # noqa: F401 -- registers the built-in providers
from .cli import _sweep, add_arguments, configs_from_args, main_from_args  # noqa: F401 -- _sweep: tests
from .config import BETA, COLUMNS, DTYPES, MODES, REFERENCES, SIZE_FIELDS, SIZES, SWEEPABLE, WORKLOADS, Config
from .inputs import Batch, head_logits, make_batch, make_models, make_step
from .measure import MemoryServer, environment, measure_memory_cuda, peak_extra_bytes, time_steps
from .registry import PROVIDERS, Builder, Provider, Step, Unavailable, applicable, load_provider_modules, register
from .report import add_ratios, format_table, plot, write_rows
from .suite import run

__all__ = [
    "BETA", "Batch", "Builder", "COLUMNS", "Config", "DTYPES", "MODES", "MemoryServer", "PROVIDERS",
    "Provider", "REFERENCES", "SIZES", "SIZE_FIELDS", "SWEEPABLE", "Step", "Unavailable", "WORKLOADS",
    "add_arguments", "add_ratios", "applicable", "configs_from_args", "environment", "format_table",
    "head_logits", "load_provider_modules", "main_from_args", "make_batch", "make_models", "make_step",
    "measure_memory_cuda", "peak_extra_bytes", "plot", "register", "run", "time_steps", "write_rows",
]
