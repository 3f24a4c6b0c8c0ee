"""fastdpo.trl's trainers against TRL 1.16's own, trained side by side: the same tiny random-init
Llama (hidden 64, 2 layers, 4 heads, 2 KV heads, vocabulary 300) saved with a tokenizer built
offline (tests/test_train.py's), the same seed and records, ``report_to="none"``, on the CPU.

Each comparison trains TRL's trainer and ours for four AdamW steps (lr 1e-3: the weights move
about 1e-3 a step, so later steps' losses depend on the earlier gradients, while the two runs'
float32 differences stay at rounding level) and checks:

* every logged row (training steps and evaluations) has TRL's metric names, less ``entropy`` and
  ``logits/*``, which fastdpo does not compute (fastdpo/trl/dpo.py says why);
* every logged number (loss, grad_norm, rewards, log-probs, token accuracy, ...) within 1e-5
  relative -- relative to the log-probs it is computed from for the rewards, the margins and KTO's
  ``kl``: those are differences of float32 sums of ~20 token log-probs (~-17 each, known to
  ~1e-6), so their own relative rounding is larger where they are small; ``rewards/accuracies``
  (a count of rewards above 0) is skipped in a row whose rewards are all rounding (the first
  step with precomputed reference scores: fastdpo scores those and the policy on two code paths,
  so their differences, 0 in exact arithmetic, have random signs);
* the weights after the four steps: each tensor's update (final minus initial) within 1e-3 of
  TRL's in norm (measured at most 3e-4), and every element within 1e-4 (measured at most 5e-5,
  typical 1e-8, against moves of about 1e-3 a step).  The element bound is the loose one: Adam
  divides each gradient element by its own RMS, so where an element's gradient nearly cancels
  (head rows), float32-rounding differences of the gradient become relative differences of its
  step (tests/test_train.py's torchrun test bounds the same effect the same way); a pair missed
  or weighted wrongly moves whole tensors, which the norm bound sees.  Every tensor that trains
  must have moved by more than 1e-3, so neither bound is vacuous.

Set-ups: defaults (with an evaluation), gradient checkpointing, LoRA (``peft_config``),
``precompute_ref_log_probs``, ``loss_type=["sigmoid", "sft"]`` with weights, an f-divergence with
fastdpo's packing, two processes (torchrun, gloo: this file is also the script each process runs),
KTO, ORPO and CPO (TRL's experimental trainers); and that the comparison fails for beta 0.105
against 0.1, that what fastdpo cannot honour is a one-line error, and that importing fastdpo.trl
without TRL 1.16 is a one-line ImportError.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import records, tokenizer, torchrun

STEPS, LR, BATCH = 4, 1e-3, 4
# TRL logs these, fastdpo computes them not (reductions over the vocabulary of every scored row).
NOT_LOGGED = {"entropy", "logits/chosen", "logits/rejected"}
# Differences of log-prob sums: compared relative to the log-probs (see the module docstring).
DIFFERENCES = {"rewards/chosen": True, "rewards/rejected": True, "rewards/margins": True, "kl": False,
               "log_odds_chosen": False}  # (True: scaled by beta)
TIMING = ("runtime", "per_second")


def save_model(path: Path) -> Path:
    tok = tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def pairs(n: int, seed: int):
    return datasets.Dataset.from_list(records(n, seed=seed))


def unpaired(n: int, seed: int):
    """KTO's records: each pair's chosen (desirable) or rejected completion, two in three desirable."""
    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(records(n, seed=seed))]
    return datasets.Dataset.from_list(rows)


def make_config(config, out: str, batch: int, steps: int, evaluate: bool, options: dict):
    return config(
        output_dir=out, per_device_train_batch_size=batch, per_device_eval_batch_size=batch, max_steps=steps,
        learning_rate=LR, logging_steps=1, report_to="none", use_cpu=True, bf16=options.pop("bf16", False),
        gradient_checkpointing=options.pop("gradient_checkpointing", False), save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, seed=0, eval_strategy="steps" if evaluate else "no",
        eval_steps=2, **options,
    )


def train(trainer, config, model_dir: Path, data, *, eval_data=None, batch: int = BATCH, steps: int = STEPS,
          model=None, peft_config=None, **options) -> SimpleNamespace:
    """``trainer`` trained ``steps`` steps on ``data`` from the model saved in ``model_dir`` (loaded
    by the trainer from its path, its reference too, unless ``model`` is given); its log rows and
    final weights."""
    kwargs = {"peft_config": peft_config} if peft_config is not None else {}
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="fastdpo-trl-") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (TRL's deprecations; transformers' v6 renames)
        args = make_config(config, out, batch, steps, eval_data is not None, options)
        t = trainer(model=model if model is not None else str(model_dir), args=args, train_dataset=data,
                    eval_dataset=eval_data, processing_class=tok, **kwargs)
        t.remove_callback(transformers.trainer_callback.PrinterCallback)  # (disable_tqdm's printing)
        start = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
        t.train()
    rows = [r for r in t.state.log_history if "loss" in r or "eval_loss" in r]
    return SimpleNamespace(rows=rows, weights={k: v.detach().clone() for k, v in t.model.state_dict().items()},
                           start=start, trainer=t)


def compare(theirs: SimpleNamespace, ours: SimpleNamespace, *, beta: float, weights: bool = True) -> dict:
    """Assert ours is TRL's (module docstring); return the largest differences seen."""
    worst = {"metric": 0.0, "weight": 0.0}
    assert len(ours.rows) == len(theirs.rows) > 0
    for want, got in zip(theirs.rows, ours.rows):
        prefix = "eval_" if "eval_loss" in want else ""
        names = {k for k in want if not any(t in k for t in TIMING)}
        assert set(got) - {k for k in got if any(t in k for t in TIMING)} == names - {prefix + k for k in NOT_LOGGED}
        logps = max(abs(want.get(f"{prefix}logps/chosen", 0.0)), abs(want.get(f"{prefix}logps/rejected", 0.0)))
        rewards = [abs(want.get(f"{prefix}rewards/{k}", 1.0)) for k in ("chosen", "rejected")]
        for k in names - {prefix + k for k in NOT_LOGGED}:
            if k == f"{prefix}rewards/accuracies" and max(rewards) <= 1e-5 * beta * logps:
                continue  # every reward is rounding (the policy is still the reference): its sign is noise
            scaled = DIFFERENCES.get(k.removeprefix(prefix))
            floor = 0.0 if scaled is None else logps * (beta if scaled else 1.0)
            err = abs(got[k] - want[k]) / max(abs(want[k]), abs(got[k]), floor, 1e-30)
            assert err <= 1e-5, f"step {want['step']} {k}: TRL {want[k]!r}, fastdpo {got[k]!r}"
            worst["metric"] = max(worst["metric"], err)
    if weights:
        assert ours.weights.keys() == theirs.weights.keys() == theirs.start.keys()
        trained = 0
        for k, w in theirs.weights.items():
            assert torch.equal(ours.start[k], theirs.start[k]), f"{k}: the runs did not start from the same weights"
            err = (ours.weights[k] - w).abs().max().item()
            assert err <= 1e-4, f"{k}: the weights differ by {err:.3g} after {STEPS} steps"
            worst["weight"] = max(worst["weight"], err)
            moved = (w - theirs.start[k]).norm().item()
            if moved > 0:
                rel = (ours.weights[k] - w).norm().item() / moved
                assert rel <= 1e-3, f"{k}: its update differs from TRL's by {rel:.3g} of its norm"
                worst["update"] = max(worst.get("update", 0.0), rel)
            if not torch.equal(w, theirs.start[k]):  # trained: it moved by steps, so the bound is not vacuous
                trained += 1
                assert (w - theirs.start[k]).abs().max() > 1e-3, f"{k} barely moved"
        assert trained > 0
    return worst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    return save_model(tmp_path_factory.mktemp("trl") / "llama")


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models' steps are faster on one thread than split over two (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(model_dir):
    """Runs shared by tests (the default set-up's, TRL's and ours), made on first use."""
    import trl

    from fastdpo import trl as ftrl

    cache = {}

    def get(name: str) -> SimpleNamespace:
        if name not in cache:
            trainer = {"trl": trl.DPOTrainer, "fastdpo": ftrl.DPOTrainer}[name]
            config = {"trl": trl.DPOConfig, "fastdpo": ftrl.DPOConfig}[name]
            cache[name] = train(trainer, config, model_dir, pairs(16, seed=0), eval_data=pairs(6, seed=1))
        return cache[name]

    return get


