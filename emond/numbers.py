"""Numbers as emoncms reads them: PHP's ``is_numeric``, ``(int)`` and truth of a string.

ASCII digits only: Python's own float()/int() also take "١٢", "１２" and "1_000",
which emoncms refuses. The pattern uses possessive quantifiers, so matching is
linear in the length of any input (no backtracking).
"""

from __future__ import annotations

import math
import re

MAX_ID = 2**31 - 1  # the largest database id (users, inputs, feeds are INT columns)
MAX_INTEGER = 2**53  # larger whole numbers are refused: beyond it a float no longer holds every integer

# PHP 8's is_numeric: optional whitespace, a sign, digits with an optional point (or a point
# and digits), an optional exponent, optional whitespace.
PHP_NUMERIC = re.compile(r"[ \t\n\r\v\f]*+[+-]?+(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)(?:[eE][+-]?+[0-9]++)?+[ \t\n\r\v\f]*+")
_LEADING_INT = re.compile(r"[ \t\n\r\v\f]*+([+-]?+[0-9]++)")


def php_numeric(text: str | None) -> float | None:
    """The number of a string ``is_numeric`` accepts (possibly infinite: "1e999"), else None."""
    if text is None or not PHP_NUMERIC.fullmatch(text):
        return None
    return float(text)


def php_number(text: str) -> float | None:
    """The finite number of a string ``is_numeric`` accepts, else None."""
    number = php_numeric(text)
    return number if number is not None and math.isfinite(number) else None


def php_int(text: str | None, default: int = 0) -> int:
    """PHP's ``(int)`` of a string: a numeric string's value truncated, else its
    leading digits, else 0."""
    if text is None:
        return default
    number = php_numeric(text)
    if number is not None:
        if not math.isfinite(number):
            return 0
        return max(min(math.trunc(number), 2**63 - 1), -(2**63))
    match = _LEADING_INT.match(text)
    return int(match.group(1)[:19]) if match else 0


def php_truthy(text: str | None) -> bool:
    """PHP's truth of a string: all but "" and "0"."""
    return text is not None and text not in ("", "0")
