"""The stream between a node and a storage server: mutual TLS, length-prefixed frames.

TLS (>= 1.2, pyOpenSSL) is applied in code from ``[tls]``: both sides trust
only the cluster CA; the server accepts a client only if a DNS
subjectAltName (or, failing that, the CN) of its certificate is on
``allow``, and the node verifies the server's name (service-identity). A
peer that fails any of this is dropped before a single frame is processed.

Every frame is a 4-byte length and a body whose first byte is its kind:

- ``H`` hello (node → server), ``h`` its answer: JSON, protocol version first; the
  answer carries the server id and the newest fencing token it has applied;
- ``B`` batch: ``<QQ`` sequence number and fencing token, then RECORDs;
- ``A`` acknowledgement: ``<Q`` sequence number, then the refusals (JSON);
- ``N`` batch not applied (stale token, disk error): ``<Q`` seq, JSON reason;
- ``R`` request: ``<I`` id, then JSON ``{"op": ..., ...}``;
- ``r`` response: ``<IB`` id and flags (final, error, binary), then a chunk.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.protocols.basic import Int32StringReceiver
from zope.interface import implementer

from emond.records import RECORD

VERSION = 1
MAX_FRAME = 64 << 20
CHUNK = 256 << 10  # large answers go out in frames of this size, so acks are never stuck behind them

HELLO, HELLO_OK = b"H", b"h"
BATCH, ACK, NACK = b"B", b"A", b"N"
REQUEST, RESPONSE = b"R", b"r"
FINAL, ERROR, BINARY = 1, 2, 4

FRAME_LENGTH = struct.Struct("!I")  # Int32StringReceiver's prefix
BATCH_HEAD = struct.Struct("<QQ")
SEQ = struct.Struct("<Q")
REQ_HEAD = struct.Struct("<I")
RESP_HEAD = struct.Struct("<IB")


MAX_CONTROL = 64 << 10  # bytes of a hello or request frame (small JSON); only batches are large


class ProtocolError(Exception):
    """A frame that breaks the protocol: the connection is closed.

    ``reason`` is one of a few fixed codes (a metrics label), ``detail`` says
    what exactly was wrong (for the log)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ReadRequest:
    op: str
    feed: int
    engine: int
    args: list[Any]


def encode_json(kind: bytes, payload: Any) -> bytes:
    return kind + json.dumps(payload, separators=(",", ":")).encode()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_object(body: bytes, reason: str) -> dict[str, Any]:
    if len(body) > MAX_CONTROL:
        raise ProtocolError(reason, f"{len(body)} bytes of JSON, more than {MAX_CONTROL}")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(reason, f"not JSON ({str(e)[:80]})")
    if not isinstance(value, dict):
        raise ProtocolError(reason, f"JSON {type(value).__name__}, not an object")
    return value


def decode_hello(frame: bytes) -> tuple[int, str]:
    """(version, node name) of a hello frame, or ProtocolError."""
    hello = _json_object(frame[1:], "hello_malformed")
    version, name = hello.get("version"), hello.get("name")
    if not _is_int(version) or not isinstance(name, str) or not name:
        raise ProtocolError("hello_malformed", "a hello needs an integer version and a name")
    return version, name


def decode_batch(frame: bytes) -> tuple[int, int, np.ndarray]:
    """(sequence number, fencing token, records) of a batch frame, or ProtocolError."""
    if len(frame) < 1 + BATCH_HEAD.size:
        raise ProtocolError("batch_short", f"{len(frame)} bytes, shorter than a batch header ({1 + BATCH_HEAD.size})")
    seq, token = BATCH_HEAD.unpack_from(frame, 1)
    size = len(frame) - 1 - BATCH_HEAD.size
    if size % RECORD.itemsize:
        raise ProtocolError("batch_record_size", f"{size} bytes of records, not a multiple of {RECORD.itemsize}")
    # A view on the frame: a batch of megabytes is not copied again.
    return seq, token, np.frombuffer(frame, dtype=RECORD, offset=1 + BATCH_HEAD.size)


def decode_request(frame: bytes) -> tuple[int, ReadRequest]:
    """(request id, request) of a request frame, or ProtocolError."""
    if len(frame) < 1 + REQ_HEAD.size:
        raise ProtocolError("request_malformed", f"{len(frame)} bytes, shorter than a request header ({1 + REQ_HEAD.size})")
    (request_id,) = REQ_HEAD.unpack_from(frame, 1)
    request = _json_object(frame[1 + REQ_HEAD.size :], "request_malformed")
    op, feed, engine, args = (request.get(k) for k in ("op", "feed", "engine", "args"))
    args = [] if args is None else args
    if not isinstance(op, str) or not _is_int(feed) or not _is_int(engine) or not isinstance(args, list) or not 0 <= feed < 1 << 32:
        raise ProtocolError("request_malformed", "a request needs a string op, integer feed and engine, a list of args")
    return request_id, ReadRequest(op, feed, engine, args)


def batch_frame(seq: int, token: int, records: bytes) -> bytes:
    return BATCH + BATCH_HEAD.pack(seq, token) + records


def batch_parts(seq: int, token: int, records: list[bytes]) -> list[bytes]:
    """A batch frame whose records are several queue entries joined, in parts
    (``FrameProtocol.send_parts`` joins them once, with the length prefix)."""
    return [BATCH + BATCH_HEAD.pack(seq, token), *records]