# ----------------------------------------------------------------------------- DPO, one process


def test_defaults_match_trl_with_evaluation_and_saving(runs, tmp_path):
    theirs, ours = runs("trl"), runs("fastdpo")
    print("defaults", compare(theirs, ours, beta=0.1))
    assert sum("eval_loss" in r for r in ours.rows) == 2  # evaluations at steps 2 and 4
    assert {"mean_token_accuracy", "num_tokens", "rewards/accuracies"} <= set(ours.rows[0])
    ours.trainer.save_model(str(tmp_path / "saved"))  # TRL's saving, of the trained weights
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.equal(saved[k], ours.weights[k]) for k in saved)


def test_the_comparison_fails_for_another_beta(runs, model_dir):
    """A test that cannot fail is a defect: beta 0.105 against TRL's 0.1 fails it."""
    from fastdpo import trl as ftrl

    other = train(ftrl.DPOTrainer, ftrl.DPOConfig, model_dir, pairs(16, seed=0), eval_data=pairs(6, seed=1), beta=0.105)
    with pytest.raises(AssertionError, match="TRL .*, fastdpo"):
        compare(runs("trl"), other, beta=0.1, weights=False)


@pytest.mark.parametrize("setup", ["gradient_checkpointing", "lora", "precompute_ref_log_probs",
                                   "sigmoid+sft,f_divergence,packing"])
