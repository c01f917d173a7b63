"""Passes run as array operations (emond.process.plans) against the general path, value by value.

The general path is the consumer's reference behaviour (as tests/test_runner.py
runs it): for each value in order, the input's last value is set, then its list
runs through ``run_steps``. A pass the array path accepts must leave exactly the
same state — last values, dirty sets — and commit exactly the same storage
batches (bytes); a pass it declines must leave the state untouched. No Redis:
pure functions over many random passes (seeded, so deterministic).
"""

from __future__ import annotations

import copy
import random
import zoneinfo

from twisted.trial import unittest

from emond.inputparse import POSITIONS, frame_node, frame_values
from emond.meta.feeds import Feed
from emond.meta.inputs import Input
from emond.processlist import Step
from emond.process.functions import ProcessState, StepRun, run_steps
from emond.process.plans import EMPTY_PLAN, chunks, gather, make_plan, reads, run_columns
from emond.process.state import to_commit
from emond.queue import Commit
from emond.records import ENGINE_PHPFINA, ENGINE_PHPTIMESERIES

UTC = zoneinfo.ZoneInfo("UTC")
T0 = 1705276800
ARRAY_STEPS = (1, 1, 1, 2, 3, 9, 13, 24, 25, 26, 33)  # log_to_feed most often
OTHER_STEPS = (4, 6, 14, 29)  # stateful or reading other values: the general path only


class User:
    """A user's inputs, feeds, lists and plans, as ``consumer.UserCache`` holds them."""

    def __init__(self, userid: int, feeds: list[Feed], lists: dict[tuple[str, str], list[Step]], first_input: int) -> None:
        self.feeds = {f.id: f for f in feeds}
        self.inputs = {}
        self.steps = {}
        for n, ((node, name), steps) in enumerate(sorted(lists.items())):
            inp = Input(first_input + n, userid, node, name, "", "")
            self.inputs[(node, name)] = inp
            if steps:
                self.steps[inp.id] = steps
        self.plans = {i: make_plan(s, self.feeds) for i, s in self.steps.items()}


def general(state: ProcessState, groups: list[list], users: dict[int, User]) -> None:
    """The consumer's general path over a pass (inputs exist)."""
    for userid, _received, time_ref, frames in groups:
        user = users[userid]
        for frame in frames:
            when = time_ref + frame[0]
            node = frame_node(frame)
            for name, value in frame_values(frame):
                inp = user.inputs[(node, name)]
                state.set_input(inp.id, when, value)
                steps = user.steps.get(inp.id)
                if steps:
                    run_steps(steps, StepRun(state, user.feeds, UTC, inp.id, when), value)


def committed(state: ProcessState) -> tuple[list, list]:
    """The commit's state writes and its storage batches, byte for byte, in any order: each
    names its own key, and a commit has one batch per storage queue."""
    commit = Commit()
    to_commit(state, commit)
    writes, batches = [], []
    ops = commit.ops
    while ops:
        name, n = ops[0], ops[1]
        command, ops = ops[: 2 + n], ops[2 + n :]
        (batches if name == "XADDSEQ" else writes).append(tuple(map(str, command)))
    return sorted(writes), sorted(batches)


def snapshot(state: ProcessState) -> tuple:
    return copy.deepcopy((state.inputs, state.feeds, state.dirty_inputs, state.dirty_feeds, state.day_only, state.refused,
                          state.steps, state.dirty_steps))


class RandomPasses:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def users(self, stateful: bool) -> dict[int, User]:
        rng = self.rng
        users = {}
        feedid = 1
        inputid = 1
        for userid in (7, 8):
            feeds = []
            for _ in range(rng.randint(1, 6)):
                engine = rng.choice((ENGINE_PHPFINA, ENGINE_PHPTIMESERIES))
                feeds.append(Feed(feedid, userid, f"f{feedid}", "", 1, 0, engine, rng.choice((0, 0, 1)), 10, ""))
                feedid += 1
            ids = [f.id for f in feeds] + [999]  # 999: not the user's (deleted)
            lists = {}
            for node in ("10", "emontx", "5"):
                for name in POSITIONS[1:rng.randint(2, 8)]:
                    steps = []
                    for _ in range(rng.choice((0, 1, 1, 2, 3, 5))):
                        process = rng.choice(ARRAY_STEPS + (OTHER_STEPS if stateful and rng.random() < 0.2 else ()))
                        if process in (1, 4, 14, 29):
                            arg = rng.choice(ids)
                        elif process == 6:
                            arg = 1
                        elif process in (2, 3):
                            arg = rng.choice((0.5, -2.0, 10.0, 0.1, 1e30))
                        else:
                            arg = 0
                        steps.append(Step(process, arg))
                    lists[(node, name)] = steps
            users[userid] = User(userid, feeds, lists, inputid)
            inputid += len(lists)
        return users

    def groups(self, users: dict[int, User], named: bool) -> list[list]:
        rng = self.rng
        groups = []
        for _ in range(rng.randint(1, 6)):
            userid = rng.choice(list(users))
            user = users[userid]
            widths = {}
            for node, name in user.inputs:
                widths[node] = max(widths.get(node, 0), int(name))
            frames = []
            for _ in range(rng.randint(0, 8)):
                node = rng.choice(list(widths))
                width = rng.randint(1, widths[node])
                offset = rng.choice((0, 10, 10, 20, -10, 30))
                values = [rng.choice((0, 1, -1, 2.5, -0.0, 230.25, 65535, 1e14, -3)) for _ in range(width)]
                if named and rng.random() < 0.3:
                    frames.append([offset, node, {str(i + 1): float(v) for i, v in enumerate(values)}])
                else:
                    frames.append([offset, int(node) if node.isdigit() and rng.random() < 0.5 else node, *values])
            groups.append([userid, 0.0, T0 + rng.choice((0, 0, 100, -50)), frames])
        return groups


