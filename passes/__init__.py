"""Optimization passes, in the order they run. Each module has one entry point, `run`."""

from qspec.passes import calibrate, quantize

PIPELINE = (
    ("calibrate", calibrate.run),
    ("quantize", quantize.run),
)
