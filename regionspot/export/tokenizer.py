"""
CLIP's byte-level BPE tokenizer without torch (``clip.tokenize`` gives the same ids; tested).

The merges come from CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (copied next to the exported graphs).
Text is cleaned as CLIP does: ``ftfy.fix_text`` and HTML unescaping, whitespace collapsed, lower-
cased, then split into words with CLIP's pattern (``regex`` for its Unicode letter and number
classes). Without ``ftfy`` / ``regex`` installed, the clean-up skips ``fix_text`` and the pattern uses
the standard ``re`` module's letter and digit classes, which agree for ordinary class names.
"""
import gzip
import html
import re
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple

import numpy as np

try:  # optional, as explained above
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None
try:
    import regex as _regex
except ImportError:  # pragma: no cover - depends on the environment
    _regex = None

__all__ = ["ClipTokenizer", "START_OF_TEXT", "END_OF_TEXT"]

START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"
# CLIP's merge list is cut to give a 49408-token vocabulary: 256 bytes, 256 word-final bytes,
# 48894 merges, 2 special tokens.
_NUM_MERGES = 49152 - 256 - 2


def _byte_symbols() -> Dict[int, str]:
    """Byte -> one printable character: printable Latin-1 bytes stand for themselves, the others
    for the code points from 256 up, in byte order (the GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    # Ordered as the vocabulary lists them: the printable bytes first, then the others.
    out = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + extra)
    return out


def _clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


if _regex is not None:
    _WORDS = _regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        _regex.IGNORECASE,
    )
else:  # pragma: no cover - depends on the environment
    _WORDS = re.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""", re.IGNORECASE
    )


class ClipTokenizer:
    """
    Args:
        bpe_path: CLIP's ``bpe_simple_vocab_16e6.txt.gz``.
        context_length: tokens per row (77 for CLIP).
    """

    def __init__(self, bpe_path: str, context_length: int = 77):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges: List[Tuple[str, str]] = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
        self.byte_symbols = _byte_symbols()
        symbols = list(self.byte_symbols.values())
        vocabulary = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_OF_TEXT, END_OF_TEXT]
        self.ids = {token: i for i, token in enumerate(vocabulary)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.context_length = int(context_length)
        self.sot, self.eot = self.ids[START_OF_TEXT], self.ids[END_OF_TEXT]
        self._bpe = lru_cache(maxsize=65536)(self._merge_word)

    def _merge_word(self, word: str) -> Tuple[str, ...]:
        """A word (byte symbols) -> its BPE pieces: repeatedly merge the adjacent pair of lowest rank."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                rank = self.ranks.get((parts[i], parts[i + 1]))
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = (parts[i], parts[i + 1]), rank
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (no start / end tokens)."""
        out = []
        for word in _WORDS.findall(_clean(text).lower()):
            if word in (START_OF_TEXT, END_OF_TEXT):
                out.append(self.ids[word])
                continue
            symbols = "".join(self.byte_symbols[b] for b in word.encode("utf-8"))
            out.extend(self.ids[p] for p in self._bpe(symbols))
        return out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), context_length] int64 ids as ``clip.tokenize(texts)`` (too long a text is refused)."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > self.context_length:
                raise ValueError(f"Text {text!r} is {len(ids)} tokens long, more than CLIP's {self.context_length}.")
            out[row, : len(ids)] = ids
        return out


def clean_class_name(name: str) -> str:
    """As ``regionspot.modeling.text_embeddings.clean_class_name``: COCO-panoptic suffixes removed."""
    for suffix in ("-other", "-merged", "-stuff"):
        name = name.replace(suffix, "")
    return name


def text_key(name: str) -> str:
    """The text CLIP reads for a class name (see ``text_embeddings.prompt_text_key``)."""
    return _clean(clean_class_name(name)).lower()
