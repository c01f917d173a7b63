"""Where a table or key of a TOML file is written: its line number.

``tomllib`` keeps no positions, so a refused key is found again in the file's text: table
headers (``[input]``, dotted ``[shards.a]``), ``key = ...`` lines (dotted keys too) and the keys
of an inline table on the line that opens it (``1 = { endpoint = "...", name = "..." }``).
Good enough to point an operator at a line; never used to read values (tomllib does that).
"""

from __future__ import annotations

import re

_PART = r'(?:[A-Za-z0-9_-]+|"[^"\\]*"|\'[^\']*\')'
_DOTTED = rf"{_PART}(?:\s*\.\s*{_PART})*"
_HEADER = re.compile(rf"^\s*\[\s*({_DOTTED})\s*\]\s*(?:#.*)?$")
_KEY = re.compile(rf"^\s*({_DOTTED})\s*=")
_INLINE_KEY = re.compile(rf"[{{,]\s*({_DOTTED})\s*=")
_TRIPLE = re.compile(r'"""|\'\'\'')

Path = tuple[str, ...]


def split_dotted(name: str) -> Path:
    """``shards.a`` -> ("shards", "a"); quotes around a part are dropped."""
    return tuple(p.strip().strip("\"'") for p in re.findall(_PART, name))


class KeyLines:
    """The first line (1-based) on which each table and key path of a TOML text appears."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        table: Path = ()
        opened: str | None = None  # the delimiter of a multi-line string being skipped
        for number, line in enumerate(text.splitlines(), 1):
            if opened is not None:
                if line.count(opened) % 2:
                    opened = None
                continue
            header = _HEADER.match(line)
            if header:
                table = split_dotted(header.group(1))
                self._record(table, number)
                continue
            key = _KEY.match(line)
            if key:
                path = table + split_dotted(key.group(1))
                self._record(path, number)
                rest = line[key.end():]
                if rest.lstrip().startswith("{"):
                    for inner in _INLINE_KEY.finditer(rest):
                        self._record(path + split_dotted(inner.group(1)), number)
            for delimiter in {m.group(0) for m in _TRIPLE.finditer(line)}:
                if line.count(delimiter) % 2:
                    opened = delimiter  # a multi-line string starts here: its lines hold no keys

    def _record(self, path: Path, number: int) -> None:
        for end in range(1, len(path) + 1):
            self._lines.setdefault(path[:end], number)

    def line(self, table: str | None, key: str | None = None) -> int | None:
        """The line of ``[table] key``; of its nearest enclosing table or key that is written
        when it is not (a missing key: its table's header); None when nothing of it is."""
        path = list(split_dotted(table or ""))
        if key:
            path.append(key.split("[", 1)[0])  # "storage[1]": the item of a list, on its key's line
        while path:
            found = self._lines.get(tuple(path))
            if found is not None:
                return found
            path.pop()
        return None