class ArrayPassTests(unittest.TestCase):
    def check(self, seed: int, stateful: bool, named: bool) -> str:
        passes = RandomPasses(seed)
        users = passes.users(stateful)
        state_a, state_b = ProcessState(), ProcessState()
        outcome = []
        for _ in range(4):  # several passes on one tenure's state
            groups = passes.groups(users, named)
            columns = gather(groups, users)
            before = snapshot(state_a)
            done = columns is not None and run_columns(state_a, columns)
            if not done:
                self.assertEqual(snapshot(state_a), before, "a declined pass changed the state")
                self.assertEqual(state_a.arrays, {})
                general(state_a, groups, users)
            general(state_b, groups, users)
            self.assertEqual(snapshot(state_a), snapshot(state_b))
            self.assertEqual(committed(state_a), committed(state_b))
            state_a.clear_changes()
            state_b.clear_changes()
            outcome.append("array" if done else "general")
        return " ".join(outcome)

    def test_array_passes_equal_the_general_path(self):
        kinds = {"array": 0, "general": 0}
        for seed in range(400):
            for kind in self.check(seed, stateful=False, named=False).split():
                kinds[kind] += 1
        # most passes run as arrays; those a step refuses (a scale to infinity) decline
        self.assertGreater(kinds["array"], 1000)
        self.assertGreater(kinds["general"], 10)

    def test_passes_with_stateful_lists_or_named_values_decline_or_agree(self):
        for seed in range(400):
            self.check(1000 + seed, stateful=True, named=True)

    def test_passes_in_chunks_equal_the_general_path(self):
        # as the consumer runs a pass: chunk by chunk as arrays, from the first chunk that
        # declines on value by value; the frames in order, cut anywhere
        for seed in range(300):
            passes = RandomPasses(2000 + seed)
            users = passes.users(stateful=seed % 3 == 0)
            state_a, state_b = ProcessState(), ProcessState()
            for _ in range(3):
                groups = passes.groups(users, named=seed % 5 == 0)
                limit = passes.rng.choice((1, 5, 17, 1000))
                parts = list(chunks(groups, limit))
                # every frame once, in order, under its own group's header
                self.assertEqual([(*g[:3], id(f)) for part in parts for g in part for f in g[3]],
                                 [(*g[:3], id(f)) for g in groups for f in g[3]])
                for n, chunk in enumerate(parts):
                    columns = gather(chunk, users)
                    if columns is None or not run_columns(state_a, columns):
                        general(state_a, [g for part in parts[n:] for g in part], users)
                        break
                general(state_b, groups, users)
                self.assertEqual(snapshot(state_a), snapshot(state_b))
                self.assertEqual(committed(state_a), committed(state_b))
                state_a.clear_changes()
                state_b.clear_changes()

    def test_what_a_pass_reads(self):
        feeds = [Feed(1, 7, "a", "", 1, 0, ENGINE_PHPFINA, 0, 10, "")]
        users = {7: User(7, feeds, {("n", "1"): [Step(2, 2.0), Step(1, 1)], ("n", "2"): []}, 1)}
        columns = gather([[7, 0.0, T0, [[0, "n", 1, 2], [10, "n", 3, 4]]]], users)
        self.assertEqual(reads(columns), ({1, 2}, {1}))
        self.assertEqual(columns.packets, 2)
        # a new input (not in the user's inputs): the general path creates it
        self.assertIsNone(gather([[7, 0.0, T0, [[0, "n", 1, 2, 3]]]], users))
        # a list with a stateful step: the general path
        users[7].plans[1] = make_plan([Step(4, 1)], users[7].feeds)
        self.assertIsNone(gather([[7, 0.0, T0, [[0, "n", 1, 2]]]], users))
        self.assertIs(users[7].plans.get(2, EMPTY_PLAN), EMPTY_PLAN)

    def test_records_keep_the_order_of_the_general_path(self):
        # two inputs log to one feed, in one frame and across frames: the last accepted wins on
        # disk, so the batch must interleave them exactly as the values came
        feeds = [Feed(1, 7, "a", "", 1, 0, ENGINE_PHPFINA, 0, 10, "")]
        users = {7: User(7, feeds, {("n", "1"): [Step(1, 1)], ("n", "2"): [Step(3, 1.0), Step(1, 1)]}, 1)}
        groups = [[7, 0.0, T0, [[0, "n", 1, 2], [0, "n", 3], [10, "n", 5, 6]]]]
        state_a, state_b = ProcessState(), ProcessState()
        self.assertTrue(run_columns(state_a, gather(groups, users)))
        general(state_b, groups, users)
        self.assertEqual(committed(state_a), committed(state_b))
        self.assertEqual(state_a.feeds[1], (T0 + 10, 7.0))
