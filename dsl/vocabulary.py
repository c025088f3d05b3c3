"""The enumerated words of the language, each with how a diagnostic names what was expected."""

from __future__ import annotations

from dataclasses import dataclass

from qspec.dsl.formats import (
    ACTIVATION_FORMATS,
    FORMAT_ALIASES,
    SCALE_FORMATS,
    WEIGHT_FORMATS,
)


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]
    expected: str  # "a weight format such as int4, fp8_e4m3, nf4"
    aliases: tuple[tuple[str, str], ...] = ()

    def canonical(self, word: str) -> str | None:
        """The canonical spelling of `word`, or None when it is not in the vocabulary."""
        word = dict(self.aliases).get(word, word)
        return word if word in self.words else None

    @property
    def spellings(self) -> tuple[str, ...]:
        return self.words + tuple(alias for alias, _ in self.aliases)


WEIGHT_FORMAT = Vocabulary(
    tuple(WEIGHT_FORMATS),
    "a weight format such as int4, fp8_e4m3, nf4",
    tuple(FORMAT_ALIASES.items()),
)
ACTIVATION_FORMAT = Vocabulary(
    ACTIVATION_FORMATS,
    "an activation format: int8, uint8, fp8_e4m3 or fp8_e5m2 (or `none`)",
    (("fp8", "fp8_e4m3"),),
)
SCALE_FORMAT = Vocabulary(tuple(SCALE_FORMATS), "a scale format: fp32, fp16, fp8 or e8m0")
ROUNDING = Vocabulary(("nearest", "gptq"), "a rounding method: nearest or gptq")
CALIBRATE = Vocabulary(
    ("minmax", "percentile", "mse", "entropy"),
    "an activation calibration method: minmax, percentile P, mse or entropy",
)
SEARCH = Vocabulary(("clip", "format"), "a search target: clip or format")
SPARSITY_METHOD = Vocabulary(
    ("magnitude", "wanda", "sparsegpt"), "a sparsity method: magnitude, wanda or sparsegpt"
)
LOWRANK_METHOD = Vocabulary(("svd", "eora"), "a low-rank method: svd or eora")
FACTOR_FORMAT = Vocabulary(("fp16", "int8"), "a factor format: fp16 or int8")
BACKEND = Vocabulary(("onnx", "tvm"), "a backend: onnx or tvm")
CALIBRATION_MODE = Vocabulary(
    ("sequential", "parallel"), "a calibration mode: sequential or parallel"
)
ALLOCATOR = Vocabulary(("ilp", "evolution"), "an allocation strategy: ilp or evolution")
FITNESS = Vocabulary(("cosine", "kl", "evaluate"), "a fitness: cosine, kl or evaluate")
SENSITIVITY = Vocabulary(
    ("output", "hessian", "metric"), "a sensitivity measure: output, hessian or metric"
)

# Devices each backend compiles for; `llvm` is TVM's name for the host CPU.
DEVICES: dict[str, tuple[str, ...]] = {"onnx": ("cpu", "cuda"), "tvm": ("llvm", "cuda")}
ALL_DEVICES = Vocabulary(("cpu", "cuda", "llvm"), "a device: cpu, cuda (onnx) or llvm, cuda (tvm)")

# Keywords that may only start a top-level statement: the parser resynchronises on them.
TOP_LEVEL_KEYWORDS = (
    "qspec",
    "include",
    "model",
    "calibration",
    "verify",
    "evaluate",
    "target",
    "defaults",
    "layer",
    "tie",
    "budget",
    "allocate",
)
