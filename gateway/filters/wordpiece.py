"""WordPiece tokenizing (the uncased BERT scheme) of text that `content.normalise` has already cleaned.

    text ──> words: ASCII fast path (one regex)        ──> pieces per word: greedy longest match  ──> token ids
             else: accents stripped, every punctuation      in the vocabulary, "##" for a piece
             mark and CJK ideograph a word of its own       inside a word; no match -> [UNK]

Written here rather than taken from the `tokenizers` package so that the gateway needs onnxruntime alone:
posts are short and repeat their words, so a per-word cache makes the Python path fast enough (the model card
gives posts/s). It follows BERT's BasicTokenizer + WordpieceTokenizer closely enough that the static embeddings,
distilled per vocabulary entry, mean what the teacher meant by them; the training script reports how often the
ids agree with the reference tokenizer. It never raises: every input string gives a list of ids, possibly empty.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

# The input is lower-cased and free of control characters already (normalise), so for ASCII every run of letters
# and digits is a word and every other non-space character a word of its own (BERT counts all of ASCII's
# non-alphanumeric printable characters as punctuation).
_ASCII_WORDS = re.compile(r"[a-z0-9]+|\S")

# CJK ideographs are words of one character each, as in BERT (its vocabulary holds them one by one).
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

# A word longer than this is one [UNK]: matching it costs time quadratic in its length and it is never a real word.
MAX_WORD_CHARS = 100
# Words remembered with their pieces. Posts repeat words, so the cache takes most of the matching away; bounded,
# and cleared when full, so a flood of distinct junk words cannot grow the process.
CACHE_WORDS = 10_000


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK)


def _words_unicode(text: str) -> list[str]:
    # Accents off as in uncased BERT: decompose, drop the combining marks (so "café" meets the vocabulary's "cafe").
    # BERT also drops what normalise() leaves of the "other" categories (private use, unassigned) and U+FFFD.
    text = "".join(c for c in unicodedata.normalize("NFD", text)
                   if c != "\ufffd" and unicodedata.category(c) != "Mn" and unicodedata.category(c)[0] != "C")
    words: list[str] = []
    current: list[str] = []
    for c in text:
        if c.isspace():
            if current:
                words.append("".join(current))
                current = []
        elif (c.isascii() and not c.isalnum()) or unicodedata.category(c).startswith("P") or _is_cjk(ord(c)):
            if current:
                words.append("".join(current))
                current = []
            words.append(c)
        else:
            current.append(c)
    if current:
        words.append("".join(current))
    return words


def words(text: str) -> list[str]:
    """The words BERT's basic tokenizer would make of an already lower-cased, control-free text."""
    if text.isascii():
        return _ASCII_WORDS.findall(text)
    return _words_unicode(text)


class WordPiece:
    """Text -> vocabulary ids. `vocab` is the list of entries in id order ("[UNK]" among them)."""

    def __init__(self, vocab: Sequence[str], unk: str = "[UNK]") -> None:
        self.ids = {token: i for i, token in enumerate(vocab)}
        if unk not in self.ids:
            raise ValueError(f"the vocabulary lacks the unknown token {unk!r}")
        self.unk = self.ids[unk]
        self._longest = max(len(t) for t in vocab)
        self._cache: dict[str, tuple[int, ...]] = {}

    def word(self, word: str) -> tuple[int, ...]:
        """The ids of one word: greedy longest-match pieces, or (unk,) if some part matches nothing."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        pieces: tuple[int, ...] = (self.unk,)
        if len(word) <= MAX_WORD_CHARS:
            found: list[int] = []
            start = 0
            while start < len(word):
                end = min(len(word), start + self._longest)
                prefix = "##" if start else ""
                while end > start and (prefix + word[start:end]) not in self.ids:
                    end -= 1
                if end == start:
                    break
                found.append(self.ids[prefix + word[start:end]])
                start = end
            else:
                pieces = tuple(found)
        if len(self._cache) >= CACHE_WORDS:
            self._cache.clear()
        self._cache[word] = pieces
        return pieces

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """The ids of a text, the first `max_tokens` of them."""
        out: list[int] = []
        for w in words(text):
            out.extend(self.word(w))
            if len(out) >= max_tokens:
                return out[:max_tokens]
        return out
