"""``fastdpo train``: DPO (or ORPO, CPO, SimPO, AlphaPO, KTO) on a Hugging Face causal LM, from
preference records to a saved model.

``train(TrainConfig(model=DIR, data=FILE, out=DIR, ...))`` (or ``fastdpo train --model DIR
--data FILE --out DIR``) loads ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a
``save_pretrained`` directory, tokenizes ``{"prompt", "chosen", "rejected"}`` records as TRL
1.16 does (:meth:`fastdpo.TokenizedPreferenceDataset.from_records`; KTO's unpaired ones with
:meth:`fastdpo.TokenizedKTODataset.from_records`), and trains with the module ``method`` names
(:mod:`fastdpo.train.methods`: :class:`fastdpo.DPO` by default, TRL's conventions: summed
log-probs, target-aligned masks), ``torch.optim.AdamW`` and one of transformers' schedules.  The
policy is run as TRL runs it (:mod:`fastdpo.train.policy`): gradient checkpointing, dropout off,
optionally autocast over float32 master weights.  A ``peft`` LoRA policy (``lora``) has the same
model with its adapters off as its reference.

* **Order.**  Each epoch's order is ``DistributedSampler``'s permutation seeded by ``seed +
  epoch``; a data shard takes every ``dp``-th index of it (``dp``: the processes, or their
  sequence-parallel groups).  So the order depends on (seed, epoch) only, and a step's pairs
  across N shards of batch B are those of one process of batch N * B.
* **Steps.**  An optimizer step accumulates ``grad_accum`` micro-batches (the last step of an
  epoch takes what is left), each micro-batch's mean loss divided by their number.  A step's
  data position is a function of its number, so a checkpoint resumes mid-epoch exactly.
* **Checkpoints** (``out/checkpoint-{step}``): the model (``save_pretrained``: the adapters
  only for LoRA), the tokenizer, the config as JSON, and ``trainer_state.pt`` (optimizer,
  scheduler, fp16's loss scaler, every process's RNG states, the data position, precomputed
  reference scores); with ``fsdp``, the same state as a ``torch.distributed.checkpoint``
  written by every process, its own shards (:mod:`fastdpo.train.sharded_checkpoint`).
  Resumed, a run on the CPU ends bitwise equal to the uninterrupted run
  (tests/test_train.py); a sharded one also resumes on another number of processes.  The
  reference model is always the one ``model`` names.
* **Several processes.**  Under ``torchrun`` (``WORLD_SIZE`` > 1) the DPO module is wrapped
  in ``DistributedDataParallel`` (gloo on the CPU, nccl on CUDA), or with ``fsdp`` the policy
  and the reference are built empty, sharded with FSDP2's ``fully_shard`` and filled shard by
  shard (:mod:`fastdpo.train.fsdp`: no process holds a whole model); process 0 writes the
  files; logged metrics and evaluations are over all processes' pairs.
* **Sequence parallelism** (``sequence_parallel`` N > 1, packed batches): the processes form a
  (dp, N) ``DeviceMesh``; the N processes of a row (ranks ``[k*N, (k+1)*N)``) read data shard k
  of dp, each micro-batch the same, and split its packed rows' tokens (the module's
  ``sequence_parallel=mesh["sp"]``: :mod:`fastdpo.batching.sequence_parallel`).  DDP (or FSDP2)
  over every process averages the gradients, which makes them the gradient of the dp shards'
  batches; a group's processes compute the same loss and metrics, summed over the data shards
  once (:class:`~fastdpo.train.processes.Layout`).
* **Reporting.**  A progress bar (tqdm; lines without it), ``out/metrics.jsonl`` (one JSON
  object per logged step and per evaluation), ``out/curves.png`` (matplotlib, when installed),
  the trackers of ``report_to`` (:mod:`fastdpo.train.report`), evaluations of the policy (eval
  mode, no gradient) every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data.kto_text import TokenizedKTODataset
from ..data.text import TokenizedPreferenceDataset
from ..models import adapter_for
from ..models.wrappers import model_class
from ..modules.dpo import precompute_reference_scores
from . import fsdp as train_fsdp
from . import export, io, methods, report, sharded_checkpoint
from . import policy as train_policy
from .config import ADDED_SINCE, CHANGEABLE_ON_RESUME, TrainConfig, check_config
from .processes import Processes

__all__ = ["Run", "train"]

BATCH_KEYS = ("preferred_seq", "unpreferred_seq", "prompt_mask", "preferred_seq_mask", "unpreferred_seq_mask")


class _Indexed(torch.utils.data.Dataset):
    """A dataset's items with their index (to look up precomputed reference scores)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return i, self.ds[i]

    def collate(self, items):
        return torch.tensor([i for i, _ in items]), self.ds.collate([x for _, x in items])


