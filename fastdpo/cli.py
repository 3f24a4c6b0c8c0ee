"""The ``fastdpo`` command line.

``fastdpo bench``    time and peak memory of fastdpo against x-transformers, plain torch, a
                     TRL-style loss and Liger-Kernel, with ratios to x-transformers and to the
                     floor (:mod:`fastdpo.bench`).
``fastdpo check``    a quick self-test on this device: fastdpo against x-transformers on a tiny
                     ``TransformerWrapper``, for each implementation that runs here.
``fastdpo kernels``  the ahead-of-time build report of the Triton kernels
                     (:mod:`fastdpo.kernel_report`; its arguments pass through).
``fastdpo train``    DPO (or ORPO, CPO, SimPO, AlphaPO, KTO) on a Hugging Face causal LM from
                     JSONL records to a saved model (or LoRA adapters), as TRL trains it, with
                     evaluation, metrics.jsonl, curves, trackers, checkpoints that resume
                     exactly and torchrun/DDP/FSDP2 (:mod:`fastdpo.train`).
``fastdpo export``   a ``fastdpo train`` checkpoint (a sharded one too) as a ``save_pretrained``
                     directory (:mod:`fastdpo.train.export`).

argparse, not click or typer: five subcommands with flat options need nothing more, the
standard library adds no dependency to a library that users ``pip install`` for its loss,
and ``parser.error`` gives the one-line usage errors the tests expect.
"""

from __future__ import annotations

import argparse
import sys

