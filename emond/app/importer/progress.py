"""The import's progress on stderr: a ``rich`` bar on a terminal, one plain line per step
otherwise (a log, a pipe, a test). stdout is kept for the JSON report."""

from __future__ import annotations

from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ImportProgress(Protocol):
    def start(self, total: int) -> None: ...

    def step(self, text: str) -> None:
        """One item done (a feed, or a user's inputs and account)."""

    def say(self, text: str) -> None:
        """A phase or a finding, not an item."""

    def stop(self) -> None: ...


class PlainProgress:
    """``import: [done/total] text`` lines, flushed at once (a killed import's last line is
    the last step done)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.total = 0
        self.done = 0

    def start(self, total: int) -> None:
        self.total = total

    def step(self, text: str) -> None:
        self.done += 1
        self._line(f"[{self.done}/{self.total}] {text}")

    def say(self, text: str) -> None:
        self._line(text)

    def _line(self, text: str) -> None:
        print(f"import: {text}", file=self.stream, flush=True)

    def stop(self) -> None:
        pass


class BarProgress:
    """A rich progress bar (refreshed at each step: no refresh thread)."""

    def __init__(self, stream: TextIO) -> None:
        self.console = Console(file=stream)
        self.bar = Progress(
            TextColumn("import"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
            console=self.console, auto_refresh=False, transient=False,
        )
        self.task = self.bar.add_task("", total=None)

    def start(self, total: int) -> None:
        self.bar.start()
        self.bar.update(self.task, total=total)
        self.bar.refresh()

    def step(self, text: str) -> None:
        self.bar.update(self.task, advance=1, description=text)
        self.bar.refresh()

    def say(self, text: str) -> None:
        self.console.print(f"import: {text}", highlight=False)

    def stop(self) -> None:
        self.bar.refresh()
        self.bar.stop()


def progress_for(stream: TextIO) -> ImportProgress:
    return BarProgress(stream) if stream.isatty() else PlainProgress(stream)
