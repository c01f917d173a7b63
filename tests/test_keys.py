"""Redis key names (emond.keys): the names data already in Redis is stored under.

Each expected name is written out as it was spelled before the names moved
to one module (and, for emoncms.org's keys, as emoncms.org spells them), so a
rename that would orphan existing data fails here.
"""

from __future__ import annotations

import hashlib

from twisted.trial import unittest

from emond import keys


class KeyNameTests(unittest.TestCase):
    def test_queue_keys(self):
        self.assertEqual(
            [keys.input_stream(3), keys.storage_stream(0), keys.storage_seq(2)],
            ["emond:in:3", "emond:st:0", "emond:seq:st:2"],
        )
        self.assertEqual([keys.input_queue(3), keys.storage_queue(1)], ["in:3", "st:1"])
        self.assertEqual([keys.stream("in:3"), keys.lease("in:3"), keys.fence("st:1")], ["emond:in:3", "emond:lease:in:3", "emond:fence:st:1"])
        self.assertEqual(keys.dead_letters(keys.input_stream(5)), "emond:dead:emond:in:5")
        self.assertEqual((keys.CONSUMERS, keys.INPUT_LAYOUT), ("emond:consumers", "emond:input:layout"))

    def test_emoncms_org_state_keys(self):
        # emoncms.org's own names: a Redis carried over from it keeps its totals
        self.assertEqual(keys.input_lastvalue(7), "input:lastvalue:7")
        self.assertEqual(keys.feed_lastvalue(8), "feed:lastvalue:8")
        self.assertEqual(keys.process_state("whaccumulator", 9), "process:whaccumulator:9")

    def test_emond_state_keys(self):
        self.assertEqual(
            [keys.feed_disk(8), keys.step_times(7), keys.user_version(42)],
            ["feed:disk:8", "emond:step:7", "emond:user:ver:42"],
        )
        self.assertEqual([keys.refused_counts(4), keys.refused_last(4)], ["emond:refused:4", "emond:refused:last:4"])

    def test_account_keys_hold_digests_never_secrets(self):
        digest = hashlib.sha256(b"key").hexdigest()
        self.assertEqual(keys.apikey(digest), f"emond:apikey:{digest}".encode())
        self.assertEqual(keys.session(b"token"), b"emond:session:" + hashlib.sha256(b"token").hexdigest().encode())
        self.assertEqual(keys.session_generation(42), "emond:session:gen:42")
        self.assertEqual(keys.SESSION_GENERATION_PREFIX + "42", keys.session_generation(42))  # the session script appends the id
        who = "alice\n192.0.2.1"
        self.assertEqual(keys.login_throttle("c", who), f"emond:login:c:{hashlib.sha256(who.encode()).hexdigest()}".encode())