def test_setups_match_trl(setup, model_dir):
    import peft
    import trl

    from fastdpo import trl as ftrl

    options, ours_only, eval_data = {}, {}, None
    if setup == "gradient_checkpointing":
        options = dict(gradient_checkpointing=True)
    elif setup == "lora":
        options = dict(peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                   target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    elif setup == "precompute_ref_log_probs":
        options, eval_data = dict(precompute_ref_log_probs=True), pairs(6, seed=1)
    else:  # a weighted mix with TRL's SFT term, an f-divergence, and fastdpo's packing (ours only)
        options = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.2,
                       f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7)
        ours_only = {"packing": "pair"}
    data = pairs(16, seed=2)
    theirs = train(trl.DPOTrainer, trl.DPOConfig, model_dir, data, eval_data=eval_data, **options)
    ours = train(ftrl.DPOTrainer, ftrl.DPOConfig, model_dir, data, eval_data=eval_data, **options, **ours_only)
    print(setup, compare(theirs, ours, beta=options.get("beta", 0.1)))
    dpo = ours.trainer._fastdpo
    if setup == "lora":
        assert dpo.ref_model is None and dpo.has_reference()  # the policy with its adapters off, as TRL
    elif setup == "precompute_ref_log_probs":
        assert not dpo.has_reference()  # the policy's copy that scored the reference is gone
    else:
        assert dpo.ref_model is ours.trainer.accelerator.unwrap_model(ours.trainer.ref_model)  # TRL's own, no copy
    if ours_only:
        assert dpo.packing.layout == "pair"


# ----------------------------------------------------------------------------- two processes


