"""What both kernel files share: dtypes, launch options, the autotuning switch, and the
mirror of the JIT's specialization that their ``aot_specs`` use (``fastdpo.kernel_report``
compiles those ahead of time with no GPU)."""

from __future__ import annotations

import os

import torch

# Input dtypes every kernel takes, and their Triton names.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Passed to every launch and to the ahead-of-time builds.  Triton <= 3.9 contracts a * b + c
# into one FMA by default, 3.9 warns that the default will change and 3.10 turns it off:
# naming it keeps the bits (and the float32 FMA throughput of the linear kernels) the same
# on every Triton version.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (TRITON_INTERPRET=1, read by triton when
    it decorates a kernel): through ``triton.knobs`` where triton has it (>= 3.4)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """``FASTDPO_AUTOTUNE=1``: search tile configurations instead of the shipped ones.

    Read per call, never at import, so a process can switch it on after importing fastdpo.
    Autotuning gives up bitwise run-to-run reproducibility: the configuration it picks by
    timing decides the order of the floating-point sums, and may differ between processes.
    """
    return os.environ.get("FASTDPO_AUTOTUNE", "0") == "1"


# Triton's pointer type of each tensor dtype the kernels take.
POINTER_TYPES = {**TRITON_DTYPE, torch.int64: "i64", torch.bool: "u1"}


class Example:
    """A stand-in for a tensor (contiguous unless ``strides`` says otherwise) in the
    launch-argument builders (``*_args``), so that the ahead-of-time specs are built by the
    very function the launchers call: adding a kernel argument is an edit of the kernel and of
    its builder, not of a third list."""

    def __init__(self, dtype: torch.dtype, *shape: int, strides: tuple[int, ...] | None = None):
        self.dtype, self.shape, self.strides = dtype, shape, strides

    def stride(self, dim: int) -> int:
        if self.strides is not None:  # a view the launcher makes (an expanded vector, say)
            return self.strides[dim]
        out = 1
        for size in self.shape[dim + 1 if dim >= 0 else len(self.shape) + dim + 1:]:
            out *= size
        return out


def aot_example(args: dict[str, object], **constexprs: object) -> dict[str, object]:
    """A builder's arguments for :func:`specialize`: stand-ins become pointer types, and the
    constexprs are added as ("constexpr", value)."""
    out = {k: "*" + POINTER_TYPES[v.dtype] if isinstance(v, Example) else v for k, v in args.items()}
    out.update({k: ("constexpr", v) for k, v in constexprs.items()})
    return out


def specialize(fn, example: dict[str, object]) -> tuple[dict, dict, dict]:
    """Mirror the JIT's specialization of one launch, for ``triton.compile(ASTSource(...))``:
    ints equal to 1 become constexprs, bools and floats get their scalar types, 16-byte-aligned
    pointers and multiples of 16 get tt.divisibility=16.  ``example`` maps each argument name
    to a value, a pointer type string ("*fp32", ...) or ("constexpr", value)."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = example[name]
        if isinstance(value, tuple):  # ("constexpr", value)
            signature[name], constexprs[name] = "constexpr", value[1]
        elif isinstance(value, str):  # a pointer: "*fp32", ...; torch allocations are aligned
            signature[name] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs
