"""A test client speaking the node's side of the storage stream, frame by frame."""

from __future__ import annotations

from twisted.internet import defer

from emond.stream import FrameProtocol


class Client(FrameProtocol):
    """A test client speaking the node's side of the stream."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.waiting: list[tuple[int, defer.Deferred]] = []
        self.lost: defer.Deferred = defer.Deferred()

    def stringReceived(self, frame: bytes) -> None:
        self.frames.append(frame)
        ready = [(n, d) for n, d in self.waiting if len(self.frames) >= n]
        self.waiting = [(n, d) for n, d in self.waiting if len(self.frames) < n]
        for _, d in ready:
            d.callback(self.frames[-1])

    def frame(self, n: int) -> defer.Deferred:
        """The n-th frame received (1-based), once it is here."""
        if len(self.frames) >= n:
            return defer.succeed(self.frames[n - 1])
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((n, d))
        return d

    def connectionLost(self, reason=None) -> None:
        for _, d in self.waiting:
            d.errback(ConnectionError("lost"))
        self.waiting = []
        self.lost.callback(None)
