"""Optimization passes, in the order they run. Each module has one entry point, `run`, a
function from State to State (`reuse` has two, around the passes that compress); passes never
import each other."""

from qspec.passes import calibrate, compensate, quantize, reuse, sparsify

PIPELINE = (
    ("calibrate", calibrate.run),
    ("reuse", reuse.lookup),
    ("sparsify", sparsify.run),
    ("quantize", quantize.run),
    ("compensate", compensate.run),
    ("store", reuse.store),
)
