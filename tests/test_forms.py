"""Form bodies: emond's decoder gives exactly what twisted.web's and urllib's give."""

from __future__ import annotations

import random
from urllib.parse import unquote_to_bytes, urlencode

from twisted.trial import unittest
from twisted.web.http import parse_qs

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
