"""Ahead-of-time build report of fastdpo's Triton kernels; needs no GPU.

    python -m fastdpo.kernel_report [--json]

Compiles every shipped kernel specialization (``fastdpo.kernels.sequence_logprobs.aot_specs``)
with ``triton.compile`` for sm_80 and sm_90, runs the ptxas bundled with Triton with ``-v``
on each PTX for registers and spills, and scans the PTX for 128-bit global loads/stores.
Exits 1 if a kernel fails to compile, spills, or misses 128-bit loads where its rows are
16-byte aligned (V % 16 == 0).

``triton.jit`` picks interpreted or compiled at decoration time from TRITON_INTERPRET, and
the interpreter cannot compile; so under TRITON_INTERPRET=1 this re-runs itself in a
subprocess without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

TARGETS = (80, 90)

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# ld.global[.qualifiers].vN.<type><bits>, e.g. "@%p6 ld.global.v4.b32" or
# "ld.global.L1::evict_last.v2.b64"; N * bits = 128 is a full-width vector access.
_VEC_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+)*?\.v(\d)\.[bfsu](\d+)\b")
_ANY_ACCESS = re.compile(r"\b(ld|st)\.global\b")


@dataclasses.dataclass
class Row:
    kernel: str
    dtype: str
    V: int
    block_v: int
    num_warps: int
    target: str
    ok: bool
    error: str = ""
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    loads_128: int = 0
    stores_128: int = 0
    global_loads: int = 0
    vec_expected: bool = False
    seconds: float = 0.0

    @property
    def vectorized(self) -> bool:
        return self.loads_128 > 0 and (self.kernel != "bwd" or self.stores_128 > 0)

    @property
    def failed(self) -> bool:
        return (not self.ok or self.spill_stores != 0 or self.spill_loads != 0
                or (self.vec_expected and not self.vectorized))


def _ptxas_info(ptx: str, cc: int, fp_fusion: bool) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from the bundled ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # The flags Triton's own make_cubin passes, so the numbers are those of the shipped cubin.
        cmd = [get_ptxas(cc).path, "-v", "--regAllocOptLevel=2", *([] if fp_fusion else ["--fmad=false"]),
               f"--gpu-name={sm_arch_from_capability(cc)}", src, "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    regs, spills = _REGS.search(log), _SPILLS.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def _scan_ptx(ptx: str) -> tuple[int, int, int]:
    """(128-bit global loads, 128-bit global stores, all global loads) in the PTX."""
    loads_128 = stores_128 = 0
    for op, lanes, bits in _VEC_ACCESS.findall(ptx):
        if int(lanes) * int(bits) == 128:
            if op == "ld":
                loads_128 += 1
            else:
                stores_128 += 1
    global_loads = sum(1 for op in _ANY_ACCESS.findall(ptx) if op == "ld")
    return loads_128, stores_128, global_loads


def _compile_one(job: tuple[tuple[int, ...], int, int]) -> Row:
    vocabs, index, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdpo.kernels.sequence_logprobs import aot_specs

    spec = aot_specs(vocabs)[index]
    row = Row(spec.name, spec.dtype, spec.V, spec.block_v, spec.num_warps, f"sm_{cc}", ok=False,
              vec_expected=spec.V % 16 == 0)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # Triton 3.9 warns that its fp-fusion default will change; the launchers use
            # the default, so the report does too.
            warnings.simplefilter("ignore", UserWarning)
            compiled = triton.compile(
                ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs),
                target=GPUTarget("cuda", cc, 32),
                options={"num_warps": spec.num_warps},
            )
        ptx = compiled.asm["ptx"]
        row.registers, row.spill_stores, row.spill_loads = _ptxas_info(
            ptx, cc, bool(compiled.metadata.enable_fp_fusion))
        row.shared = int(compiled.metadata.shared)
        row.loads_128, row.stores_128, row.global_loads = _scan_ptx(ptx)
        row.ok = True
    except Exception as exc:  # a report: record the failure, keep going
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    row.seconds = time.perf_counter() - start
    return row


def build_report(vocabs: tuple[int, ...] | None = None, workers: int | None = None) -> list[Row]:
    """Compile every shipped specialization (for `vocabs`, default AOT_VOCABS) for every
    target; one Row each."""
    from fastdpo.kernels.sequence_logprobs import AOT_VOCABS, aot_specs

    vocabs = tuple(vocabs or AOT_VOCABS)
    jobs = [(vocabs, i, cc) for i in range(len(aot_specs(vocabs))) for cc in TARGETS]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        return [_compile_one(job) for job in jobs]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_one, jobs))


def _format_table(rows: list[Row]) -> str:
    header = ("kernel", "dtype", "V", "BLOCK_V", "warps", "target", "regs", "spill st/ld",
              "smem B", "128-bit ld/st", "vectorized", "status")
    lines = []
    for r in rows:
        status = "FAIL " + r.error if not r.ok else ("FAIL" if r.failed else "ok")
        lines.append((r.kernel, r.dtype, str(r.V), str(r.block_v), str(r.num_warps), r.target,
                      str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared),
                      f"{r.loads_128}/{r.stores_128}", "yes" if r.vectorized else "no", status))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m fastdpo.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--vocab", type=int, action="append", metavar="V",
                        help="report only this vocabulary size (repeatable; default: the shipped set)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "fastdpo.kernel_report", *argv], env=env).returncode

    import triton

    from fastdpo.kernels.sequence_logprobs import AOT_VOCABS

    start = time.perf_counter()
    rows = build_report(tuple(args.vocab or ()), args.workers)
    failed = any(r.failed for r in rows)
    if args.json:
        print(json.dumps({
            "triton": triton.__version__,
            "seconds": round(time.perf_counter() - start, 2),
            "ok": not failed,
            "kernels": [dict(dataclasses.asdict(r), vectorized=r.vectorized, failed=r.failed) for r in rows],
        }, indent=1))
    else:
        print(f"fastdpo kernels, triton {triton.__version__}, compiled ahead of time (no GPU)")
        for V in args.vocab or AOT_VOCABS:
            print(f"  V={V}: {AOT_VOCABS.get(V, 'requested')}")
        print(_format_table(rows))
        print(f"{len(rows)} builds in {time.perf_counter() - start:.1f} s: "
              f"{'FAILED' if failed else 'all compiled, no spills'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
