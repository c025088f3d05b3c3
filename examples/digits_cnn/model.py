"""A tiny CNN for scikit-learn's 8x8 digits, used by the qspec examples in this folder."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

HERE = Path(__file__).parent
WEIGHTS = HERE / "digits_cnn.safetensors"
DATA = HERE / "digits.npz"


class DigitsCNN(nn.Module):
    """conv1 -> depthwise conv2 -> pointwise conv3 -> 4x4 average pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv3 = nn.Conv2d(16, 32, 1)
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(32 * 2 * 2, 10)
        self.relu = nn.ReLU()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(pixels))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def load() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The trained model in eval mode and an example batch of 4 real digits."""
    model = DigitsCNN()
    model.load_state_dict(load_file(WEIGHTS))
    model.eval()
    pixels = torch.from_numpy(np.load(DATA)["pixels"][:4])
    return model, {"pixels": pixels}


def batches(batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
    """All digits in file order (training rows first, the 400 held-out rows last)."""
    pixels = torch.from_numpy(np.load(DATA)["pixels"])
    for start in range(0, len(pixels), batch_size):
        yield {"pixels": pixels[start : start + batch_size]}
