"""``fastdpo train``'s command line: its options (:func:`add_arguments`, each a
:class:`~fastdpo.train.config.TrainConfig` field), the config they make and the command
(:func:`main_from_args`: a mistake is one line on stderr)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

from . import io, methods
from .config import LR_SCHEDULERS, TrainConfig
from .processes import Processes
from .report import REPORT_TO
from .run import Run

__all__ = ["add_arguments", "config_from_args", "main_from_args"]


def _max_length(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _number_or_batch(text: str) -> float | str:
    return text if text == "batch" else float(text)


# One flag per loss option (fastdpo.train.methods.LOSS_OPTIONS; tests check none is missing), with
# what argparse needs; each help ends with the methods whose module takes it.
LOSS_FLAGS: dict[str, dict] = {
    "loss_type": dict(nargs="+", metavar="TYPE", help="loss type(s): DPO's fastdpo.LOSS_TYPES (several: mixed by "
                      "--loss-weights); CPO's sigmoid, hinge, ipo, simpo, alphapo; KTO's kto, apo_zero_unpaired "
                      "(default sigmoid; KTO kto)"),
    "loss_weights": dict(type=float, nargs="+", metavar="W", help="one weight per --loss-type"),
    "beta": dict(type=float, help="the inverse temperature (ORPO: the odds-ratio weight), default 0.1"),
    "label_smoothing": dict(type=float, help="conservative labels' eps, default 0"),
    "gamma": dict(type=float, help="SimPO's margin for DPO's loss type simpo"),
    "bco_delta": dict(type=_number_or_batch, metavar="X|batch", help="BCO's reward shift (bco_pair): a number, or "
                      "batch (the batch's mean reward)"),
    "discopop_tau": dict(type=float, help="DiscoPOP's temperature"),
    "f_divergence_type": dict(choices=["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"],
                              help="f-DPO's regularizer (default reverse_kl: DPO)"),
    "f_alpha_divergence_coef": dict(type=float, help="alpha of alpha_divergence"),
    "ld_alpha": dict(type=float, help="LD-DPO: the weight of the tokens past the shorter completion, in [0, 1]"),
    "use_weighting": dict(action="store_const", const=True, help="WPO's pair weights, as TRL"),
    "reference_free": dict(action="store_const", const=True, help="score against a zero reference"),
    "router_aux_loss_coef": dict(type=float, help="an MoE policy's router load-balancing loss weight (default: the "
                                 "config's, for a model with a router; 0: off)"),
    "cpo_alpha": dict(type=float, help="the NLL term's weight, default 1 (simpo, alphapo: 0)"),
    "simpo_gamma": dict(type=float, help="SimPO's target reward margin"),
    "alpha": dict(type=float, help="AlphaPO's reward shape, default 0"),
    "desirable_weight": dict(type=float, help="lambda_D, default 1"),
    "undesirable_weight": dict(type=float, help="lambda_U, default 1"),
    "sync_kl": dict(action=argparse.BooleanOptionalAction, help="average the KL baseline over the processes "
                    "(default on, as TRL)"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``fastdpo train``'s options (each a :class:`TrainConfig` field)."""
    d = TrainConfig(model="", data="", out="")
    g = p.add_argument_group("data and model")
    g.add_argument("--config", metavar="FILE.yaml",
                   help="options from a YAML file, with TRL's names (DPOConfig's, trl dpo's model_name_or_path, "
                        "dataset_name, use_peft, lora_r, ...) or these options' (--beta: beta); flags given here win")
    g.add_argument("--model", metavar="DIR",
                   help="a save_pretrained directory: AutoModelForCausalLM + AutoTokenizer (the reference model too)")
    g.add_argument("--data", metavar="FILE",
                   help='training records {"prompt", "chosen", "rejected"} (plain text or chat messages): a JSONL '
                        "file, or a datasets directory saved with save_to_disk (its 'train' split)")
    g.add_argument("--eval", metavar="FILE", help="eval records, as --data")
    g.add_argument("--eval-fraction", type=float, metavar="F", help="hold out this fraction of --data (drawn by --seed)")
    g.add_argument("--out", metavar="DIR",
                   help="the trained model (or adapters), tokenizer, metrics.jsonl, curves.png, checkpoint-N/")
    g.add_argument("--max-length", type=_max_length, default=d.max_length, metavar="N",
                   help=f"truncate prompt+completion to N tokens, as TRL (default {d.max_length}; none: never)")
    g.add_argument("--truncation-mode", choices=["keep_start", "keep_end"], default=d.truncation_mode)
    g.add_argument("--num-proc", type=int, metavar="N", help="tokenize with N processes (datasets.Dataset.map)")
    g.add_argument("--dtype", choices=[*io.DTYPES, "auto"], default=d.dtype,
                   help="the weights' dtype, and so the optimizer state's (default float32; auto: the config's)")
    g = p.add_argument_group("memory and precision (TRL's defaults)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d.gradient_checkpointing,
                   help="recompute each decoder layer in backward instead of keeping its activations (default on, "
                        "as TRL; --no-gradient-checkpointing: keep them, faster and larger)")
    g.add_argument("--activation-offloading", action="store_true",
                   help="keep what checkpointing saves in pinned host memory (transformers' offload; nothing to "
                        "move on the CPU)")
    g.add_argument("--bf16", action="store_true",
                   help="forwards under bfloat16 autocast over float32 weights and optimizer state (TRL's bf16)")
    g.add_argument("--fp16", action="store_true", help="forwards under float16 autocast, the loss scaled (TRL's fp16)")
    g.add_argument("--keep-dropout", action="store_true",
                   help="keep the model's dropout (default: every nn.Dropout off, as TRL's disable_dropout)")
    g = p.add_argument_group("the loss: --method and its module's options (not given: the module's default)")
    g.add_argument("--method", choices=list(methods.METHODS), default=d.method,
                   help="dpo (fastdpo.DPO, default), orpo, cpo, simpo (CPO, loss simpo, cpo_alpha 0), alphapo (CPO, "
                        "loss alphapo), kto (fastdpo.KTO: unpaired records {prompt, completion, label})")
    for name, kwargs in LOSS_FLAGS.items():
        owners = [k for k, m in methods.METHODS.items() if name in {f.name for f in dataclasses.fields(m.options)}]
        kwargs = dict(kwargs)
        kwargs["help"] = f"{kwargs.get('help', '')} [{', '.join(owners)}]".strip()
        flags = [f"--{name.replace('_', '-')}"] + (["--loss"] if name == "loss_type" else [])
        g.add_argument(*flags, dest=name, default=None, **kwargs)
    g.add_argument("--logprob-reduction", choices=["sum", "mean"], default=d.logprob_reduction,
                   help="sequence score: the sum of its token log-probs or their mean (default: as the method's TRL "
                        "trainer, sum; ORPO mean)")
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
    g.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                   help="the modules LoRA adapts, as peft names them (all-linear: every linear layer but the head; "
                        "default: the attention projections)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, metavar="P",
                   help="LoRA's dropout (default 0; needs --keep-dropout)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    g.add_argument("--steps", type=int, metavar="N", help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per process (per group of --sequence-parallel N) per micro-batch (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="K", help="micro-batches per step")
    g.add_argument("--lr", type=float, default=d.lr, help=f"AdamW's peak learning rate (default {d.lr:g})")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="steps of linear warmup (default 0)")
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler,
                   help="linear (warmup, then linear decay to 0: default), cosine (warmup, then cosine decay to 0), "
                        "constant (no warmup), constant_with_warmup")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip (default 1.0; 0: off)")
    g.add_argument("--seed", type=int, default=d.seed, help="data order, eval split, LoRA's initial weights")
    g.add_argument("--device", help="default: cuda when available, else cpu (under torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the policy and reference with FSDP2's fully_shard instead of DDP")
    g.add_argument("--sequence-parallel", type=int, default=d.sequence_parallel, metavar="N",
                   help="under torchrun: split each packed batch's tokens across N processes (ranks k*N to k*N+N-1 "
                        "read the same micro-batches, data shard k of WORLD_SIZE/N; attention exchanges heads); "
                        "needs --packing batch or pair (default 1: off)")
    g = p.add_argument_group("reporting and checkpoints")
    g.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N", help="evaluate every N steps (and at the end)")
    g.add_argument("--save-every", type=int, default=d.save_every, metavar="N", help="checkpoint every N steps")
    g.add_argument("--save-total-limit", type=int, metavar="K", help="keep only the K latest checkpoints")
    g.add_argument("--report-to", nargs="+", choices=REPORT_TO, default=[d.report_to], metavar="KIND",
                   help="also send metrics.jsonl's rows to tensorboard (out/runs), wandb, trackio (default none)")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="N", help="a metrics.jsonl row every N steps")
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue exactly from a checkpoint directory (alone: the latest in --out); pass the "
                        "run's options again")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _mark_defaults(p)


class _Default:
    """An option's default, marked as such: a flag not given leaves one (so ``--config``'s value,
    when it has one, takes its place; a flag given always wins)."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _mark_defaults(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if action.dest not in ("help", "config") and action.default is not argparse.SUPPRESS:
            action.default = _Default(action.default)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the flags given, then ``--config``'s fields, then the defaults."""
    from . import trl_config

    file = trl_config.read(args.config) if getattr(args, "config", None) else {}
    values = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        values[f.name] = (file[f.name] if f.name in file else v.value) if isinstance(v, _Default) else v
    missing = [f"--{k}" for k in ("model", "data", "out") if values[k] in (None, "")]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (as flags, or in --config as model_name_or_path, "
                         f"dataset_name, output_dir)")  # fmt: skip
    for key in ("loss_type", "report_to"):
        if isinstance(values[key], (list, tuple)) and len(values[key]) == 1:
            values[key] = values[key][0]
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
        # transformers' renames (gradient_* -> activation_checkpointing_*, called by peft too): nothing
        # a user of the command can act on
        warnings.filterwarnings("ignore", r"`\w+` is deprecated and will be removed in v6", FutureWarning)
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
            del run  # (its models freed while the process group lives: Processes.close)
            procs.close()
    return 0
