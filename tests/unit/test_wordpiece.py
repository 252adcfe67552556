"""The gateway's WordPiece tokenizer: BERT's uncased scheme on text that normalise() has cleaned."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.filters import wordpiece
from gateway.filters.content import normalise
from gateway.filters.wordpiece import MAX_WORD_CHARS, WordPiece, words

VOCAB = ["[PAD]", "[UNK]", "un", "##aff", "##able", "aff", "##a", "##b", "a", "b", "!", ",", "cafe", "中", "文",
         "hello", "##s", "'", "t", "don"]


def ids_to_tokens(wp: WordPiece, ids: list[int]) -> list[str]:
    return [VOCAB[i] for i in ids]


def test_pieces_are_the_longest_vocabulary_match_from_the_left():
    wp = WordPiece(VOCAB)
    assert ids_to_tokens(wp, wp.encode("unaffable", 100)) == ["un", "##aff", "##able"]
    assert ids_to_tokens(wp, wp.encode("hellos", 100)) == ["hello", "##s"]
    assert ids_to_tokens(wp, wp.encode("aab", 100)) == ["a", "##a", "##b"]


def test_a_word_with_an_unmatched_part_is_one_unknown():
    wp = WordPiece(VOCAB)
    assert ids_to_tokens(wp, wp.encode("unaffablez hello", 100)) == ["[UNK]", "hello"]
    assert ids_to_tokens(wp, wp.encode("😀", 100)) == ["[UNK]"]


def test_punctuation_and_cjk_characters_are_words_of_their_own():
    assert words("don't,a!b") == ["don", "'", "t", ",", "a", "!", "b"]
    assert words("中文abc") == ["中", "文", "abc"]
    assert words("中文 abc") == ["中", "文", "abc"]
    assert words("a\u3000b\u2028c") == ["a", "b", "c"]  # Unicode spaces separate words


def test_accents_are_stripped_and_invisible_characters_dropped_as_in_uncased_bert():
    wp = WordPiece(VOCAB)
    assert ids_to_tokens(wp, wp.encode("café", 100)) == ["cafe"]
    assert words("ca\ue011fe\ufffd") == ["cafe"]


def test_a_very_long_word_is_one_unknown_without_matching_it():
    wp = WordPiece(VOCAB)
    assert ids_to_tokens(wp, wp.encode("a" * (MAX_WORD_CHARS + 1), 100)) == ["[UNK]"]
    assert len(wp.encode("a" * MAX_WORD_CHARS, 1000)) == MAX_WORD_CHARS


def test_encode_keeps_the_first_max_tokens_ids():
    wp = WordPiece(VOCAB)
    assert ids_to_tokens(wp, wp.encode("unaffable hello a", 2)) == ["un", "##aff"]
    assert wp.encode("", 5) == []
    assert wp.encode("hello", 0) == []


def test_the_word_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(wordpiece, "CACHE_WORDS", 10)
    wp = WordPiece(VOCAB)
    for i in range(100):
        wp.encode(f"word{i}", 10)
        assert len(wp._cache) <= 10
    assert ids_to_tokens(wp, wp.encode("unaffable", 10)) == ["un", "##aff", "##able"]


def test_a_vocabulary_without_the_unknown_token_is_refused():
    try:
        WordPiece(["a", "b"])
    except ValueError as e:
        assert "[UNK]" in str(e)
    else:
        raise AssertionError("accepted a vocabulary without [UNK]")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(), max_size=300), st.integers(min_value=0, max_value=50))
def test_any_normalised_text_gives_valid_ids_within_the_limit(text, limit):
    wp = WordPiece(VOCAB)
    ids = wp.encode(normalise(text), limit)
    assert len(ids) <= limit
    assert all(0 <= i < len(VOCAB) for i in ids)
