"""Ahead-of-time compilation support shared by the kernel files (used by their ``aot_specs``,
which ``fastdpo.kernel_report`` compiles with no GPU)."""

from __future__ import annotations


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
