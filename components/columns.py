"""Text columns that line up in a terminal whatever the class names are written in: a CJK character takes two
columns, a combining accent none, so `str.rjust` (which counts characters) misaligns such names."""
from __future__ import annotations

import unicodedata


def display_width(text: str) -> int:
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def right(text: str, width: int) -> str:
    """`text` right-aligned in `width` terminal columns."""
    return " " * max(0, width - display_width(text)) + text