def _two_process_worker(out: str, model_dir: str) -> None:
    """Run under torchrun: TRL's trainer, then ours, two pairs a process; process 0 saves both."""
    import trl

    from fastdpo import trl as ftrl

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    found = {}
    for name, trainer, config in (("trl", trl.DPOTrainer, trl.DPOConfig), ("fastdpo", ftrl.DPOTrainer, ftrl.DPOConfig)):
        run = train(trainer, config, Path(model_dir), pairs(16, seed=0), eval_data=pairs(6, seed=1), batch=BATCH // 2)
        if name == "fastdpo":
            assert type(run.trainer.model_wrapped).__name__ == "DistributedDataParallel"
        found[name] = dict(rows=run.rows, weights=run.weights, start=run.start)
    if int(os.environ["RANK"]) == 0:
        torch.save(found, Path(out) / "runs.pt")


def test_two_processes_match_trl(model_dir, tmp_path):
    done = torchrun(__file__, tmp_path, model_dir, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = torch.load(tmp_path / "runs.pt", weights_only=False)
    theirs, ours = (SimpleNamespace(**found[k]) for k in ("trl", "fastdpo"))
    print("two processes", compare(theirs, ours, beta=0.1))


# ----------------------------------------------------------------------------- KTO, ORPO, CPO


def test_kto_matches_trl(model_dir):
    import trl

    from fastdpo import trl as ftrl

    data = unpaired(12, seed=3)
    theirs = train(trl.KTOTrainer, trl.KTOConfig, model_dir, data, steps=3)
    ours = train(ftrl.KTOTrainer, trl.KTOConfig, model_dir, data, steps=3)
    print("kto", compare(theirs, ours, beta=0.1))
    assert {"kl", "rewards/margins"} <= set(ours.rows[1])


@pytest.mark.parametrize("family", ["ORPO", "CPO"])
def test_orpo_and_cpo_match_trl_experimental(family, model_dir):
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from fastdpo import trl as ftrl

    trainers = {"ORPO": (ORPOTrainer, ftrl.ORPOTrainer, ORPOConfig), "CPO": (CPOTrainer, ftrl.CPOTrainer, CPOConfig)}
    theirs_cls, ours_cls, config = trainers[family]
    data = pairs(8, seed=4)
    model = transformers.AutoModelForCausalLM.from_pretrained  # (these trainers take a model, not a path)
    theirs = train(theirs_cls, config, model_dir, data, steps=2, model=model(model_dir), beta=0.2)
    ours = train(ours_cls, config, model_dir, data, steps=2, model=model(model_dir), beta=0.2)
    print(family, compare(theirs, ours, beta=0.2))
    assert ("log_odds_ratio" in ours.rows[0]) == (family == "ORPO")


# ----------------------------------------------------------------------------- refusals


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (TRL's defaults read transformers' v6 renames)
def test_options_fastdpo_cannot_honour_are_one_line_errors(model_dir, tmp_path):
    import trl

    from fastdpo import trl as ftrl

    data = pairs(4, seed=0)
    for options, words in (
        (dict(label_smoothing=0.1), "label_smoothing=0.1 with loss_type ['sigmoid']"),  # TRL ignores it for sigmoid
        (dict(loss_type=["ipo"], label_smoothing=0.1), "TRL 1.16 ignores label_smoothing"),
        (dict(packing="diagonal"), "packing must be one of"),
    ):
        config = ftrl.DPOConfig if "packing" in options else trl.DPOConfig
        args = config(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **options)
        with pytest.raises(ValueError) as e:
            ftrl.DPOTrainer(model=str(model_dir), args=args, train_dataset=data)
        assert words in _one_line(e)
    # a PeftModel with its adapter and no ref_model: TRL's reference is a "ref" copy of the adapter
    import peft

    wrapped = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(model_dir),
                                  peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError) as e:
        ftrl.DPOTrainer(model=wrapped, args=args, train_dataset=data,
                        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    assert "a PeftModel passed with its adapter and no ref_model" in _one_line(e)
    # a pair whose two prompts keep_end truncation cuts differently: at its batch, in one line
    cut = datasets.Dataset.from_list([{"prompt": "count : a b c d", "chosen": " e", "rejected": " e f g h"}] * 2)
    with pytest.warns(FutureWarning):
        args = trl.DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                             truncation_mode="keep_end", max_length=6, per_device_train_batch_size=2, max_steps=1)
    t = ftrl.DPOTrainer(model=str(model_dir), args=args, train_dataset=cut)
    with pytest.raises(ValueError) as e:
        t.train()
    assert "prompt tokens at different positions" in _one_line(e)


@pytest.mark.parametrize("installed", [None, "1.17.0"])
def test_import_without_trl_1_16_is_one_line(installed, monkeypatch):
    def version(name):
        if name == "trl":
            if installed is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed
        return real(name)

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", version)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "fastdpo.trl" or k.startswith("fastdpo.trl.")}
    try:
        with pytest.raises(ImportError) as e:
            importlib.import_module("fastdpo.trl")
        assert "pip install fastdpo[trl]" in _one_line(e)
    finally:
        for k in [k for k in sys.modules if k == "fastdpo.trl" or k.startswith("fastdpo.trl.")]:
            del sys.modules[k]
        sys.modules.update(saved)


if __name__ == "__main__":  # a process of test_two_processes_match_trl, under torchrun
    import fastdpo.scoring.logits_op

    fastdpo.scoring.logits_op.SMALL_ELEMENTS = 0  # the main path, as tests/conftest.py has it
    _two_process_worker(sys.argv[1], sys.argv[2])
