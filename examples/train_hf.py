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
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_synthetic import PAD, VOCAB, fit  # noqa: E402

from fastdpo import DPO  # noqa: E402


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
    result = fit(dpo, steps=steps, seed=seed, lr=lr, desc="DPO (Llama" + (", LoRA)" if lora else ")"),
                 progress=progress)
    return {"route": dpo.route(dpo.policy_model, "cpu").kind, **result}


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
