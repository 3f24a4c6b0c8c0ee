"""Train a tiny Hugging Face Llama with fastdpo.DPO on the synthetic preference task (CPU).

The model is built from a config (nothing is downloaded); the task is
examples/train_synthetic.py's: after a prompt of random digits, the preferred completion
repeats the prompt in ascending order, the unpreferred one is random digits.  fastdpo fuses the
Llama's ``lm_head`` into the loss (no logits are built).  With ``--lora`` the policy is a peft
LoRA model and its reference is the same model with the adapters off (no copy).

    pip install "fastdpo[hf]"
    python examples/train_hf.py --steps 150
    python examples/train_hf.py --lora --steps 300
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_synthetic import PAD, VOCAB, make_pairs  # noqa: E402

from fastdpo import DPO, PreferenceDataset  # noqa: E402


def build_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        pad_token_id=PAD, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def train(*, steps: int = 150, seed: int = 0, beta: float = 0.1, lr: float = 3e-3, lora: bool = False,
          progress: bool = True) -> dict:
    """Train; return the final loss, the route taken and the held-out metrics."""
    model = build_llama(seed)
    if lora:
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        )
    dpo = DPO(model, beta=beta, pad_id=PAD)
    train_ds = PreferenceDataset(make_pairs(2048, seed), pad_id=PAD)
    test_ds = PreferenceDataset(make_pairs(256, seed + 1), pad_id=PAD)
    loader = DataLoader(
        train_ds, batch_size=16, shuffle=True, collate_fn=train_ds.collate,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = torch.optim.Adam(dpo.parameters(), lr=lr)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=steps, desc="DPO (Llama" + (", LoRA)" if lora else ")"), disable=not progress) if tqdm else None
    step, loss = 0, None
    while step < steps:
        for pref, unpref, prompt_mask in loader:
            loss, metrics = dpo(pref, unpref, prompt_mask=prompt_mask, return_metrics=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if bar:
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{metrics['rewards/accuracies'].item():.2f}")
            if step == steps:
                break
    if bar:
        bar.close()
    dpo.eval()
    with torch.no_grad():
        pref, unpref, prompt_mask = test_ds.collate([test_ds[i] for i in range(len(test_ds))])
        _, held_out = dpo(pref, unpref, prompt_mask=prompt_mask, return_metrics=True)
    route = dpo.route(dpo.policy_model, pref.device).kind
    return {"loss": loss.item(), "route": route, **{k: v.item() for k, v in held_out.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
    args = parser.parse_args()
    result = train(steps=args.steps, seed=args.seed, lr=args.lr, lora=args.lora)
    print(
        f"route {result['route']}: final train loss {result['loss']:.4f}, held-out reward accuracy "
        f"{result['rewards/accuracies']:.3f}, margin {result['rewards/margins']:.3f}"
    )


if __name__ == "__main__":
    main()
