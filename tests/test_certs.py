"""etc/make-certs makes a CA and node certificates that TLS can use."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptography import x509
from OpenSSL import crypto
from twisted.internet.error import VerifyError
from twisted.internet.ssl import PrivateCertificate
from twisted.trial import unittest

from tests.support import require_program

SCRIPT = Path(__file__).resolve().parent.parent / "etc" / "make-certs"
NAMES = ("a", "b")


class MakeCertsTests(unittest.TestCase):
    def setUp(self) -> None:
        require_program("openssl")  # an error, not a skip, when missing
        self.dir = Path(tempfile.mkdtemp(prefix="emond-certs-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.make()

    def make(self, *options: str) -> None:
        subprocess.run([str(SCRIPT), *options, str(self.dir), *NAMES], check=True,
                       capture_output=True, timeout=60)

    def pem(self, name: str) -> bytes:
        return (self.dir / f"{name}.pem").read_bytes()

    def test_files(self) -> None:
        self.assertEqual(
            sorted(p.name for p in self.dir.iterdir()), ["a.pem", "b.pem", "ca.key", "ca.pem"]
        )
        self.assertEqual((self.dir / "a.pem").stat().st_mode & 0o077, 0)  # holds a key

    def test_verifies_against_ca(self) -> None:
        store = crypto.X509Store()
        store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, self.pem("ca")))
        for name in NAMES:
            cert = crypto.load_certificate(crypto.FILETYPE_PEM, self.pem(name))
            crypto.X509StoreContext(store, cert).verify_certificate()  # raises if not

    def test_names_and_usage(self) -> None:
        for name in NAMES:
            cert = x509.load_pem_x509_certificate(self.pem(name))
            cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            self.assertEqual([a.value for a in cn], [name])
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            self.assertEqual(san.get_values_for_type(x509.DNSName), [name])
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            self.assertEqual(
                set(eku), {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}
            )
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            self.assertFalse(bc.ca)
            years = (cert.not_valid_after_utc - cert.not_valid_before_utc).days / 365
            self.assertGreater(years, 9.9)

    def test_key_matches_cert(self) -> None:
        for name in NAMES:
            # loadPEM raises VerifyError when the key is not the certificate's.
            PrivateCertificate.loadPEM(self.pem(name))
        # The check is real: a's certificate with b's key is refused.
        a_cert = self.pem("a").split(b"-----BEGIN PRIVATE KEY-----")[0]
        b_key = self.pem("b")[self.pem("b").index(b"-----BEGIN PRIVATE KEY-----") :]
        self.assertRaises(VerifyError, PrivateCertificate.loadPEM, a_cert + b_key)

    def test_idempotent_unless_forced(self) -> None:
        before = {name: self.pem(name) for name in ("ca", *NAMES)}
        self.make()
        self.assertEqual({name: self.pem(name) for name in before}, before)
        self.make("--force")
        for name in before:
            self.assertNotEqual(self.pem(name), before[name])
