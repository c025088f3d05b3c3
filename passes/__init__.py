"""Optimization passes, in the order they run. Each module has one entry point, `run`, a
function from State to State; passes never import each other."""

from qspec.passes import calibrate, compensate, quantize, sparsify

PIPELINE = (
    ("calibrate", calibrate.run),
    ("sparsify", sparsify.run),
    ("quantize", quantize.run),
    ("compensate", compensate.run),
)