def ack_frame(kind: bytes, seq: int, payload: Any) -> bytes:
    return kind + SEQ.pack(seq) + json.dumps(payload, separators=(",", ":")).encode()


def request_frame(request_id: int, payload: Any) -> bytes:
    return REQUEST + REQ_HEAD.pack(request_id) + json.dumps(payload, separators=(",", ":")).encode()


def response_frame(request_id: int, flags: int, body: bytes) -> bytes:
    return RESPONSE + RESP_HEAD.pack(request_id, flags) + body


class FrameProtocol(Int32StringReceiver):
    """Length-prefixed frames with a bound on their size.

    Receiving keeps one growing buffer and an offset: Int32StringReceiver
    re-joins its whole unprocessed data on every read, which is quadratic in
    a multi-megabyte batch frame.
    """

    MAX_LENGTH = MAX_FRAME
    _frames_buffer: bytearray | None = None

    def send(self, frame: bytes) -> None:
        self.sendString(frame)

    def send_parts(self, parts: list[bytes]) -> bytes:
        """Send one frame made of ``parts``, copied once into a single write (a batch of
        megabytes); returns that write: the frame's bytes start at offset 4."""
        length = sum(len(part) for part in parts)
        data = b"".join([FRAME_LENGTH.pack(length), *parts])
        self.transport.write(data)
        return data

    def lengthLimitExceeded(self, length: int) -> None:
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._frames_buffer is None:
            self._frames_buffer = bytearray()
        buf = self._frames_buffer
        buf += data
        offset = 0
        while len(buf) - offset >= 4:
            (length,) = FRAME_LENGTH.unpack_from(buf, offset)
            if length > self.MAX_LENGTH:
                self.lengthLimitExceeded(length)
                return
            if len(buf) - offset - 4 < length:
                break
            with memoryview(buf) as view:  # one copy of the frame (a slice of buf would be two)
                frame = bytes(view[offset + 4 : offset + 4 + length])
            offset += 4 + length
            self.stringReceived(frame)
            if self.transport is None or getattr(self.transport, "disconnecting", False):
                break
        if offset:
            del buf[:offset]


# -- TLS --------------------------------------------------------------------------


def _load(ca_path: str, cert_path: str) -> tuple[ssl.Certificate, ssl.PrivateCertificate]:
    with open(ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    with open(cert_path, "rb") as f:
        own = ssl.PrivateCertificate.loadPEM(f.read())
    return ca, own


def certificate_names(cert: crypto.X509) -> list[str]:
    """The DNS subjectAltNames of a certificate, or its CN when it has none."""
    parsed = cert.to_cryptography()
    try:
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value) for a in parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return list(names)


def server_tls(ca_path: str, cert_path: str) -> ssl.CertificateOptions:
    """The storage server's side: require a client certificate from the cluster CA."""
    ca, own = _load(ca_path, cert_path)
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original,
        certificate=own.original,
        verify=True,
        caCerts=[ca.original],
        requireCertificate=True,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def client_tls(ca_path: str, cert_path: str, server_name: str) -> Any:
    """The node's side: present our certificate, trust only the cluster CA, verify the name."""
    ca, own = _load(ca_path, cert_path)
    return ssl.optionsForClientTLS(
        server_name,
        trustRoot=ca,
        clientCertificate=own,
        extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
    )


class TLSFilesError(Exception):
    """``[tls]`` files that do not make a CA, a certificate and its key (a reload keeps the
    ones loaded before)."""


def _reload(make: Any, ca_path: str, cert_path: str, *args: Any) -> Any:
    try:
        return make(ca_path, cert_path, *args)
    except Exception as e:  # OSError, OpenSSL's errors, VerifyError (a key not the certificate's) ...
        raise TLSFilesError(f"TLS files {ca_path} and {cert_path} not loaded ({e or type(e).__name__}): the ones loaded before stay in use")


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """``server_tls`` that can read its files again (SIGHUP): each handshake after ``load``
    presents the new certificate; connections made before keep theirs."""

    def __init__(self, ca_path: str, cert_path: str) -> None:
        self.load(ca_path, cert_path)

    def load(self, ca_path: str, cert_path: str) -> None:
        """Read the files; raises (keeping what was loaded before) if they are not a CA and a
        certificate with its matching key (``_load`` checks the key)."""
        self._options = _reload(server_tls, ca_path, cert_path)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self._options.serverConnectionForTLS(tlsProtocol)


@implementer(IOpenSSLClientConnectionCreator)
class ClientTLS:
    """``client_tls`` that can read its files again (SIGHUP): each connection made after
    ``load`` presents the new certificate and trusts the new CA; open ones keep theirs."""

    def __init__(self, ca_path: str, cert_path: str, server_name: str) -> None:
        self.server_name = server_name
        self.load(ca_path, cert_path)

    def load(self, ca_path: str, cert_path: str) -> None:
        """Read the files; raises (keeping what was loaded before) if they are unusable."""
        self._options = _reload(client_tls, ca_path, cert_path, self.server_name)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self._options.clientConnectionForTLS(tlsProtocol)


def peer_names(transport: Any) -> list[str]:
    cert = transport.getPeerCertificate()
    if cert is None:
        return []
    return certificate_names(cert)

