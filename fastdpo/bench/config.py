"""The bench's sizes, workloads, modes, dtypes and output columns; :class:`Config`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Presets.  ``small`` is what scripts/bench.sh runs: every provider, both workloads, both
# modes, under 3 minutes on 2 CPU cores; V = 8192 keeps the head a large share of the step.
# prompt_pct: each prompt's share of L in percent; 0 (the presets) draws each prompt's length
# between L/8 and L/2.  lengths: "full" (every sequence L tokens, no padding) or "ragged"
# (long-tailed prompt and completion lengths, right padding to the batch's longest: see
# fastdpo.bench.inputs.ragged_lengths and benchmarks/README.md).
SIZES: dict[str, dict] = {
    "tiny": dict(batch=1, seq_len=32, vocab=512, dim=32, depth=1, heads=2, prompt_pct=0, lengths="full", repeats=1),
    "small": dict(batch=2, seq_len=128, vocab=8192, dim=128, depth=2, heads=4, prompt_pct=0, lengths="full", repeats=10),
    "medium": dict(batch=4, seq_len=512, vocab=32000, dim=256, depth=2, heads=4, prompt_pct=0, lengths="full", repeats=5),
    # A GPU size: x-transformers' step holds ~5 (2B(L-1), V) float32 buffers, ~9 GiB here.
    "large": dict(batch=8, seq_len=1024, vocab=32000, dim=512, depth=4, heads=8, prompt_pct=0, lengths="full", repeats=10),
}
SIZE_FIELDS = ("batch", "seq_len", "vocab", "dim", "depth", "heads", "prompt_pct", "lengths")
LENGTHS = ("full", "ragged")
WORKLOADS = ("step", "head")
MODES = ("forward", "forward+backward")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWEEPABLE = ("vocab", "seq_len", "prompt_pct")
BETA = 0.1

# The losses the bench measures (--loss): DPO, and the families of fastdpo.ORPO, fastdpo.CPO
# (sigmoid, and SimPO) and fastdpo.KTO, each on the same models and sequences.
LOSSES = ("dpo", "orpo", "cpo", "simpo", "kto")

# The ratios' denominators: always measured, whatever --providers says.  DPO: the floor and
# x-transformers.  Another loss: its own floor (the bodies and head products that loss cannot
# avoid) and fastdpo's DPO step on the same sequences (the "vs DPO" column), since
# x-transformers has no such loss.
REFERENCES = ("floor", "x-transformers")
FAMILY_REFERENCES = ("floor", "fastdpo-torch")


def references(loss: str) -> tuple[str, ...]:
    """The providers every run of ``loss`` measures, for the ratios."""
    return REFERENCES if loss == "dpo" else FAMILY_REFERENCES

COLUMNS = (
    "provider", "loss", "workload", "mode", "status", "reason",
    "median_ms", "min_ms", "repeats", "vs_xt", "vs_dpo", "vs_floor", "isolation", "seed", "order", "pid",
    "peak_mib", "body_mib", "head_mib", "mem_vs_xt", "head_mem_vs_xt", "tokens_padded", "tokens_packed",
    *SIZE_FIELDS, "dtype", "device", "device_name",
    "torch", "triton", "x_transformers", "liger_kernel", "trl", "cut_cross_entropy", "fastdpo", "fastdpo_commit",
    "threads", "date",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One size point: the model, the batch, the dtype and the device; ``loss`` (one of
    :data:`LOSSES`) says which loss's providers, floor and body run on it."""

    batch: int
    seq_len: int
    vocab: int
    dim: int
    depth: int
    heads: int
    prompt_pct: int = 0
    lengths: str = "full"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    loss: str = "dpo"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
