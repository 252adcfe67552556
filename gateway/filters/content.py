"""The sensitive-content filter: one ONNX text classifier scoring micro-batches of posts.

    texts ──> normalise() ──> WordPiece ids ──> ONE session.run per micro-batch ─────────────────────> P(unwanted)
              (pure, per     (wordpiece.py,     ids of all texts end to end, with the row of each:     ──> Verdicts
               text)          vocabulary in      one score per id -> mean and max per text -> weighed,
                              the model)         + bias -> sigmoid, all in the graph

The model (models/content/content.onnx, trained by models/content/train.py) is a static-embedding student of the
all-MiniLM-L6-v2 sentence encoder: one vector per vocabulary entry, distilled from the teacher, with a linear head
folded in, so that each entry keeps one score. It is a few hundred kB, needs onnxruntime only, and scores
thousands of posts per second on one thread. The vocabulary travels in the model's metadata, so the .onnx file is the whole model and cannot be paired
with the wrong vocabulary. Ids go in flat (one row number per id) rather than padded: a batch's cost and memory
follow its tokens, not its longest post times its size.

A text's label comes from two thresholds on the score, both recorded in the model's metadata and overridable:
score >= block_threshold is "blocked", score >= mark_threshold is "sensitive", anything else "clean".

Not thread-safe beyond what onnxruntime offers: one caller at a time (the gateway's filter stage owns one).
"""

from __future__ import annotations

import html
import re
from array import array
from pathlib import Path
from typing import Any, Mapping, Sequence

from gateway.event import BLOCKED, Verdict
from gateway.filters.onnx_session import Tensor, open_session
from gateway.filters.wordpiece import WordPiece

CLEAN = "clean"
SENSITIVE = "sensitive"

# Texts are cut to this many characters (code points) before and after normalising. Posts are short; the longest
# training comments (Jigsaw) reach 5,000 characters, their 95th percentile is about 1,300. Cutting first bounds the
# work a hostile 1 MB post can cause; cutting again bounds what reaches the model (normalising can lengthen a text
# slightly, "@a" becomes "xxuser").
MAX_CHARS = 2000

# Token ids per onnxruntime run at most (a text is never split across runs). A run holds a few numbers per id (id, row,
# score), so this bounds its memory and the time one call holds the filter stage, whatever the batch; a micro-batch of
# tweets (about 30 ids each) takes one run. The scores do not depend on the split.
TOKENS_PER_RUN = 4096

# Bumped whenever normalise() changes what it returns: the model records the version it was trained with and the
# classifier refuses a model trained on differently normalised text.
NORMALISER_VERSION = "1"

# Placeholders are plain lower-case words: the teacher and the student read them as the same word pieces
# ("xx", "##user"), whatever the handle or address was.
_URL = re.compile(r"(?:https?://|www\.)\S+")
_HANDLE = re.compile(r"@\w+")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
# "RT @someone:" is Twitter's retweet marker, metadata rather than content.
_RETWEET = re.compile(r"\brt\s+(?=xxuser)")
# Control (Cc) and format (Cf) characters, and lone surrogates. A fixed list rather than unicodedata lookups, so the
# normalisation does not drift with the Python's Unicode version between training and serving. Whitespace controls
# (\t \n \v \f \r \x1c-\x1f \x85) are not here: str.split() below turns them into single spaces. Format characters
# (zero-width spaces and joiners, bidirectional marks, soft hyphens, tags) are how "f\u200buck" hides a word.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
)


def normalise(text: Any) -> str:
    """The text as the model sees it; total (never raises) and pure. Shared with models/content/train.py.

    In order: non-strings become "" (bytes are decoded as UTF-8, bad bytes replaced); cut to 4 * MAX_CHARS; HTML
    entities unescaped (`&amp;` -> `&`, `&#128514;` -> the emoji); lower-cased; URLs -> " xxurl ", @handles ->
    " xxuser ", IPv4 addresses -> " xxip ", a retweet marker "rt" before a handle dropped; control, format and
    surrogate characters removed; every run of whitespace -> one space, ends stripped; cut to MAX_CHARS.

    The result has no newline and no two consecutive spaces, so what the tokenizer reads does not depend on how a
    post was laid out, and no invisible character can split a word it would otherwise recognise.
    """
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    elif not isinstance(text, str):
        return ""
    text = text[: 4 * MAX_CHARS]
    text = html.unescape(text).lower()
    text = _URL.sub(" xxurl ", text)
    text = _HANDLE.sub(" xxuser ", text)
    text = _IPV4.sub(" xxip ", text)
    text = _RETWEET.sub("", text)
    text = _INVISIBLE.sub("", text)
    return " ".join(text.split())[:MAX_CHARS].rstrip()


class ModelMetadataError(ValueError):
    """The .onnx file lacks the metadata the classifier relies on, or was trained on differently normalised text."""


