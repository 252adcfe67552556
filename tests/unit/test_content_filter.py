"""The gateway's content filter, run against the real committed model (models/content/content.onnx).

The sample sentences below were written for these tests; none is taken from the training data. Short, casual
greetings can score near the mark threshold (see the spot checks in models/content/MODEL_CARD.md); the clean
sentences here are plainly neutral ones. The tokenizer itself is specified in test_wordpiece.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.event import Verdict
from gateway.filters.content import (
    BLOCKED,
    CLEAN,
    MAX_CHARS,
    SENSITIVE,
    TOKENS_PER_RUN,
    ContentClassifier,
    ModelMetadataError,
    normalise,
)
from tests.recording_session import RecordingSession

MODEL = Path(__file__).resolve().parents[2] / "models" / "content" / "content.onnx"

OFFENSIVE = [
    "shut up you fucking moron",
    "you are a worthless stupid idiot and everyone hates you",
    "go kill yourself you piece of shit",
    "what a dumb bitch, nobody cares about your crap",
    "f*ck you asshole",
]
CLEAN_TEXTS = [
    "The weather is lovely today, we are going for a walk in the park.",
    "Thanks for the update, the sensor readings look normal again.",
    "Could you send me the meeting notes before tomorrow afternoon?",
    "Our new greenhouse humidity controller arrived this morning.",
    "The quarterly report shows energy use down by twelve percent.",
]
HOSTILE = [
    "",
    " ",
    "\x00",
    "abc\x00def\x00",
    "x" * 1_000_000,
    "😀🔥💯 👨\u200d👩\u200d👧 🏳️\u200d🌈",
    "שלום, מה שלומך היום?",
    "مرحبا كيف حالك",
    "\u202eevil\u202c text with bidi overrides",
    "\ud800 lone surrogate \udfff",
    "\x1b[31mred\x1b[0m \x07\x08\x7f",
    "&#0; &#xD800; &#x110000; &amp;amp; &",
    "\r\n\t\v\f\x1c\x85\u2028\u2029",
    "ﬁ İ ǅ ß \u0301\u0301\u0301",
    "中文字符测试 日本語のテキスト 한국어",
    "\ue011\ufffd private use and replacement characters",
    "a" * 5000,
    "supercalifragilistic" * 10 + " " + "#" * 300,
]


@pytest.fixture(scope="module")
def classifier() -> ContentClassifier:
    return ContentClassifier(MODEL)


@pytest.fixture(scope="module")
def meta() -> dict[str, str]:
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def test_the_verdict_names_the_model_and_version_from_the_metadata(classifier, meta):
    assert meta["name"] == "sensitive-content"
    assert meta["version"] == "2.1.0"
    (v,) = classifier.score(["hello there"])
    assert isinstance(v, Verdict)
    assert (v.model, v.version) == (meta["name"], meta["version"])
    assert classifier.mark_threshold == float(meta["mark_threshold"])
    assert classifier.block_threshold == float(meta["block_threshold"])
    assert 0 < classifier.mark_threshold < classifier.block_threshold < 1


@pytest.mark.parametrize("text", OFFENSIVE)
def test_clearly_offensive_texts_are_marked_or_blocked(classifier, text):
    (v,) = classifier.score([text])
    assert v.label in (SENSITIVE, BLOCKED), v
    assert v.flagged
    assert v.score >= classifier.mark_threshold


@pytest.mark.parametrize("text", CLEAN_TEXTS)
def test_clearly_clean_texts_are_clean(classifier, text):
    (v,) = classifier.score([text])
    assert v.label == CLEAN, v
    assert not v.flagged
    assert v.score < classifier.mark_threshold


def test_the_strongest_insults_are_blocked(classifier):
    verdicts = classifier.score(OFFENSIVE)
    assert sum(v.label == BLOCKED for v in verdicts) >= 3, verdicts


def test_a_micro_batch_is_one_run_unless_its_ids_exceed_the_budget():
    clf = ContentClassifier(MODEL)
    recorder = RecordingSession(clf.session)
    clf.session = recorder
    posts = OFFENSIVE + CLEAN_TEXTS + HOSTILE
    clf.score(posts)
    assert recorder.runs == 1

    # Long posts: the ids of one run stay within the budget, so memory does not grow with the batch.
    long_posts = ["word " * 1000] * 40
    verdicts = clf.score(long_posts)
    assert len(verdicts) == len(long_posts)
    runs = recorder.feeds[1:]
    assert len(runs) > 1
    assert all(len(ids) <= TOKENS_PER_RUN for ids in runs)
    assert sum(len(ids) for ids in runs) == len(long_posts) * clf.max_tokens

    before = recorder.runs
    assert clf.score([]) == []
    assert recorder.runs == before  # nothing to score, nothing run


def test_offensive_texts_rank_above_every_clean_one(classifier):
    offensive = [v.score for v in classifier.score(OFFENSIVE)]
    clean = [v.score for v in classifier.score(CLEAN_TEXTS)]
    assert min(offensive) > max(clean), (offensive, clean)


def test_a_text_scores_the_same_alone_and_in_any_batch(classifier):
    # Guards the flat batch: each id must be added to its own text's row, and empty texts must not shift the rows.
    texts = OFFENSIVE + ["", "\x00"] + CLEAN_TEXTS + ["#", "## #hashtag", "a", "x" * 3000, "😀"]
    together = [v.score for v in classifier.score(texts)]
    alone = [classifier.score([t])[0].score for t in texts]
    assert np.allclose(together, alone, atol=1e-6)


def test_an_insult_is_not_diluted_away_by_a_neutral_sentence_before_it(classifier):
    # Word-piece scores are averaged, so a long enough neutral text does hide an insult (see the model card's
    # limits); one sentence must not.
    for clean in CLEAN_TEXTS:
        (v,) = classifier.score([f"{clean} {OFFENSIVE[0]}"])
        assert v.flagged, (clean, v)


def test_labels_follow_the_thresholds(classifier):
    for v in classifier.score(OFFENSIVE + CLEAN_TEXTS):
        expected = (BLOCKED if v.score >= classifier.block_threshold
                    else SENSITIVE if v.score >= classifier.mark_threshold else CLEAN)
        assert v.label == expected
        assert v.flagged == (v.label != CLEAN)
        assert 0.0 <= v.score <= 1.0


def test_hostile_inputs_never_raise_and_give_one_verdict_each(classifier):
    verdicts = classifier.score(HOSTILE)
    assert len(verdicts) == len(HOSTILE)
    for v in verdicts:
        assert v.label in (CLEAN, SENSITIVE, BLOCKED)
        assert 0.0 <= v.score <= 1.0
    for text in HOSTILE:  # alone too: a batch of one empty string is its own edge case
        classifier.score([text])


def test_non_string_items_are_scored_not_raised_on(classifier):
    verdicts = classifier.score([None, b"caf\xc3\xa9 \xff\xfe", 12345, "ok"])  # type: ignore[list-item]
    assert len(verdicts) == 4


def test_a_megabyte_post_is_cut_to_max_chars(classifier):
    head = "you are a stupid idiot " * 100
    long_text = head + "lovely weather " * 70_000  # about 1 MB
    assert len(normalise(long_text)) <= MAX_CHARS
    (v_long,) = classifier.score([long_text])
    (v_cut,) = classifier.score([long_text[:MAX_CHARS]])
    assert v_long.score == pytest.approx(v_cut.score, abs=1e-6)


def test_thresholds_from_the_constructor_override_the_metadata(meta):
    text = CLEAN_TEXTS[0]
    default = ContentClassifier(MODEL)
    (v,) = default.score([text])
    assert v.label == CLEAN

    # Verdict scores are rounded to 6 digits, so the thresholds keep a margin below the score.
    strict = ContentClassifier(MODEL, mark_threshold=v.score / 2, block_threshold=v.score * 0.99)
    assert strict.mark_threshold != float(meta["mark_threshold"])
    assert strict.score([text])[0].label == BLOCKED

    marking = ContentClassifier(MODEL, mark_threshold=v.score / 2, block_threshold=0.999)
    assert marking.score([text])[0].label == SENSITIVE

    lenient = ContentClassifier(MODEL, mark_threshold=1.0, block_threshold=1.0)
    assert all(x.label == CLEAN for x in lenient.score(OFFENSIVE) if x.score < 1.0)

    only_mark = ContentClassifier(MODEL, mark_threshold=0.05)
    assert only_mark.block_threshold == float(meta["block_threshold"])


@pytest.mark.parametrize("kwargs", [
    {"mark_threshold": 0.0},
    {"block_threshold": 1.5},
    {"mark_threshold": float("nan")},
    {"mark_threshold": 0.9, "block_threshold": 0.5},
])
def test_bad_thresholds_are_refused(kwargs):
    with pytest.raises(ValueError):
        ContentClassifier(MODEL, **kwargs)


def test_a_model_without_the_metadata_is_refused(tmp_path):
    import onnx

    model = onnx.load(str(MODEL))
    del model.metadata_props[:]
    path = tmp_path / "bare.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelMetadataError):
        ContentClassifier(path)


def test_a_model_whose_vocabulary_lacks_the_unknown_token_is_refused_at_load(tmp_path):
    import onnx

    model = onnx.load(str(MODEL))
    for prop in model.metadata_props:
        if prop.key == "vocab":
            prop.value = "\n".join(t for t in prop.value.split("\n") if t != "[UNK]")
    path = tmp_path / "no-unk.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelMetadataError, match="UNK"):
        ContentClassifier(path)


def test_the_vocabulary_is_built_on_the_first_post_not_at_load():
    """A gateway that carries only telemetry never holds it (a dict of 30,522 entries)."""
    classifier = ContentClassifier(MODEL)
    assert classifier._tokenizer is None
    first = classifier.score(["have a nice day"])
    assert classifier._tokenizer is not None
    assert classifier.score(["have a nice day"]) == first


@pytest.mark.parametrize(("raw", "expected"), [
    ("Tom &amp; Jerry", "tom & jerry"),
    ("RT @some_one: LOOK http://t.co/abc www.example.org", "xxuser : look xxurl xxurl"),
    ("from 192.168.0.1 (talk)", "from xxip (talk)"),
    ("f\u200bu\u200bn \u202ehi\u202c", "fun hi"),
    ("  many\n\n\tlines \r\n here ", "many lines here"),
    ("a\x00b", "ab"),
    ("\ud800", ""),
])
def test_normalise(raw, expected):
    assert normalise(raw) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=300))
def test_normalise_is_total_and_leaves_what_the_tokenizers_agree_on(text):
    out = normalise(text)
    assert len(out) <= MAX_CHARS
    assert "\n" not in out and "  " not in out and out == out.strip()
    out.encode("utf-8")  # no lone surrogates reach onnxruntime


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(), max_size=200), max_size=8))
def test_score_never_raises_on_any_unicode(classifier, texts):
    verdicts = classifier.score(texts)
    assert len(verdicts) == len(texts)


# Identity statements without insults, and the same statements with the identity word taken out.
IDENTITY_PAIRS = [
    ("I am a gay man and proud of my family.", "I am a man and proud of my family."),
    ("My muslim neighbours invited us for dinner.", "My neighbours invited us for dinner."),
    ("Black women in tech meetup tonight", "Women in tech meetup tonight"),
    ("The jewish community centre opens a new library on Sunday.",
     "The community centre opens a new library on Sunday."),
    ("Mexican immigrants opened a bakery on our street.", "Newcomers opened a bakery on our street."),
    ("She is a lesbian and a wonderful teacher.", "She is a wonderful teacher."),
    ("Two christian and two jewish students won the science prize.", "Four students won the science prize."),
]
SEVERITY = {CLEAN: 0, SENSITIVE: 1, BLOCKED: 2}


@pytest.mark.parametrize(("identity", "plain"), IDENTITY_PAIRS)
def test_an_identity_word_never_makes_a_statement_harsher_than_it_is_without_it(classifier, identity, plain):
    # Before 2.1.0 "gay" alone turned the first statement from sensitive into blocked (0.998).
    with_word, without = classifier.score([identity, plain])
    assert SEVERITY[with_word.label] <= SEVERITY[without.label], (with_word, without)
    assert with_word.label != BLOCKED, with_word


@pytest.mark.parametrize("text", [p[0] for p in IDENTITY_PAIRS if p[0] != IDENTITY_PAIRS[0][0]])
def test_identity_statements_without_insults_are_clean(classifier, text):
    # The first pair is left out: its other words ("proud", "family") already mark it (see the model card).
    (v,) = classifier.score([text])
    assert v.label == CLEAN, v


def test_a_hateful_sentence_with_a_slur_is_still_flagged(classifier):
    (v,) = classifier.score(["all those dirty faggots should be run out of town"])
    assert v.flagged, v
    assert v.label == BLOCKED, v


@pytest.mark.parametrize("text", [
    "I hate mondays",
    pytest.param("this is a stupid idea", marks=pytest.mark.xfail(
        strict=True, reason="a bag of word pieces scores 'stupid' the same aimed at an idea or at a person")),
    "ugh, the train is late again",
])
def test_mild_complaints_are_at_most_sensitive(classifier, text):
    (v,) = classifier.score([text])
    assert v.label != BLOCKED, v
