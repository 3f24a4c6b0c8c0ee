"""What ``fastdpo train`` (:mod:`fastdpo.train`) reads and writes: the model and tokenizer of a
``save_pretrained`` directory, the preference records (JSONL, or a ``datasets`` directory
saved with ``save_to_disk``), checkpoints that resume a run exactly, the progress bar,
``metrics.jsonl`` and the curves' PNG.

Every check a new user's mistake meets raises a one-line ``ValueError`` naming the option
(``--model``, ``--data``, ...): the command line prints it as one line.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from ..data.text import read_jsonl

STATE_FILE = "trainer_state.pt"  # optimizer, scheduler, RNG states, data position, reference scores
COMPLETE_FILE = "complete.json"  # a sharded (--fsdp) checkpoint's last file: every other one and its size
CONFIG_FILE = "fastdpo_train.json"  # the TrainConfig the run was started with
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def message(e: BaseException) -> str:
    """The first line of ``e``'s message ('' when it has none): a refusal said in one line."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def first_line(e: BaseException) -> str:
    """``e``'s type and the first line of its message."""
    return f"{type(e).__name__}: {message(e)}"


# ----------------------------------------------------------------------------- model, tokenizer


def check_model_dir(path: str, option: str = "--model") -> Path:
    """``path`` as a directory holding a ``config.json`` (what ``save_pretrained`` writes)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{option} {path}: no such directory")
    if not p.is_dir():
        raise ValueError(f"{option} {path}: not a directory (give the directory save_pretrained wrote)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{option} {path}: no config.json there (not a save_pretrained model directory)")
    return p


def load_tokenizer(path: str):
    """``AutoTokenizer`` of the model directory, with a pad token: its own, else its EOS token (as
    TRL does); one without either is refused."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 -- many kinds; the user needs the first line
        raise ValueError(f"--model {path}: no tokenizer could be loaded from it ({first_line(e)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"--model {path}: the tokenizer has neither a pad token nor an EOS token; set one "
                f"(tokenizer.pad_token = ...) and save it again"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: str):
    """``AutoModelForCausalLM`` of the directory, in ``dtype`` (``"auto"``: the config's)."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:  # no weights, an unknown model_type, ...
        raise ValueError(f"--model {path}: cannot load it as a causal LM ({first_line(e)})") from None


def check_vocab(path: str, n_tokens: int) -> None:
    """A tokenizer of more tokens than the model's vocabulary (its config's) is refused."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:  # an unknown model_type, a broken config.json
        raise ValueError(f"--model {path}: cannot read its config.json ({first_line(e)})") from None
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if isinstance(vocab, int) and n_tokens > vocab:
        raise ValueError(f"--model {path}: the tokenizer has {n_tokens} tokens, the model's embedding only {vocab}")


def attention_projections(model) -> list[str]:
    """The names (last part) of the linear layers directly inside the model's attention modules
    (a class whose name ends in ``Attention``): LoRA's ``target_modules`` for ``--lora``."""
    names = set()
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.Linear) or type(child).__name__ == "Conv1D":  # GPT-2's
                    names.add(name)
    return sorted(names)


# ----------------------------------------------------------------------------- records


def read_records(path: str, option: str = "--data"):
    """The records of a JSONL file (a list of dicts) or of a ``datasets`` directory saved with
    ``save_to_disk`` (a ``Dataset``; of a ``DatasetDict``, its ``"train"`` split)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{option} {path}: no such file or directory")
    if p.is_dir():
        try:
            import datasets
        except ImportError:
            raise ValueError(f"{option} {path} is a directory: reading a saved dataset needs `pip install datasets`") from None
        try:
            data = datasets.load_from_disk(str(p))
        except FileNotFoundError:
            raise ValueError(f"{option} {path}: a directory, but not a dataset saved with save_to_disk") from None
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"{option} {path}: a DatasetDict without a 'train' split (it has {sorted(data)})")
            data = data["train"]
        if len(data) == 0:
            raise ValueError(f"{option} {path}: the dataset is empty")
        return data
    records = read_jsonl(p, where=f"{option} {path}")
    if not records:
        raise ValueError(f"{option} {path}: no records (one JSON object a line)")
    return records


def select(records, indices: list[int]):
    """The records at ``indices``, for a list or a ``datasets.Dataset``."""
    return records.select(indices) if hasattr(records, "select") else [records[i] for i in indices]


def split_records(records, fraction: float, seed: int):
    """(train, eval): ``round(fraction * n)`` records (at least 1) drawn by ``seed`` for eval, the
    rest for training, each in file order."""
    n = len(records)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(f"--eval-fraction {fraction:g} leaves no training record ({n} in all)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:k])
    kept = sorted(perm[k:])
    return select(records, kept), select(records, held)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, Python, numpy), as plain containers that
    ``torch.load(weights_only=True)`` reads back."""
    state = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = [kind, keys.tolist(), pos, has_gauss, gauss]
    return state


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / f"checkpoint-{step}"