# ----------------------------------------------------------------------------- the run


class Run:
    """A training run, set up (the constructor: every check, the model, data, optimizer and,
    when resuming, the checkpoint's state) and then trained (:meth:`fit`)."""

    def __init__(self, config: TrainConfig, procs: Processes):
        c = self.config = check_config(config)
        self.procs, self.device = procs, procs.device
        train_fsdp.check(c.fsdp, procs.world, c.packing)
        self.layout = procs.layout(c.sequence_parallel)  # (sequence parallelism: the (dp, sp) mesh)
        self.out = Path(c.out)
        ckpt, state, rng = None, None, None
        if c.resume is not None:
            ckpt = self._checkpoint(c)
            if sharded_checkpoint.is_sharded(ckpt):  # (--fsdp's: DCP)
                sharded_checkpoint.check_complete(ckpt)
                saved, (state, rng) = io.load_run_config(ckpt), sharded_checkpoint.read_trainer(ckpt, procs.rank)
            else:
                saved, state = io.load_checkpoint(ckpt)
            self._check_resumable(saved, state, ckpt)
            rng = rng if rng is not None else state["rng"][procs.rank]
        torch.manual_seed(c.seed)  # LoRA's initial weights; every process draws the same
        random.seed(c.seed)
        self.tokenizer = io.load_tokenizer(c.model)
        self.train_ds, self.eval_ds = self._datasets(c)
        pairs = [len(self.train_ds), len(self.eval_ds) if self.eval_ds is not None else 0]
        if state is not None and state["pairs"] != pairs:
            raise ValueError(f"--resume {ckpt}: the run had {state['pairs']} (train, eval) pairs, the data gives {pairs} now")
        io.check_vocab(c.model, len(self.tokenizer))  # from config.json: before the weights load
        if c.fsdp:  # empty (on the meta device) until sharded, then filled shard by shard
            model = train_fsdp.empty_model(c.model, c.dtype)
            names = train_fsdp.base_names(model)
            with train_fsdp.new_parameters() as found:
                model = self._policy(model, c)
            initial = train_fsdp.initial_values(model, found)  # (LoRA's adapters, drawn as in one process)
        else:
            model = self._policy(io.load_model(c.model, c.dtype).to(self.device), c)
        self.precision = train_policy.Precision("bf16" if c.bf16 else "fp16" if c.fp16 else "float32", self.device)
        self.method = methods.method_of(c.method)
        head, why = self._head(model, c.head)
        split = {"sequence_parallel": self.layout.sp_mesh} if self.layout.sp > 1 else {}
        self.module = methods.build(c.method, model, c.loss_options(), head=head,
                                    packing=c.packing, logprob_reduction=c.logprob_reduction or self.method.reduction,
                                    mask_alignment=c.mask_alignment, **split)  # fmt: skip
        pair_metrics = methods.PAIR_METRICS if self.method.paired else methods.UNPAIRED_METRICS
        self.logged = ("loss", *pair_metrics, *self._extra_metrics())
        self.unit = "pairs" if self.method.paired else "completions"
        self.loaded = None
        if c.fsdp:
            if c.precompute_reference and state is not None:  # (the checkpoint has the scores)
                self._drop_reference()
            train_fsdp.shard(self.module.policy_model, self.module.ref_model, self.device)
            self._fill(ckpt, names, initial)
        elif ckpt is not None:
            io.load_trained_weights(self.module.policy_model, ckpt, self.lora)
        self.reference = self._reference_scores(state)
        if c.fsdp:  # (every group back to its shards: the optimizer takes them)
            train_fsdp.reshard(self.module.policy_model)
        self.ddp = None
        if not c.fsdp and procs.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        route = self.module.route(self.module.policy_model, self.device)
        self.route = "logits (" + (why or route.reason) + ")" if route.kind == "logits" else "fused head"
        if route.head is not None and route.head.inferred:
            self.route += " (inferred, checked on the first batch)"
        self.params = list(self.module.parameters())
        assert not c.fsdp or all(type(p).__name__ == "DTensor" for p in self.params), "the optimizer must take the shards"
        self.opt = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        b = c.batch_size
        self.micro_per_epoch = math.ceil(math.ceil(len(self.train_ds) / self.layout.dp) / b)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / c.grad_accum)
        self.total = c.steps if c.steps is not None else c.epochs * self.steps_per_epoch
        from transformers import get_scheduler

        self.sched = get_scheduler(c.lr_scheduler, self.opt, num_warmup_steps=c.warmup_steps, num_training_steps=self.total)
        self.start = 0
        if state is not None:
            if c.fsdp:
                sharded_checkpoint.load_optimizer(ckpt, self.module.policy_model, self.opt)
            else:
                self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            self.precision.load_state_dict(state.get("scaler"))
            self.start = state["step"]
            io.set_rng_state(rng)
        if procs.main:
            self.out.mkdir(parents=True, exist_ok=True)
            history = ckpt / io.METRICS_FILE if ckpt is not None and (ckpt / io.METRICS_FILE).is_file() else None
            self.log = io.MetricsLog(self.out, history)
            # (trackers after every check: a run refused above starts none)
            self.trackers = report.Trackers(report.check_report_to(c.report_to), self.out, self._config_json(),
                                            resume_step=self.start if state is not None else None)  # fmt: skip
        self.procs.barrier()

    # ------------------------------------------------------------------------- setup

    def _checkpoint(self, c: TrainConfig) -> Path:
        if c.resume == "latest":
            found = io.latest_checkpoint(c.out)
            if found is None:
                raise ValueError(f"--resume: no checkpoint in --out {c.out} to resume from")
            return found
        p = Path(c.resume)
        if not p.is_dir():
            raise ValueError(f"--resume {c.resume}: no such checkpoint directory")
        return p

    def _check_resumable(self, saved: dict, state: dict, ckpt: Path) -> None:
        now = dataclasses.asdict(self.config)
        was = {k: saved.get(k, ADDED_SINCE.get(k)) for k in now}
        resharded = "world" in state  # (a sharded checkpoint: onto any number of processes)
        fixed = CHANGEABLE_ON_RESUME | ({"batch_size"} if resharded else set())
        differ = [k for k in now if k not in fixed and was[k] != now[k]]
        if differ:
            said = ", ".join(f"--{k.replace('_', '-')} {was[k]!r} (now {now[k]!r})" for k in differ)
            raise ValueError(f"--resume {ckpt}: the checkpoint's run had {said}; pass the same options to resume it")
        if not resharded:
            if len(state["rng"]) != self.procs.world:
                raise ValueError(f"--resume {ckpt}: written by {len(state['rng'])} processes, resumed by {self.procs.world}")
            return
        # Another number of processes takes the same pairs a step when a micro-batch of all of
        # them does (a data shard's pairs are every dp-th of the epoch's order).
        pairs, dp = state["batch_size"] * state["dp"], self.layout.dp
        unit = "pairs" if methods.method_of(self.config.method).paired else "completions"
        if self.config.batch_size * dp != pairs:
            fix = f"pass --batch-size {pairs // dp}" if pairs % dp == 0 else f"run on a number of data shards dividing {pairs}"
            raise ValueError(f"--resume {ckpt}: its micro-batches were {pairs} {unit} ({state['dp']} data shards of "
                             f"--batch-size {state['batch_size']}); on {dp} data shards {fix}")  # fmt: skip

    def _policy(self, model, c: TrainConfig):
        """The loaded model as the run trains it: LoRA, dropout, checkpointing."""
        self.lora = bool(c.lora)
        if self.lora:
            model = self._with_lora(model, c)
        if not c.keep_dropout:
            train_policy.disable_dropout(model)  # (the reference copy the module makes of it too)
            if rates := train_policy.config_dropouts(model):
                said = ", ".join(f"{k} {v:g}" for k, v in rates.items())
                warnings.warn(f"attention_dropout stays on ({said}): the attention code applies it, not an "
                              f"nn.Dropout, as under TRL's disable_dropout; set attention_dropout to 0 in "
                              f"config.json to train without it", stacklevel=3)  # fmt: skip
        train_policy.prepare(model, gradient_checkpointing=c.gradient_checkpointing,
                             activation_offloading=c.activation_offloading)  # fmt: skip
        return model

    @staticmethod
    def _head(model, head: str) -> tuple[str, str | None]:
        """The ``head`` option to build the module with, and why the model has no fused head."""
        found, why = adapter_for(model).head()
        if found is None and head == "auto":  # said here, once, as one line (the module would too)
            warnings.warn(f"{type(model).__name__} has no fused head ({why}): fastdpo falls back to scoring "
                          f"its logits, (2B, L-1, V) floats a step", stacklevel=3)  # fmt: skip
            return "logits", why
        return head, why

    def _extra_metrics(self) -> tuple[str, ...]:
        """The method's metrics beyond the pairs' that this run's module returns."""
        extra = [k for k in self.method.extra_metrics if k not in ("aux_loss", "kl")]
        if "kl" in self.method.extra_metrics and self.module.loss_type == "kto":
            extra.append("kl")
        if "aux_loss" in self.method.extra_metrics and self.module.router_aux_loss_coef:
            extra.append("aux_loss")
        return tuple(extra)

    def _datasets(self, c: TrainConfig):
        records = io.read_records(c.data)
        held = None
        if c.eval is not None:
            held = io.read_records(c.eval, "--eval")
        elif c.eval_fraction is not None:
            records, held = io.split_records(records, c.eval_fraction, c.seed)

        def tokenized(r):
            if c.num_proc is not None and isinstance(r, list):
                import datasets  # (num_proc runs datasets.Dataset.map)

                r = datasets.Dataset.from_list(r)
            kwargs = dict(max_length=c.max_length, truncation_mode=c.truncation_mode, num_proc=c.num_proc)
            try:
                if methods.method_of(c.method).paired:
                    return TokenizedPreferenceDataset.from_records(r, self.tokenizer, **kwargs)
                # (KTO: no KL sequences for apo_zero_unpaired, as TRL builds none)
                return TokenizedKTODataset.from_records(r, self.tokenizer, kl=c.loss_type != "apo_zero_unpaired",
                                                        **kwargs)  # fmt: skip
            except TypeError as e:  # a record's field of the wrong type: the user's data, one line
                raise ValueError(io.message(e)) from e

        return tokenized(records), tokenized(held) if held is not None else None

    @staticmethod
    def _with_lora(model, c: TrainConfig):
        try:
            import peft
        except ImportError:
            raise ValueError("--lora needs peft: pip install peft") from None
        targets = c.lora_target_modules
        if targets is None:
            targets = io.attention_projections(model)
            if not targets:
                raise ValueError(f"--lora: found no linear layers in {type(model).__name__}'s attention modules to "
                                 f"adapt (name them: --lora-target-modules NAME ..., or all-linear)")  # fmt: skip
        elif targets == ["all-linear"]:
            targets = "all-linear"  # peft's: every linear layer but the output head
        config = peft.LoraConfig(r=c.lora, lora_alpha=c.lora_alpha or 2 * c.lora, lora_dropout=c.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
        try:
            return peft.get_peft_model(model, config)
        except ValueError as e:  # (e.g. a target module that is not in the model)
            raise ValueError(f"--lora-target-modules {' '.join(c.lora_target_modules or targets)}: "
                             f"{io.message(e)}") from None

    def _fill(self, ckpt: Path | None, names: dict, initial: dict) -> None:
        """Allocate the sharded models' shards and read their weights, each process its own:
        the policy's base from ``model`` (a full fine-tuning run resumed: from the checkpoint),
        LoRA's adapters from the checkpoint or their initial values, the reference from
        ``model``."""
        c, policy, ref = self.config, self.module.policy_model, self.module.ref_model
        for m in (policy, ref):
            if m is not None:
                train_fsdp.materialize(m, self.device)
        how = []  # (said in the header: a broadcast from process 0 holds the model whole there)
        if ckpt is None or self.lora:
            how.append(train_fsdp.load_pretrained(policy, c.model, names))
        if ckpt is not None:
            sharded_checkpoint.load_model(ckpt, policy, self.lora)
        elif initial:
            train_fsdp.load_whole(policy, initial)
        if ref is not None:
            how.append(train_fsdp.load_pretrained(ref, c.model, train_fsdp.base_names(ref)))
        self.loaded = ", ".join(dict.fromkeys(how)) or "the checkpoint's shards"

    def _reference_scores(self, state: dict | None) -> dict | None:
        """``{"train": (2, n), "eval": (2, m)}`` reference scores by dataset index with
        ``precompute_reference`` (from the checkpoint when resuming), else None.  A full
        fine-tuning run then drops its reference copy."""
        if not self.config.precompute_reference:
            return None
        if state is not None:
            scores = state["reference"]
        else:
            scores = {"train": self._score(self.train_ds)}
            if self.eval_ds is not None:
                scores["eval"] = self._score(self.eval_ds)
        self._drop_reference()
        return scores

    def _drop_reference(self) -> None:
        """A full fine-tuning run's frozen copy goes (LoRA's reference is the policy), with what
        the module cached of it."""
        if self.module.ref_model is not None:
            self.module.scorer.forget(self.module.ref_model)
            self.module.ref_model = None
            gc.collect()  # (a sharded model's hooks make cycles)

    def _score(self, ds) -> torch.Tensor:
        # Each data shard scores every dp-th pair; a sum of zero-filled copies over the shards
        # assembles them (exact: each entry is one shard's score plus zeros).  Sharded, a shard
        # of fewer batches scores its first pair again, uncounted, as evaluate() does.
        mine = self._shard(len(ds))
        extra = self._most_batches(len(ds)) - math.ceil(len(mine) / self.config.batch_size) if self.config.fsdp else 0
        order = mine + mine[:1] * extra * self.config.batch_size
        batches = (tuple(b[k].to(self.device) for k in BATCH_KEYS) for _, b in self._loader(ds, order))
        with self.precision.autocast():
            w, l = precompute_reference_scores(self.module, batches, progress=self.config.progress and self.procs.main)
        scores = torch.zeros(2, len(ds))
        scores[0, mine], scores[1, mine] = w[:len(mine)], l[:len(mine)]
        return self._sum(scores.to(self.device)).cpu()

    def _most_batches(self, n: int) -> int:
        """The batches of the largest data shard of ``n`` items."""
        return math.ceil(math.ceil(n / self.layout.dp) / self.config.batch_size)

    def _shard(self, n: int) -> list[int]:
        """This process's data shard of ``n`` items: every dp-th (the processes of a
        sequence-parallel group read the same)."""
        return list(range(self.layout.dp_rank, n, self.layout.dp))

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the data shards, each counted once (a sequence-parallel group's
        processes hold the same sums: only one of them per shard is added)."""
        return self.procs.sum(t, self.layout.dp_group)

    def _loader(self, ds, order: list[int]):
        # A generator of its own: a DataLoader's iterator otherwise draws its base seed from the
        # global RNG, so a resumed run (one more iterator) would drift from the uninterrupted one.
        indexed = _Indexed(ds)
        return torch.utils.data.DataLoader(indexed, batch_size=self.config.batch_size, sampler=order,
                                           collate_fn=indexed.collate, generator=torch.Generator())  # fmt: skip

    def _epoch(self, epoch: int, skip: int):
        """The micro-batches of ``epoch`` on this process, after the first ``skip``."""
        sampler = torch.utils.data.DistributedSampler(
            self.train_ds, num_replicas=self.layout.dp, rank=self.layout.dp_rank, shuffle=True, seed=self.config.seed
        )
        sampler.set_epoch(epoch)
        return iter(self._loader(self.train_ds, list(sampler)[skip * self.config.batch_size:]))

    # ------------------------------------------------------------------------- training

    def fit(self) -> dict:
        """Train from the start (or the checkpoint) to the last step; returns the last logged
        training row, the last evaluation, the steps and the output directory."""
        try:
            return self._fit()
        finally:  # (an interrupted run's trackers get what it logged)
            if self.procs.main:
                self.trackers.close()

    def _fit(self) -> dict:
        c, procs = self.config, self.procs
        policy = self.module.policy_model
        policy.train()
        if procs.main:
            print(self._header(), flush=True)
        bar = io.Progress(self.total, self.start, c.progress and procs.main)
        window, last_train, last_eval = None, None, None
        epoch_now, batches = None, None
        for step in range(self.start, self.total):
            epoch, group = divmod(step, self.steps_per_epoch)
            if epoch != epoch_now:
                epoch_now, batches = epoch, self._epoch(epoch, group * c.grad_accum)
            n_micro = min(c.grad_accum, self.micro_per_epoch - group * c.grad_accum)
            stats, lr, grad_norm = self._step([next(batches) for _ in range(n_micro)])
            window = stats if window is None else window + stats
            done = step + 1
            logged = None
            if done % c.log_every == 0 or done == self.total:
                logged = last_train = self._row(done, "train", self._sum(window), lr=lr, grad_norm=grad_norm)
                window = None
                self._write(last_train)
            bar.update(done, logged)
            if self.eval_ds is not None and (c.eval_every and done % c.eval_every == 0 or done == self.total):
                last_eval = self.evaluate(done)
                bar.note(f"eval at step {done}: {self._eval_said(last_eval)}")
            if c.save_every and done % c.save_every == 0:
                self.save_checkpoint(done)
        bar.close()
        self.save_final()
        return {"steps": self.total, "train": last_train, "eval": last_eval, "out": str(self.out)}

    @staticmethod
    def _eval_said(row: dict) -> str:
        """An evaluation in a line: reward accuracy (when logged), margin, loss."""
        said = [f"{name} {row[k]:.3f}" for k, name in (("rewards/accuracies", "reward accuracy"),
                                                       ("rewards/margins", "margin")) if row.get(k) is not None]
        return ", ".join([*said, f"loss {row['loss']:.4f}"])

    def _header(self) -> str:
        c = self.config
        n_all = sum(p.numel() for p in self.module.policy_model.parameters())
        n_train = sum(p.numel() for p in self.params)
        unit = self.unit
        ev = f", {len(self.eval_ds)} eval {unit}" if self.eval_ds is not None else ", no eval set"
        resumed = f", resumed at step {self.start}" if self.start else ""
        lay = self.layout
        split = f" (data parallel {lay.dp} x sequence parallel {lay.sp})" if lay.sp > 1 else ""
        if self.loaded is not None:  # (--fsdp: how the processes read the weights)
            split += f" (--fsdp, weights: {self.loaded})"
        return (f"fastdpo train: {c.method}, {len(self.train_ds)} training {unit}{ev}; "
                f"{model_class(self.module.policy_model).__name__}, {n_train:,} of {n_all:,} parameters trained; "
                f"scoring: {self.route}; {self.total} steps of {c.batch_size * c.grad_accum * lay.dp} "
                f"{unit} on {self.procs.world} process(es){split}, {self.device}{resumed}")  # fmt: skip

    def _call(self, module, indices: torch.Tensor, batch: dict, split: str):
        keys = BATCH_KEYS if self.method.paired else batch.keys()  # (KTO: every key of KTODataset.collate's)
        kwargs = {k: batch[k].to(self.device) for k in keys}
        if self.reference is not None:
            ref = self.reference[split][:, indices].to(self.device)
            kwargs |= {"ref_preferred_logprob": ref[0], "ref_unpreferred_logprob": ref[1]}
        return module(**kwargs, return_metrics=True)

    def _stats(self, loss: torch.Tensor, metrics: dict, batch: dict, b: int) -> torch.Tensor:
        """One micro-batch's (items, then for each of :attr:`logged` its sum and its weight):
        each metric weighs the batch's items, KTO's ``*/chosen`` (``*/rejected``) metrics its
        desirable (undesirable) completions, of which a batch may have none (their mean is
        then NaN, and weighs 0)."""
        n = torch.tensor(float(b), device=loss.device)
        if not self.method.paired:
            chosen = batch["label"].to(loss.device).sum().float()
        stats = [n]
        for k in self.logged:
            value = (loss if k == "loss" else metrics[k]).detach().float()
            weight = n
            if not self.method.paired and k.endswith(("/chosen", "/rejected")):
                weight = chosen if k.endswith("/chosen") else n - chosen
            stats += [torch.where(weight > 0, value * weight, 0.0), weight]
        return torch.stack(stats)

    def _step(self, micro: list) -> tuple[torch.Tensor, float, float | None]:
        """One optimizer step over ``micro`` (a list of (indices, batch)); returns the summed
        stats, the learning rate used and the gradient norm before clipping."""
        # Under FSDP2 each micro-batch's backward reduce-scatters its gradient into the shards: no
        # set_requires_gradient_sync(False), which would keep a whole gradient on every process.
        module = self.ddp if self.ddp is not None else self.module
        stats = None
        for i, (indices, batch) in enumerate(micro):
            last = i == len(micro) - 1
            with nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                with self.precision.autocast():
                    loss, metrics = self._call(module, indices, batch, "train")
                self.precision.backward(loss / len(micro))
            s = self._stats(loss, metrics, batch, len(indices))
            stats = s if stats is None else stats + s
        grad_norm = None
        self.precision.unscale(self.opt)
        if self.config.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm).item()
        lr = self.sched.get_last_lr()[0]
        if self.precision.step(self.opt):  # (fp16: False when the scaler skipped it, and the schedule waits)
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return stats, lr, grad_norm

    def _row(self, step: int, split: str, stats: torch.Tensor, **extra) -> dict:
        """A metrics.jsonl row of summed :meth:`_stats` (a metric of weight 0: None)."""
        items, *sums = stats.tolist()
        row = {"step": step, "split": split, "epoch": round(step / self.steps_per_epoch, 4)}
        row |= {k: s / w if w > 0 else None for k, s, w in zip(self.logged, sums[::2], sums[1::2])}
        if not self.method.paired:
            chosen, rejected = row["rewards/chosen"], row["rewards/rejected"]
            row["rewards/margins"] = chosen - rejected if chosen is not None and rejected is not None else None
        row |= {k: v for k, v in extra.items() if v is not None}
        return row | {self.unit: int(items)}

    def _write(self, row: dict) -> None:
        if self.procs.main:
            self.log.write(row)
            self.trackers.log(row)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """The policy (in eval mode) on the eval set: the loss, reward accuracy, margins and
        scores over every pair (each data shard scores every dp-th)."""
        policy = self.module.policy_model
        policy.eval()
        stats, n = None, 0
        for indices, batch in self._loader(self.eval_ds, self._shard(len(self.eval_ds))):
            with self.precision.autocast():
                loss, metrics = self._call(self.module, indices, batch, "eval")
            s = self._stats(loss, metrics, batch, len(indices))
            stats, n = s if stats is None else stats + s, n + 1
        # Each forward of a sharded model is a collective: a process with fewer batches runs the
        # first pair again, uncounted, until it has run as many as the others.
        most = self._most_batches(len(self.eval_ds)) if self.config.fsdp else n
        for _ in range(most - n):
            with self.precision.autocast():
                self._call(self.module, *next(iter(self._loader(self.eval_ds, [0]))), "eval")
        policy.train()
        if stats is None:  # fewer eval pairs than processes
            stats = torch.zeros(2 * len(self.logged) + 1, device=self.device)
        row = self._row(step, "eval", self._sum(stats))
        self._write(row)
        return row

    # ------------------------------------------------------------------------- files

    def _config_json(self) -> dict:
        return dataclasses.asdict(self.config)

    def save_checkpoint(self, step: int) -> None:
        """``out/checkpoint-{step}``: process 0 writes it, with every process's RNG states (with
        ``fsdp``, every process writes its shards: :mod:`fastdpo.train.sharded_checkpoint`)."""
        state = {
            "step": step, "epoch": step // self.steps_per_epoch,
            "micro_batch": step % self.steps_per_epoch * self.config.grad_accum,
            "scheduler": self.sched.state_dict(), "scaler": self.precision.state_dict(), "reference": self.reference,
            "pairs": [len(self.train_ds), len(self.eval_ds) if self.eval_ds is not None else 0],
        }  # fmt: skip
        if self.config.fsdp:
            self._save_sharded(step, state | {"world": self.procs.world, "dp": self.layout.dp,
                                              "batch_size": self.config.batch_size})  # fmt: skip
        else:
            rng = self.procs.gather(io.rng_state())
            if self.procs.main:
                state |= {"optimizer": self.opt.state_dict(), "rng": rng}
                io.save_checkpoint(self.out, step, self.module.policy_model, self.tokenizer, self._config_json(), state)
        if self.procs.main:
            if self.config.save_total_limit is not None:
                io.prune_checkpoints(self.out, self.config.save_total_limit)
            self._plot()
        self.procs.barrier()

    def _save_sharded(self, step: int, state: dict) -> None:
        final = io.checkpoint_dir(self.out, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.procs.main:
            io.remove(tmp)
        self.procs.barrier()
        policy = self.module.policy_model
        sharded_checkpoint.save(tmp, policy, self.opt, self.lora, state, io.rng_state())
        if self.procs.main:  # (DCP's save returns once every process's files and the metadata are written)
            export.write_config(policy, tmp)
            if self.lora:
                policy.peft_config["default"].save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            io.write_run_files(tmp, self.out, self._config_json())
            sharded_checkpoint.mark_complete(tmp)
            io.replace(tmp, final)

    def save_final(self) -> None:
        """The trained model (or adapters), tokenizer and config in ``out``, and the curves."""
        if self.config.fsdp:
            export.save_sharded(self.out, self.module.policy_model, self.lora, self.tokenizer, self._config_json(),
                                self.procs.main)  # fmt: skip
        elif self.procs.main:
            io.save_model(self.out, self.module.policy_model, self.tokenizer, self._config_json())
        if self.procs.main:
            note = self._plot()
            print(f"saved to {self.out}" + (f" ({note})" if note else ""), flush=True)
        self.procs.barrier()

    def _plot(self) -> str | None:
        return io.plot_curves(self.log.rows(), self.out / io.CURVES_FILE)


def train(config: TrainConfig) -> dict:
    """Run ``config`` (see the module docstring); returns ``{"steps", "train", "eval", "out"}``:
    the last logged training row and evaluation (as written to ``metrics.jsonl``)."""
    procs = Processes(config.device)
    run = None
    try:
        run = Run(config, procs)
        return run.fit()
    finally:
        run = None  # (its models freed while the process group lives: Processes.close)
        procs.close()