# fastdpo check's tolerances (float32): the loss relative to x-transformers', the gradient of
# all policy parameters as one vector, norm-relative.
CHECK_LOSS_RTOL = 1e-6
CHECK_GRAD_RTOL = 1e-5


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, bench
    from .train import command as train_cli
    from .train import export as train_export

    parser = argparse.ArgumentParser(prog="fastdpo", description="fastdpo: fused, exact DPO losses")
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,check,export,kernels,train}")

    p = sub.add_parser(
        "bench",
        help="benchmark fastdpo against x-transformers and its peers on this device",
        description=bench.__doc__.split("\n\n")[0],
        epilog="Columns, providers and how memory is measured: benchmarks/README.md.",
    )
    bench.add_arguments(p)
    p.set_defaults(run=lambda args, error=p.error: bench.main_from_args(args, error))

    p = sub.add_parser(
        "check",
        help="self-test: fastdpo against x-transformers on a tiny model, per implementation",
        description=f"Compare fastdpo.DPO with x_transformers.dpo.DPO on a tiny TransformerWrapper for "
        f"each implementation that runs on this device: loss within {CHECK_LOSS_RTOL:g} relative, "
        f"gradients within {CHECK_GRAD_RTOL:g} norm-relative.  Exit code 1 on any failure.",
    )
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.set_defaults(run=lambda args, error=p.error: check(args.device, error))

    p = sub.add_parser(
        "export",
        help="a fastdpo train checkpoint as a save_pretrained directory (the model, or LoRA adapters)",
        description="Write the model (or LoRA adapters) of a fastdpo train checkpoint-N directory as a save_pretrained "
        "directory, with its tokenizer.  A --fsdp run's checkpoint (sharded, torch.distributed.checkpoint) is read "
        "one tensor at a time, in this process: no torchrun.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint-N directory that fastdpo train wrote")
    p.add_argument("out", metavar="OUT", help="the directory to write (new, or empty)")
    p.set_defaults(run=lambda args: train_export.main_from_args(args))

    # add_help=False: `fastdpo kernels --help` shows the report's own options.
    p = sub.add_parser("kernels", add_help=False, help="ahead-of-time build report of the Triton kernels (no GPU needed)")
    p.set_defaults(run=None)

    p = sub.add_parser(
        "train",
        help="DPO-train (or ORPO, CPO, SimPO, AlphaPO, KTO) a Hugging Face causal LM on JSONL preference records",
        description="DPO (--method: ORPO, CPO, SimPO, AlphaPO, KTO) on a Hugging Face causal LM (a save_pretrained "
        "directory), from JSONL preference records to a saved model or LoRA adapters, with TRL's defaults "
        "(gradient checkpointing, dropout off), evaluations, metrics.jsonl, curves.png, trackers and checkpoints "
        "that resume exactly; under torchrun, DDP or FSDP2.  --config FILE.yaml takes TRL's names.",
        epilog="Quick start: fastdpo train --model DIR --data data.jsonl --out out/  (README, 'fastdpo train').",
    )
    train_cli.add_arguments(p)
    p.set_defaults(run=train_cli.main_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "kernels":
        from .kernel_report import main as kernels_main

        return kernels_main(extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.run(args)


# ----------------------------------------------------------------------------- check


def _check_impls(device) -> list[tuple[str, str | None]]:
    """(impl, reason to skip or None) for every implementation."""
    out: list[tuple[str, str | None]] = [("torch", None)]
    if device.type == "cuda":
        out.append(("triton", None))
    else:
        try:
            from .kernels._common import interpreting

            interpreted = interpreting()
        except Exception:  # noqa: BLE001 -- no triton: nothing to check
            interpreted = False
        out.append(("triton", None if interpreted else f"needs CUDA (set TRITON_INTERPRET=1 to run the kernels on the {device.type} interpreter)"))
    return out


def check(device: str | None = None, error=None) -> int:
    """``fastdpo check``: prints one PASS/FAIL/SKIP line per implementation; 1 on any FAIL."""
    import torch
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.dpo import DPO as XDPO

    from fastdpo import DPO

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        (error or sys.exit)("--device: CUDA is not available here")

    b, l, v, pad = 3, 17, 97, 0

    def model():
        torch.manual_seed(0)
        return TransformerWrapper(num_tokens=v, max_seq_len=l, attn_layers=Decoder(dim=32, depth=1, heads=2)).to(dev)

    def perturb(dpo):  # the policy away from the reference: a loss and gradient that are not trivial
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in dpo.policy_model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(dev))

    g = torch.Generator().manual_seed(2)
    pref = torch.randint(1, v, (b, l), generator=g)
    unpref = torch.randint(1, v, (b, l), generator=g)
    prompt_mask = torch.arange(l)[None] < torch.tensor([[3], [5], [8]])
    unpref[prompt_mask] = pref[prompt_mask]
    pref[0, -4:] = pad  # right padding, masked through pad_id
    unpref[2, -2:] = pad
    pref, unpref, prompt_mask = pref.to(dev), unpref.to(dev), prompt_mask.to(dev)

    def loss_and_grad(dpo):
        perturb(dpo)
        loss = dpo(pref, unpref, prompt_mask=prompt_mask)
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1).double() for p in dpo.policy_model.parameters()])
        return loss.detach().double(), grad

    x_loss, x_grad = loss_and_grad(XDPO(model(), beta=0.1, pad_id=pad))
    print(f"fastdpo check on {dev}: a {b}-pair, L={l}, V={v} TransformerWrapper against x-transformers "
          f"(loss rtol {CHECK_LOSS_RTOL:g}, grad rtol {CHECK_GRAD_RTOL:g})")  # fmt: skip
    failed = False
    for impl, skip in _check_impls(dev):
        if skip:
            print(f"SKIP  impl={impl}: {skip}")
            continue
        try:
            loss, grad = loss_and_grad(DPO(model(), beta=0.1, pad_id=pad, impl=impl))
        except Exception as e:  # noqa: BLE001 -- a crash is a FAIL line, not a traceback
            print(f"FAIL  impl={impl}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            failed = True
            continue
        loss_err = (abs(loss - x_loss) / abs(x_loss)).item()
        grad_err = ((grad - x_grad).norm() / x_grad.norm()).item()
        ok = loss_err <= CHECK_LOSS_RTOL and grad_err <= CHECK_GRAD_RTOL
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}  impl={impl}: loss {loss.item():.6f} vs {x_loss.item():.6f} "
              f"(rel err {loss_err:.1e}), grad rel err {grad_err:.1e}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
