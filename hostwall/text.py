"""Text from data (policy files, journal records, packets, the operator's arguments) made
safe to show: a terminal or the journal never gets a control character from it.

An escape sequence in an owner's name can move the cursor, retitle the terminal or
hide the rest of a line; a line break forges a record in a pipeline that reads one
record a line. Each such character is shown as a Python escape instead (``\\x1b``,
``\\n``, ``\\u202e``), so that it is visible and nothing is lost.
"""

from __future__ import annotations

import unicodedata

# Cc: C0 and C1 controls (escape, newline, tab, CSI); Cf: format characters such as the
# bidirectional overrides that reorder what is displayed; Zl/Zp: line and paragraph
# separators; Cs: lone surrogates, which is how undecodable bytes arrive.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def is_control(character: str) -> bool:
    return unicodedata.category(character) in _CONTROL_CATEGORIES


def printable(text: str) -> str:
    """text with every control character replaced by its escape; other text unchanged."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(_escape(ch) if is_control(ch) else ch for ch in text)


def _escape(character: str) -> str:
    code = ord(character)
    if character in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[character]
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
