"""Ahead-of-time build report of fastdpo's Triton kernels; needs no GPU.

    python -m fastdpo.kernel_report [--json] [--vocab V ...] [--linear D,V ...]

Compiles every shipped kernel specialization (``fastdpo.kernels.sequence_logprobs.aot_specs``
and ``fastdpo.kernels.linear_sequence_logprobs.aot_specs``) with ``triton.compile`` for sm_80
and sm_90, runs the ptxas bundled with Triton with ``-v`` on each PTX for registers and
spills, reads the shared memory from the compiled metadata, and scans the PTX for 128-bit
global loads/stores, 16-byte cp.async copies and tensor-core instructions. Exits 1 if a
kernel fails to compile, spills, needs more shared memory than the target has, misses
128-bit loads where its rows are 16-byte aligned (V % 16 == 0; for the fused linear
kernels, whose rows the launchers always align: 16-byte cp.async tiles), or uses tensor
cores where it must not (float32 tiles are IEEE FMAs) or misses them where it must.

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

TARGETS = (80, 90)
# Largest shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# 163 KiB on an A100, 227 KiB on an H100; ptxas does not check it, the launch would fail.
SMEM_LIMIT = {80: 166912, 90: 232448}

_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
# ld.global[.qualifiers].vN.<type><bits>, e.g. "@%p6 ld.global.v4.b32" or
# "ld.global.L1::evict_last.v2.b64"; N * bits = 128 is a full-width vector access.
_VEC_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[\w:]+)*?\.v(\d)\.[bfsu](\d+)\b")
_ANY_ACCESS = re.compile(r"\b(ld|st)\.global\b")
# cp.async.cg.shared.global [dst], [src], 16[, src-size]: a 16-byte global -> shared copy
# (how pipelined tl.dot operands are loaded on sm_80 and sm_90).
_CP_ASYNC_16 = re.compile(r"\bcp\.async\.c[ag]\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(?:16|0x10)\b")
# mma.sync (sm_80 tensor cores) or wgmma.mma_async (sm_90).
_MMA = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async)\b")


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
    # the fused linear kernels (family "linear"); defaults for the sequence kernels
    family: str = "sequence"
    D: int = 0
    block_m: int = 0
    block_d: int = 0
    num_stages: int = 0
    cp_async_128: int = 0
    mma: int = 0
    tensor_cores_expected: bool | None = None  # None: not checked

    @property
    def vectorized(self) -> bool:
        if self.family == "linear":
            # Their tiles reach shared memory through cp.async, not ld.global.
            return self.cp_async_128 > 0
        return self.loads_128 > 0 and (not self.kernel.startswith("bwd") or self.stores_128 > 0)

    @property
    def smem_ok(self) -> bool:
        return self.shared <= SMEM_LIMIT.get(int(self.target.removeprefix("sm_")), self.shared)

    @property
    def tensor_cores_ok(self) -> bool:
        return self.tensor_cores_expected is None or (self.mma > 0) == self.tensor_cores_expected

    @property
    def failed(self) -> bool:
        return (not self.ok or self.spill_stores != 0 or self.spill_loads != 0
                or (self.vec_expected and not self.vectorized)
                or not self.smem_ok or not self.tensor_cores_ok)


def _ptxas_info(ptx: str, cc: int, fp_fusion: bool) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from the bundled ptxas -v."""
    import inspect

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    # triton >= 3.5 picks a ptxas per architecture; 3.4 has one.
    ptxas = get_ptxas(cc) if inspect.signature(get_ptxas).parameters else get_ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # The flags Triton's own make_cubin passes, so the numbers are those of the shipped cubin.
        cmd = [ptxas.path, "-v", "--regAllocOptLevel=2", *([] if fp_fusion else ["--fmad=false"]),
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


def _spec(job):
    """(spec, Row without results, compile options) of one job."""
    family, selection, index, cc = job
    if family == "linear":
        from fastdpo.kernels.linear_sequence_logprobs import aot_specs

        spec = aot_specs(selection)[index]
        cfg = spec.config
        gemm = spec.name != "lin_combine"
        row = Row(spec.name, spec.dtype, spec.V, cfg.block_v, cfg.num_warps, f"sm_{cc}", ok=False,
                  vec_expected=gemm, family="linear", D=spec.D, block_m=cfg.block_m, block_d=cfg.block_d,
                  num_stages=cfg.num_stages, tensor_cores_expected=(spec.dtype != "fp32") if gemm else None)
        return spec, row, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    from fastdpo.kernels.sequence_logprobs import aot_specs

    spec = aot_specs(selection)[index]
    row = Row(spec.name, spec.dtype, spec.V, spec.block_v, spec.num_warps, f"sm_{cc}", ok=False,
              vec_expected=spec.V % 16 == 0)
    return spec, row, {"num_warps": spec.num_warps}


def _compile_one(job: tuple[str, tuple, int, int]) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastdpo.kernels._common import LAUNCH_OPTIONS

    spec, row, options = _spec(job)
    options = {**options, **LAUNCH_OPTIONS}  # built as the launchers launch them
    cc = job[3]
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(spec.fn, spec.signature, spec.constexprs, spec.attrs),
            target=GPUTarget("cuda", cc, 32),
            options=options,
        )
        ptx = compiled.asm["ptx"]
        row.registers, row.spill_stores, row.spill_loads = _ptxas_info(
            ptx, cc, bool(compiled.metadata.enable_fp_fusion))
        row.shared = int(compiled.metadata.shared)
        row.loads_128, row.stores_128, row.global_loads = _scan_ptx(ptx)
        row.cp_async_128 = len(_CP_ASYNC_16.findall(ptx))
        row.mma = len(_MMA.findall(ptx))
        row.ok = True
    except Exception as exc:  # a report: record the failure, keep going
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    row.seconds = time.perf_counter() - start
    return row


