"""Train a tiny TransformerWrapper with fastdpo.DPO on a synthetic preference task (CPU).

The task: after a prompt of random digits, the preferred completion repeats the prompt in
ascending order, the unpreferred one is random digits.  A policy that learns the preference
raises the implicit reward of sorted completions above that of random ones, so the reward
accuracy on held-out pairs climbs towards 1.

    python examples/train_synthetic.py --loss-type sigmoid ipo --steps 200
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader
from x_transformers import Decoder, TransformerWrapper

from fastdpo import DPO, PreferenceDataset

PAD, VOCAB = 0, 12  # token 0 pads; digits are 1..11


def make_pairs(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        p = int(torch.randint(4, 8, (1,), generator=g))
        prompt = torch.randint(1, VOCAB, (p,), generator=g)
        good = torch.sort(prompt).values
        bad = torch.randint(1, VOCAB, (p + int(torch.randint(-2, 3, (1,), generator=g)),), generator=g)
        items.append(dict(preferred=torch.cat((prompt, good)), unpreferred=torch.cat((prompt, bad)), prompt_len=p))
    return items


def fit(dpo: DPO, *, steps: int, seed: int, lr: float, desc: str, progress: bool = True) -> dict:
    """Train ``dpo``'s policy on the synthetic pairs with Adam; return the final training loss
    and the held-out metrics (reward accuracy among them).  examples/train_hf.py uses it too."""
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
    bar = tqdm(total=steps, desc=desc, disable=not progress) if tqdm else None
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
    return {"loss": loss.item(), **{k: v.item() for k, v in held_out.items()}}


def train(loss_type: str = "sigmoid", *, steps: int = 200, seed: int = 0, beta: float = 0.1, lr: float = 3e-3, progress: bool = True) -> dict:
    """Train; return the final loss and the held-out metrics (reward accuracy among them)."""
    torch.manual_seed(seed)
    model = TransformerWrapper(
        num_tokens=VOCAB, max_seq_len=32, attn_layers=Decoder(dim=64, depth=2, heads=4)
    )
    dpo = DPO(model, beta=beta, pad_id=PAD, loss_type=loss_type)
    return fit(dpo, steps=steps, seed=seed, lr=lr, desc=f"DPO ({loss_type})", progress=progress)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss-type", nargs="+", default=["sigmoid", "ipo"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for loss_type in args.loss_type:
        result = train(loss_type, steps=args.steps, seed=args.seed)
        print(
            f"{loss_type:>8}: final train loss {result['loss']:.4f}, held-out reward accuracy "
            f"{result['rewards/accuracies']:.3f}, margin {result['rewards/margins']:.3f}"
        )


if __name__ == "__main__":
    main()
