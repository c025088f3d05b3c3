"""Passages of real text from six domains, for calibrating and verifying text models.

The text is exllamav2 0.3.2's `standard_cal_data` (MIT): English Wikipedia, C4 web text,
source code, technical documents, several other languages and short children's stories.
`make install` unpacks it from the PyPI wheel into `standard_cal_data/` beside this file
(nothing is downloaded at run time). See README.md.
"""

import hashlib
import re
from pathlib import Path

import numpy as np

FOLDER = Path(__file__).parent / "standard_cal_data"
DOMAINS = {
    "wiki": "wiki.utf8",
    "web": "c4.utf8",
    "code": "code.utf8",
    "technical": "technical.utf8",
    "multilingual": "multilingual.utf8",
    "stories": "tiny.utf8",
}
WIKI_HEADER = re.compile(r"^<doc [^>]*>$|^</doc>$", re.MULTILINE)


def passages(domain: str, count: int = 512, words: tuple[int, int] = (8, 96)) -> list[str]:
    """`count` passages of `words` whitespace-separated words (a length drawn per passage),
    starting at points spread evenly over the domain's text: the first passages and the last
    ones come from different documents, so a source's calibration rows (its first) and its
    held-out rows (its last) do not overlap. Deterministic: the lengths come from a generator
    seeded with the domain's name."""
    path = FOLDER / DOMAINS[domain]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make install` to unpack it")
    text = WIKI_HEADER.sub("", path.read_text(encoding="utf-8"))
    tokens = text.split()
    seed = int.from_bytes(hashlib.sha256(domain.encode()).digest()[:8], "little")
    lengths = np.random.default_rng(seed).integers(words[0], words[1] + 1, count)
    starts = np.linspace(0, len(tokens) - words[1], count).astype(int)
    return [" ".join(tokens[s : s + n]) for s, n in zip(starts, lengths, strict=True)]