def build_report(vocabs: tuple[int, ...] | None = None, workers: int | None = None,
                 linear_shapes: tuple[tuple[int, int], ...] | None = None) -> list[Row]:
    """Compile every shipped specialization for every target, one Row each: the sequence
    kernels for `vocabs` and the fused linear kernels for `linear_shapes` ((D, V) pairs).
    Naming only one of the two builds only that family; naming neither builds the shipped
    sets (AOT_VOCABS and AOT_SHAPES)."""
    from fastdpo.kernels import linear_sequence_logprobs as linear
    from fastdpo.kernels import sequence_logprobs as sequence

    if not vocabs and not linear_shapes:
        vocabs, linear_shapes = tuple(sequence.AOT_VOCABS), tuple(linear.AOT_SHAPES)
    vocabs, linear_shapes = tuple(vocabs or ()), tuple(linear_shapes or ())
    jobs = []
    # The linear kernels take several times longer to build: queued first, the pool's tail
    # is short sequence builds.
    if linear_shapes:
        n = len(linear.aot_specs(linear_shapes))
        jobs += [("linear", linear_shapes, i, cc) for i in range(n) for cc in TARGETS]
    if vocabs:
        n = len(sequence.aot_specs(vocabs))
        jobs += [("sequence", vocabs, i, cc) for i in range(n) for cc in TARGETS]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1:
        rows = [_compile_one(job) for job in jobs]
    else:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(_compile_one, jobs))
    # A stable order for the report: the sequence kernels, then the linear ones.
    return [r for r in rows if r.family == "sequence"] + [r for r in rows if r.family == "linear"]


def _table(header: tuple[str, ...], lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def _status(r: Row) -> str:
    if not r.ok:
        return "FAIL " + r.error
    if not r.smem_ok:
        return "FAIL shared memory"
    if not r.tensor_cores_ok:
        return "FAIL tensor cores"
    return "FAIL" if r.failed else "ok"


def _format_table(rows: list[Row]) -> str:
    header = ("kernel", "dtype", "V", "BLOCK_V", "warps", "target", "regs", "spill st/ld",
              "smem B", "128-bit ld/st", "vectorized", "status")
    lines = []
    for r in rows:
        lines.append((r.kernel, r.dtype, str(r.V), str(r.block_v), str(r.num_warps), r.target,
                      str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared),
                      f"{r.loads_128}/{r.stores_128}", "yes" if r.vectorized else "no", _status(r)))
    return _table(header, lines)


def _format_linear_table(rows: list[Row]) -> str:
    header = ("kernel", "dtype", "D", "V", "BLOCK MxVxD", "warps", "stages", "target", "regs",
              "spill st/ld", "smem B", "16B cp.async", "128-bit ld/st", "mma", "status")
    lines = []
    for r in rows:
        blocks = f"{r.block_m}x{r.block_v}x{r.block_d}" if r.block_v else str(r.block_m)
        lines.append((r.kernel, r.dtype, str(r.D), str(r.V), blocks, str(r.num_warps), str(r.num_stages),
                      r.target, str(r.registers), f"{r.spill_stores}/{r.spill_loads}", str(r.shared),
                      str(r.cp_async_128), f"{r.loads_128}/{r.stores_128}", str(r.mma), _status(r)))
    return _table(header, lines)


def _linear_shape(text: str) -> tuple[int, int]:
    try:
        D, V = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected D,V (two integers), got {text!r}") from None
    return D, V


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m fastdpo.kernel_report", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--vocab", type=int, action="append", metavar="V",
                        help="report only the sequence kernels for this vocabulary size (repeatable; "
                             "default: the shipped set)")
    parser.add_argument("--linear", type=_linear_shape, action="append", metavar="D,V",
                        help="report only the fused linear kernels for this hidden size and vocabulary "
                             "(repeatable; default: the shipped set); with --vocab, both")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: CPU count)")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "fastdpo.kernel_report", *argv], env=env).returncode

    import triton

    from fastdpo.kernels.linear_sequence_logprobs import AOT_SHAPES
    from fastdpo.kernels.sequence_logprobs import AOT_VOCABS

    start = time.perf_counter()
    rows = build_report(tuple(args.vocab or ()), args.workers, tuple(args.linear or ()))
    failed = any(r.failed for r in rows)
    if args.json:
        print(json.dumps({
            "triton": triton.__version__,
            "seconds": round(time.perf_counter() - start, 2),
            "ok": not failed,
            "kernels": [dict(dataclasses.asdict(r), vectorized=r.vectorized, failed=r.failed) for r in rows],
        }, indent=1))
    else:
        sequence_rows = [r for r in rows if r.family == "sequence"]
        linear_rows = [r for r in rows if r.family == "linear"]
        print(f"fastdpo kernels, triton {triton.__version__}, compiled ahead of time (no GPU)")
        if sequence_rows:
            for V in args.vocab or AOT_VOCABS:
                print(f"  V={V}: {AOT_VOCABS.get(V, 'requested')}")
            print(_format_table(sequence_rows))
        if linear_rows:
            print("fused linear + log-prob kernels (kernels/linear_sequence_logprobs.py)")
            for D, V in args.linear or AOT_SHAPES:
                print(f"  D={D}, V={V}: {AOT_SHAPES.get((D, V), 'requested')}")
            print(_format_linear_table(linear_rows))
        print(f"{len(rows)} builds in {time.perf_counter() - start:.1f} s: "
              f"{'FAILED' if failed else 'all compiled, no spills'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
