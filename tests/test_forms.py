"""Form bodies: emond's decoders give exactly what twisted.web's and urllib's give, with bounded work."""

from __future__ import annotations

import random
from urllib.parse import unquote_to_bytes, urlencode

from twisted.trial import unittest
from twisted.web.http import _getMultiPartArgs, parse_qs

from emond import web
from emond.inputparse import run
from emond.web import form_args, unquote_form


class FormDecodingTests(unittest.TestCase):
    def test_same_as_urllib_on_random_bytes(self) -> None:
        rnd = random.Random(20261123)
        alphabet = b"%+\\x0123456789abcdefABCDEFgz =&;\n\x00\xff"
        for _ in range(20000):
            raw = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 16)))
            self.assertEqual(unquote_form(raw), unquote_to_bytes(raw.replace(b"+", b" ")), raw)
            self.assertEqual(form_args(raw), parse_qs(raw, 1), raw)

    def test_a_bulk_body(self) -> None:
        data = '[[0,"küche",1.5,"x y"],[10,"a+b",{"t\\\\1":2}]]'
        body = urlencode({"data": data, "time": "1700000000", "apikey": "k" * 32}).encode()
        self.assertEqual(form_args(body), {b"data": [data.encode()], b"time": [b"1700000000"], b"apikey": [b"k" * 32]})
        self.assertEqual(form_args(b"a=%zz%4&b=%25%2B+&c"), {b"a": [b"%zz%4"], b"b": [b"%+ "]})


class BoundedFormDecodingTests(unittest.TestCase):
    def test_sliced_decoding_is_the_same(self) -> None:
        # slices of 7 bytes: escapes fall on every possible cut
        self.patch(web, "FORM_SLICE", 7)
        rnd = random.Random(20261202)
        alphabet = b"%+0123456789abcdefABgz =&;"
        for _ in range(20000):
            raw = bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
            self.assertEqual(run(web.unquote_steps(raw)), unquote_to_bytes(raw.replace(b"+", b" ")), raw)
            self.assertEqual(form_args(raw), parse_qs(raw, 1), raw)

    def test_limits(self) -> None:
        self.assertEqual(len(form_args(b"&".join([b"a=1"] * 1000))[b"a"]), 1000)  # PHP's max_input_vars
        with self.assertRaises(web.FormError) as raised:
            form_args(b"&".join([b"a=1"] * 1001))
        self.assertEqual((raised.exception.code, raised.exception.message), (413, "Too many form fields (more than 1000)"))
        self.assertEqual(form_args(b"a=" + b"%" * 1000), {b"a": [b"%" * 1000]})  # as urllib leaves them
        with self.assertRaises(web.FormError) as raised:
            form_args(b"a=" + b"%" * 1001)
        self.assertEqual(raised.exception.code, 400)


class MultipartTests(unittest.TestCase):
    """Multipart bodies: the same fields as twisted.web's email-based decoder gives."""

    def body(self, parts: list[tuple[bytes, bytes, bytes]], boundary: bytes = b"b0und4ry") -> bytes:
        out = b""
        for name, extra, content in parts:
            out += b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name + b"\"" + extra + b"\r\n\r\n" + content + b"\r\n"
        return out + b"--" + boundary + b"--\r\n"

    def test_same_as_twisted(self) -> None:
        ctype = b"multipart/form-data; boundary=b0und4ry"
        bodies = [
            self.body([(b"data", b"", b'[[0,"n",1]]'), (b"time", b"", b"1700000000")]),
            self.body([(b"csv", b"", b"1,2,3"), (b"csv", b"", b"4")]),
            self.body([(b"data", b"; filename=\"d.json\"\r\nContent-Type: application/json", b'[[0,"n",2]]\r\n')]),
            self.body([(b"k", b"", b"\x00\xff binary \r\n--b0und")]),
            self.body([(b"json", b"", b"{a:1}")], boundary=b"xyz"),
        ]
        for body in bodies:
            boundary = body[2:body.index(b"\r\n")]
            ctype = b"multipart/form-data; boundary=" + boundary
            self.assertEqual(web.multipart_args(body, ctype), dict(_getMultiPartArgs(body, ctype)), body)
        quoted = b'multipart/form-data; boundary="b0und4ry"'
        self.assertEqual(web.multipart_args(bodies[0], quoted), {b"data": [b'[[0,"n",1]]'], b"time": [b"1700000000"]})
        # a UTF-8 field name stays UTF-8 (twisted.web's decoder turns it into U+FFFD)
        self.assertEqual(web.multipart_args(self.body([("kü".encode(), b"", b"1")]), quoted), {"kü".encode(): [b"1"]})

    def test_refusals(self) -> None:
        ctype = b"multipart/form-data; boundary=b"
        for body, code in ((b"no parts at all", 400), (self.body([(b"a", b"", b"1")] * 1001, b"b"), 413)):
            with self.assertRaises(web.FormError) as raised:
                web.multipart_args(body, ctype)
            self.assertEqual(raised.exception.code, code)
        with self.assertRaises(web.FormError):
            web.multipart_args(self.body([(b"a", b"", b"1")], b"b"), b"multipart/form-data")