def checkpoints(out: str | Path) -> list[Path]:
    """The complete checkpoints of ``out`` (a ``trainer_state.pt``, or a sharded checkpoint's
    ``complete.json``), by step."""
    found = []
    for p in Path(out).glob("checkpoint-*"):
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and ((p / STATE_FILE).is_file() or (p / COMPLETE_FILE).is_file()):
            found.append((int(tail), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: str | Path) -> Path | None:
    """The complete checkpoint of ``out`` with the highest step (None if there is none)."""
    found = checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: str | Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` latest complete checkpoints of ``out`` (``save_total_limit``,
    as the HF Trainer counts it); returns the deleted ones."""
    gone = checkpoints(out)[:-keep]
    for p in gone:
        shutil.rmtree(p)
    return gone


def save_model(where: Path, model, tokenizer, config: dict, weights: dict | None = None) -> None:
    """``save_pretrained`` of the model (a peft model saves its adapters only) and the
    tokenizer, and the run's config as JSON.  ``weights``: the model's state dict to write
    instead of its own (a sharded model's, gathered whole)."""
    model.save_pretrained(where, **({"state_dict": weights} if weights is not None else {}))
    tokenizer.save_pretrained(where)
    (where / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def save_checkpoint(out: Path, step: int, model, tokenizer, config: dict, state: dict, weights: dict | None = None) -> Path:
    """``out/checkpoint-{step}``: the model (:func:`save_model`), ``trainer_state.pt`` and the
    metrics so far.  Written under a temporary name and renamed, so that an interruption never
    leaves a checkpoint that looks complete and is not."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    remove(tmp)
    tmp.mkdir(parents=True)
    save_model(tmp, model, tokenizer, config, weights)
    torch.save(state, tmp / STATE_FILE)
    write_run_files(tmp, out)
    replace(tmp, final)
    return final


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_run_files(where: Path, out: Path, config: dict | None = None) -> None:
    """The run's config (when given) and a copy of its ``metrics.jsonl`` so far, in a checkpoint."""
    if config is not None:
        (where / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if (out / METRICS_FILE).is_file():
        shutil.copyfile(out / METRICS_FILE, where / METRICS_FILE)


def replace(tmp: Path, final: Path) -> None:
    """A checkpoint written as ``tmp`` becomes ``final`` (an older one of that name goes)."""
    remove(final)
    os.replace(tmp, final)


def load_run_config(path: Path) -> dict:
    """The config of the run that wrote the checkpoint ``path``."""
    if not (path / CONFIG_FILE).is_file():
        raise ValueError(f"--resume {path}: not a fastdpo train checkpoint (no {CONFIG_FILE})")
    return json.loads((path / CONFIG_FILE).read_text())


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(the saved run's config, its trainer state) of a checkpoint directory."""
    if not (path / STATE_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise ValueError(f"--resume {path}: not a fastdpo train checkpoint (no {STATE_FILE} or {CONFIG_FILE})")
    return load_run_config(path), torch.load(path / STATE_FILE, weights_only=True)


def load_trained_weights(model, path: Path, lora: bool) -> None:
    """Copy a checkpoint's weights into ``model`` (built as a fresh run builds it): the adapters
    of a peft model, else the whole model, as ``from_pretrained`` reads them."""
    if lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        missing = set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors")).missing_keys
        if any("lora_" in k for k in missing):
            raise ValueError(f"--resume {path}: the checkpoint lacks adapter weights {sorted(missing)[:3]}")
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


# ----------------------------------------------------------------------------- progress, metrics, curves


class Progress:
    """A tqdm bar with the last loss and reward accuracy; without tqdm, a line every twentieth
    of the run; nothing when off."""

    def __init__(self, total: int, start: int, on: bool):
        self.on, self.total, self.every = on, total, max(1, total // 20)
        self.bar = None
        if on:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, desc="DPO", unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, step: int, row: dict | None) -> None:
        """Step ``step`` is done; ``row`` is its logged training row, if it logged one."""
        self.row = row or getattr(self, "row", None)
        if not self.on:
            return
        said = _said(self.row) if self.row else ""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if row is not None:
                self.bar.set_postfix_str(_said(row))
        elif step % self.every == 0 or step == self.total:
            print(f"step {step}/{self.total}" + (f": {said}" if said else ""), flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.on:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()




def _said(row: dict) -> str:
    """The loss and, when the run logs it, the reward accuracy (else the reward margin)."""
    for key, name in (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")):
        if row.get(key) is not None:
            return f"loss {row['loss']:.4f}, {name} {row[key]:.3f}"
    return f"loss {row['loss']:.4f}"


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged training step or evaluation."""

    def __init__(self, out: Path, history: Path | None = None):
        self.path = out / METRICS_FILE
        if history is not None:  # a resumed run: its past is the checkpoint's copy (not rows
            shutil.copyfile(history, self.path)  # an interrupted run logged after the checkpoint)
        else:
            self.path.write_text("")

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict], where: Path) -> str | None:
    """Training and eval loss and reward accuracy (KTO: the reward margin) against the step, as
    a PNG; returns a note instead when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "matplotlib is not installed: no curves (pip install matplotlib)"
    # Figure + the Agg canvas, not pyplot: no global backend or figure state is touched.
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    second = ("rewards/accuracies", "reward accuracy")
    if not any(r.get("rewards/accuracies") is not None for r in rows):
        second = ("rewards/margins", "reward margin")
    for ax, (key, title) in zip(fig.subplots(1, 2), (("loss", "loss"), second)):
        for split, style in (("train", "-"), ("eval", "o-")):
            pts = [(r["step"], r[key]) for r in rows if r.get("split") == split and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=4)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.savefig(where, dpi=100)
    return None
