"""Train DigitsCNN on scikit-learn's bundled digits; write digits_cnn.safetensors and digits.npz.

Run: .venv/bin/python examples/digits_cnn/train.py
"""

import numpy as np
import torch
from model import DATA, WEIGHTS, DigitsCNN
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from torch import nn

N_TRAIN, N_HELDOUT = 1397, 400
EPOCHS, BATCH, LR = 60, 32, 3e-3


def split() -> tuple[np.ndarray, np.ndarray]:
    """Pixels float32 [N, 1, 8, 8] in [0, 1] and int64 labels: train rows first, held out last."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    assert len(order) == N_TRAIN + N_HELDOUT
    pixels = (digits.images[order] / 16.0).astype(np.float32)[:, None]
    return pixels, digits.target[order].astype(np.int64)


def accuracy(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(pixels).argmax(1) == labels).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    pixels, labels = split()
    x, y = torch.from_numpy(pixels), torch.from_numpy(labels)
    x_train, y_train, x_held, y_held = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS)
    gen = torch.Generator().manual_seed(0)
    for _ in range(EPOCHS):
        model.train()
        for idx in torch.randperm(N_TRAIN, generator=gen).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
        sched.step()
    model.eval()

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, WEIGHTS)
    np.savez_compressed(DATA, pixels=pixels, labels=labels)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params}")
    print(f"train accuracy: {accuracy(model, x_train, y_train):.4f}")
    print(f"held-out accuracy: {accuracy(model, x_held, y_held):.4f} ({N_HELDOUT} samples)")


if __name__ == "__main__":
    main()
