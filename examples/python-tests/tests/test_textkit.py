import pytest

from textkit import slugify, truncate, word_count


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, World!", "hello-world"),
        ("  spaces   everywhere  ", "spaces-everywhere"),
        ("Crème brûlée", "creme-brulee"),
        ("v2 release", "v2-release"),
        ("!!!", ""),
    ],
)
def test_slugify(text, expected):
    assert slugify(text) == expected


def test_slugify_custom_separator():
    assert slugify("a b c", sep="_") == "a_b_c"


def test_word_count(paragraph):
    assert word_count(paragraph) == 12


def test_word_count_empty():
    assert word_count("") == 0
    assert word_count(" -- ") == 0


def test_truncate_keeps_short_text(paragraph):
    assert truncate(paragraph, 100) == paragraph


def test_truncate_cuts_long_text(paragraph):
    cut = truncate(paragraph, 14)
    assert cut == "Don't panic..."
    assert len(cut) <= 14


def test_truncate_refuses_tiny_width():
    with pytest.raises(ValueError, match="shorter than the placeholder"):
        truncate("hello", 2)
