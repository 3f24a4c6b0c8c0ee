"""``fastdpo train``'s command line: its options (:func:`add_arguments`, each a
:class:`~fastdpo.train.config.TrainConfig` field), the config they make and the command
(:func:`main_from_args`: a mistake is one line on stderr)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from ..losses.config import LOSS_TYPES
from . import io
from .config import TrainConfig
from .processes import Processes
from .run import Run

__all__ = ["add_arguments", "config_from_args", "main_from_args"]


def _max_length(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``fastdpo train``'s options (each a :class:`TrainConfig` field)."""
    d = TrainConfig(model="", data="", out="")
    g = p.add_argument_group("data and model")
    g.add_argument("--model", required=True, metavar="DIR",
                   help="a save_pretrained directory: AutoModelForCausalLM + AutoTokenizer (the reference model too)")
    g.add_argument("--data", required=True, metavar="FILE",
                   help='training records {"prompt", "chosen", "rejected"} (plain text or chat messages): a JSONL '
                        "file, or a datasets directory saved with save_to_disk (its 'train' split)")
    g.add_argument("--eval", metavar="FILE", help="eval records, as --data")
    g.add_argument("--eval-fraction", type=float, metavar="F", help="hold out this fraction of --data (drawn by --seed)")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="the trained model (or adapters), tokenizer, metrics.jsonl, curves.png, checkpoint-N/")
    g.add_argument("--max-length", type=_max_length, default=d.max_length, metavar="N",
                   help=f"truncate prompt+completion to N tokens, as TRL (default {d.max_length}; none: never)")
    g.add_argument("--truncation-mode", choices=["keep_start", "keep_end"], default=d.truncation_mode)
    g.add_argument("--dtype", choices=[*io.DTYPES, "auto"], default=d.dtype,
                   help="the model's dtype (default float32; auto: its config's)")
    g = p.add_argument_group("the loss (fastdpo.DPO's options)")
    g.add_argument("--loss", dest="loss_type", nargs="+", choices=LOSS_TYPES, default=[d.loss_type], metavar="TYPE",
                   help=f"loss type(s), default {d.loss_type}: {', '.join(LOSS_TYPES)}")
    g.add_argument("--loss-weights", type=float, nargs="+", metavar="W", help="one weight per --loss type")
    g.add_argument("--beta", type=float, default=d.beta, help=f"default {d.beta}")
    g.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    g.add_argument("--logprob-reduction", choices=["sum", "mean"], default=d.logprob_reduction,
                   help="sequence score: sum of token log-probs (default, TRL's) or their mean (x-transformers')")
    g.add_argument("--mask-alignment", choices=["target", "input"], default=d.mask_alignment,
                   help="default target (TRL's); input: x-transformers'")
    g.add_argument("--head", choices=["auto", "fused", "logits"], default=d.head,
                   help="auto: the fused head where the model allows it (default)")
    g.add_argument("--packing", choices=["none", "pair", "batch", "auto"], default=d.packing)
    g.add_argument("--precompute-reference", action="store_true",
                   help="score the reference once before training (fastdpo.precompute_reference_scores); a full "
                        "fine-tuning run then drops its reference copy")
    g.add_argument("--lora", type=int, default=d.lora, metavar="R",
                   help="train peft LoRA adapters of rank R on the attention projections (reference: adapters off)")
    g.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA's alpha (default 2 R)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--steps", type=int, metavar="N", help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per process per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="K", help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW's peak learning rate (default {d.lr:g})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warmup, then linear decay to 0")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip (default 1.0; 0: off)")
    g.add_argument("--seed", type=int, default=d.seed, help="data order, eval split, LoRA's initial weights")
    g.add_argument("--device", help="default: cuda when available, else cpu (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the policy and reference with FSDP2's fully_shard instead of DDP")
    g = p.add_argument_group("reporting and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N", help="evaluate every N steps (and at the end)")
    g.add_argument("--save-every", type=int, default=d.save_every, metavar="N", help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="N", help="a metrics.jsonl row every N steps")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue exactly from a checkpoint directory (alone: the latest in --out); pass the "
                        "run's options again")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if len(values["loss_type"]) == 1:
        values["loss_type"] = values["loss_type"][0]
    return TrainConfig(**values)


def _one_line_warnings():
    """A ``warnings.showwarning`` printing each distinct warning once, as one line (the policy
    and the reference model can warn the same thing)."""
    seen = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = (str(message).strip().splitlines() or [category.__name__])[0]
        if text not in seen:
            seen.add(text)
            print(f"fastdpo train: warning: {text}", file=sys.stderr, flush=True)

    return show


def main_from_args(args: argparse.Namespace) -> int:
    """``fastdpo train``: a mistake in the setup is one line on stderr (exit code 2), as is
    each warning."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings()
        procs = None
        try:
            config = config_from_args(args)
            procs = Processes(config.device)
            run = Run(config, procs)
        except ValueError as e:
            print(f"fastdpo train: error: {e}", file=sys.stderr, flush=True)
            if procs is not None:
                procs.close()
            return 2
        try:
            run.fit()
        finally:
            procs.close()
    return 0
