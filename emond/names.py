"""emoncms's name rules, with Unicode classes done by ``unicodedata`` (Python's ``re``
has no ``\\p{L}``)."""

from __future__ import annotations

import re
import unicodedata
from types import MappingProxyType

MAX_NODE = 16  # characters in a node name (emoncms's input table)
MAX_INPUT_NAME = 64  # characters in an input name

_ASCII_OK = MappingProxyType({extra: re.compile(r"^[A-Za-z0-9\s" + re.escape(extra) + r"]*$") for extra in ("_-:", "_-.")})


def _letter_or_number(c: str) -> bool:
    return unicodedata.category(c)[0] in "LN"


def valid_chars(text: str, extra: str) -> bool:
    """Every character is a letter, a number, white space or one of ``extra``."""
    if text.isascii():  # the common case, without a unicodedata call per character
        pattern = _ASCII_OK.get(extra)
        if pattern is not None:
            return pattern.match(text) is not None
    return all(_letter_or_number(c) or c.isspace() or c in extra for c in text)


def valid_feed_name(name: str) -> bool:
    """``[\\p{N}\\p{L}_\\s\\-:]``"""
    return valid_chars(name, "_-:")


def valid_input_name(name: str) -> bool:
    """``[\\p{N}\\p{L}_\\s\\-.]`` (node names and input names)"""
    return valid_chars(name, "_-.")