class ContentClassifier:
    """Scores micro-batches of post texts against the committed sensitive-content model.

    `mark_threshold` and `block_threshold` default to the ones the training script chose and recorded in the
    model's metadata. `session` is the onnxruntime session; it may be wrapped (to count runs) but must keep `run`.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        mark_threshold: float | None = None,
        block_threshold: float | None = None,
        intra_op_threads: int = 1,
    ) -> None:
        self.session: Any
        self.session, meta = open_session(model_path, intra_op_threads)
        self.name, self.version, default_mark, default_block = _read_metadata(meta, model_path)
        self.defaults = (default_mark, default_block)  # what 0 in the config means (a reload applies them again)
        self.mark_threshold = default_mark if mark_threshold is None else float(mark_threshold)
        self.block_threshold = default_block if block_threshold is None else float(block_threshold)
        for field, value in (("mark_threshold", self.mark_threshold), ("block_threshold", self.block_threshold)):
            if not 0.0 < value <= 1.0:  # also rejects NaN
                raise ValueError(f"{field} must be within (0, 1], got {value}")
        if self.mark_threshold > self.block_threshold:
            raise ValueError(f"mark_threshold {self.mark_threshold} is above block_threshold {self.block_threshold}")
        inputs = sorted(self.session.inputs)
        if inputs != ["counts", "ids", "rows"] or "probabilities" not in self.session.outputs:
            raise ModelMetadataError(f"{model_path}: expected inputs ids, rows, counts and output probabilities, "
                                     f"got inputs {inputs}")
        self._vocab = meta["vocab"]
        if "\n[UNK]\n" not in f"\n{self._vocab}\n":
            raise ModelMetadataError(f"{model_path}: the vocabulary lacks the unknown token [UNK]")
        self._tokenizer: WordPiece | None = None
        self.max_tokens = int(meta["max_tokens"])

    @property
    def tokenizer(self) -> WordPiece:
        """Built from the vocabulary on the first post: its 30,522 entries become a dict of as many strings and
        ints, which a gateway that only carries telemetry never needs (benchmarks/RESULTS.md)."""
        if self._tokenizer is None:
            self._tokenizer = WordPiece(self._vocab.split("\n"))
        return self._tokenizer

    def label(self, score: float) -> str:
        if score >= self.block_threshold:
            return BLOCKED
        if score >= self.mark_threshold:
            return SENSITIVE
        return CLEAN

    def scores(self, texts: Sequence[Any]) -> list[float]:
        """P(unwanted) per text: one session run per micro-batch, or per TOKENS_PER_RUN ids if it has more."""
        out: list[float] = []
        encoded = [self.tokenizer.encode(normalise(t), self.max_tokens) for t in texts]
        start = 0
        while start < len(encoded):
            end, n_ids = start, 0
            while end < len(encoded) and (end == start or n_ids + len(encoded[end]) <= TOKENS_PER_RUN):
                n_ids += len(encoded[end])
                end += 1
            out += self._run(encoded[start:end])
            start = end
        return out

    def _run(self, encoded: list[list[int]]) -> list[float]:
        counts = array("q", [len(e) for e in encoded])
        ids, rows = array("q"), array("q")
        for row, e in enumerate(encoded):
            ids.extend(e)
            rows.extend([row] * len(e))
        feed = {"ids": Tensor(ids, (len(ids),)), "rows": Tensor(rows, (len(rows),)),
                "counts": Tensor(counts, (len(counts),))}
        proba = self.session.run(["probabilities"], feed)[0]
        classes = proba.shape[1]
        return proba.data[1::classes].tolist()

    def score(self, texts: Sequence[Any]) -> list[Verdict]:
        """One verdict per text, in order."""
        out: list[Verdict] = []
        for s in self.scores(texts):
            label = self.label(s)
            out.append(Verdict(self.name, self.version, round(s, 6), label, label != CLEAN))
        return out


def _read_metadata(meta: Mapping[str, str], path: str | Path) -> tuple[str, str, float, float]:
    missing = [k for k in ("name", "version", "mark_threshold", "block_threshold", "normaliser", "max_chars",
                           "vocab", "max_tokens") if k not in meta]
    if missing:
        raise ModelMetadataError(f"{path}: metadata_props lacks {', '.join(missing)}")
    if meta["normaliser"] != NORMALISER_VERSION or int(meta["max_chars"]) != MAX_CHARS:
        raise ModelMetadataError(
            f"{path}: trained with normaliser {meta['normaliser']} / max_chars {meta['max_chars']}, this gateway uses "
            f"{NORMALISER_VERSION} / {MAX_CHARS}; retrain with models/content/train.py")
    return meta["name"], meta["version"], float(meta["mark_threshold"]), float(meta["block_threshold"])
