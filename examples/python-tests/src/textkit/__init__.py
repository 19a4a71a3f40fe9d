"""Small text helpers: the code under test in cib's python-tests example."""

import re
import unicodedata

__all__ = ["slugify", "truncate", "word_count"]

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def slugify(text: str, sep: str = "-") -> str:
    """Lower-case ASCII words of `text` joined by `sep`: "Hello, World!" -> "hello-world"."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return sep.join(re.findall(r"[a-z0-9]+", ascii_text.lower()))


def word_count(text: str) -> int:
    """The number of words in `text`; "don't" is one word, punctuation none."""
    return len(_WORD.findall(text))


def truncate(text: str, width: int, placeholder: str = "...") -> str:
    """`text` cut to at most `width` characters, ending with `placeholder` when cut."""
    if width < len(placeholder):
        raise ValueError(f"width {width} is shorter than the placeholder {placeholder!r}")
    if len(text) <= width:
        return text
    return text[: width - len(placeholder)].rstrip() + placeholder
