"""The registry of methods is the one place passes and the driver ask what a method needs."""

from __future__ import annotations

import pytest

from qspec.backends import BACKENDS
from qspec.dsl import vocabulary
from qspec.passes import methods


@pytest.mark.parametrize(
    ("table", "words"),
    [
        (methods.ROUNDING, vocabulary.ROUNDING),
        (methods.PRUNING, vocabulary.SPARSITY_METHOD),
        (methods.CORRECTION, vocabulary.LOWRANK_METHOD),
    ],
)
def test_every_method_the_language_names_is_registered(table: dict, words):
    """A word the language accepts without a registered method would crash a compile; a
    method the language cannot name is dead."""
    assert set(table) == set(words.words)


def test_every_backend_the_language_names_exists():
    assert set(BACKENDS) == set(vocabulary.BACKEND.words)


def test_joint_methods_name_a_rounding_method():
    joint = {m.needs.joint for m in methods.PRUNING.values()} - {None}
    assert joint and joint <= set(methods.ROUNDING)
