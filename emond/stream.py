"""The stream between a node and a storage server: mutual TLS, length-prefixed frames.

TLS (>= 1.2, pyOpenSSL) is applied in code from ``[tls]``: both sides trust
only the cluster CA; the server accepts a client only if a DNS
subjectAltName (or, failing that, the CN) of its certificate is on
``allow``, and the node verifies the server's name (service-identity). A
peer that fails any of this is dropped before a single frame is processed.

Every frame is a 4-byte length and a body whose first byte is its kind:

- ``H`` hello (node → server), ``h`` its answer: JSON, protocol version first;
- ``B`` batch: ``<QQ`` sequence number and fencing token, then RECORDs;
- ``A`` acknowledgement: ``<Q`` sequence number, then the refusals (JSON);
- ``N`` batch not applied (stale token, disk error): ``<Q`` seq, JSON reason;
- ``R`` request: ``<I`` id, then JSON ``{"op": ..., ...}``;
- ``r`` response: ``<IB`` id and flags (final, error, binary), then a chunk.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.protocols.basic import Int32StringReceiver

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


class ProtocolError(Exception):
    pass


def encode_json(kind: bytes, payload: Any) -> bytes:
    return kind + json.dumps(payload, separators=(",", ":")).encode()


def batch_frame(seq: int, token: int, records: bytes) -> bytes:
    return BATCH + BATCH_HEAD.pack(seq, token) + records


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
            frame = bytes(buf[offset + 4 : offset + 4 + length])
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


def peer_names(transport: Any) -> list[str]:
    cert = transport.getPeerCertificate()
    if cert is None:
        return []
    return certificate_names(cert)

