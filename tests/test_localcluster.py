"""``bin/cluster up DIR`` / ``down DIR`` (issue 12 item 9), run as a user runs them: real
MariaDB, a central and one Redis per shard, shard processes, storage servers, fronts and
HAProxy, each "machine" on its own loopback address; ``down`` leaves nothing running.

(That a post lands on its owner's shard is the routing tests' to show.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.trial import unittest

from emond.app.localcluster import ClusterError, Layout, LocalCluster
from emond.config import load_node_config, load_storage_config
from tests.support.cluster import alive, fetch, run_cluster
from tests.support.daemon import ROOT
from tests.support.poll import until


def argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


class LocalClusterTests(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        # Short: MariaDB's Unix socket lives under DIR.
        self.dir = tempfile.mkdtemp(prefix="emond-cluster-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    @defer.inlineCallbacks
    def up(self):
        code, out, err = yield run_cluster("up", self.dir)
        self.assertEqual(code, 0, err)
        self.addCleanup(run_cluster, "down", self.dir)  # if the test fails before its own down
        lines = out.splitlines()
        self.assertEqual(len(lines), 1, out)  # one JSON line, nothing else on stdout
        return json.loads(lines[0])

    def pids(self, cluster) -> dict[str, int]:
        found = {"mariadb": cluster["database"]["pid"], "redis": cluster["redis"]["pid"], "haproxy": cluster["haproxy_pid"]}
        found.update({f"front{i + 1}": pid for i, pid in enumerate(cluster["front_pids"])})
        for name, shard in cluster["shards"].items():
            for part in ("redis", "shard", "storage"):
                found[f"{part}-{name}"] = shard[f"{part}_pid"]
        return found

    def addresses(self, cluster) -> list[tuple[str, int]]:
        urls = [cluster["entry"], *cluster["fronts"], cluster["database"]["url"], cluster["redis"]["url"]]
        for shard in cluster["shards"].values():
            urls += [shard["redis"], shard["shard_url"], shard["storage_url"]]
        return [(urlsplit(url).hostname, urlsplit(url).port) for url in urls]

    @defer.inlineCallbacks
    def test_up_serves_and_down_stops_everything(self):
        cluster = yield self.up()
        self.assertLessEqual({"entry", "fronts", "admin", "shards"}, set(cluster))
        self.assertEqual(len(cluster["fronts"]), 2)
        self.assertEqual(set(cluster["shards"]), {"a", "b"})

        # Every process is alive and is what its name says.
        pids = self.pids(cluster)
        self.assertEqual(len(set(pids.values())), 11)
        for name, pid in pids.items():
            self.assertTrue(alive(pid), name)
        self.assertIn("mariadbd", argv(pids["mariadb"])[0])
        self.assertIn("haproxy", argv(pids["haproxy"])[0])
        for name in ("a", "b"):
            self.assertIn("redis-server", argv(pids[f"redis-{name}"])[0])
            shard_argv, storage_argv = argv(pids[f"shard-{name}"]), argv(pids[f"storage-{name}"])
            self.assertIn("emond", shard_argv)
            self.assertIn("emond-storage", storage_argv)
            shard = load_node_config(shard_argv[shard_argv.index("--config") + 1])
            self.assertEqual((shard.node.front, shard.node.shard, shard.input.consume), (False, name, True))
            storage = load_storage_config(storage_argv[storage_argv.index("--config") + 1])
            self.assertEqual(list(shard.shards[name].storage), [storage.storage.id])
            self.assertEqual(cluster["shards"][name]["storage"], [storage.storage.id])
        for i in (1, 2):
            front_argv = argv(pids[f"front{i}"])
            front = load_node_config(front_argv[front_argv.index("--config") + 1])
            self.assertEqual((front.node.front, front.node.shard, front.input.consume), (True, "", False))
            self.assertEqual(set(front.shards), {"a", "b"})
            self.assertEqual(front.database.url, cluster["database"]["url"])

        # Each "machine" on a loopback address of its own, none on 127.0.0.1.
        entry_host = urlsplit(cluster["entry"]).hostname
        front_hosts = [urlsplit(url).hostname for url in cluster["fronts"]]
        shard_hosts = [urlsplit(shard["redis"]).hostname for shard in cluster["shards"].values()]
        database_host = urlsplit(cluster["database"]["url"]).hostname
        hosts = [entry_host, *front_hosts, *shard_hosts, database_host]
        self.assertEqual(len(set(hosts)), 6, hosts)
        for host in hosts:
            self.assertTrue(host.startswith("127.") and host != "127.0.0.1", host)

        # emond-admin's argv and config.
        admin = cluster["admin"]
        self.assertEqual(admin[:2], [os.path.join(ROOT, "bin", "emond-admin"), "--config"])
        self.assertEqual(set(load_node_config(admin[2]).shards), {"a", "b"})

        # The entry answers; a second up refuses and leaves the cluster as it is.
        answer = yield fetch("GET", cluster["entry"] + "health")
        self.assertEqual((answer.code, answer.json()["status"]), (200, "ok"), answer)
        code, out, err = yield run_cluster("up", self.dir)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("a cluster is already up in", json.loads(err.splitlines()[-1])["error"])
        for name, pid in pids.items():
            self.assertTrue(alive(pid), name)

        # A user registered through the entry posts through it, and through either front.
        answer = yield fetch("POST", cluster["entry"] + "user/register.json", data={"username": "alice", "password": "secret1", "email": "a@example.org"})
        self.assertEqual(answer.code, 200, answer)
        key = answer.json()["apikey_write"]
        for base in (cluster["entry"], *cluster["fronts"]):
            answer = yield fetch("GET", base + "input/post.json", params={"node": "emontx", "json": '{"power":100}', "apikey": key})
            self.assertEqual((answer.code, answer.body), (200, b"ok"), (base, answer))

        # restart: a process killed starts again with the argv up gave it; one still running
        # is stopped first; the record follows, so down stops the new ones.
        storage_argv = argv(pids["storage-a"])
        os.kill(pids["storage-a"], signal.SIGKILL)
        yield defer.ensureDeferred(until(lambda: not alive(pids["storage-a"]), 10, "storage-a gone"))
        for name, was_running in (("storage-a", False), ("front1", True)):
            before = argv(pids[name]) if was_running else storage_argv
            code, out, err = yield run_cluster("restart", self.dir, name)
            self.assertEqual(code, 0, err)
            restarted = json.loads(out)
            self.assertEqual((restarted["name"], restarted["was"], restarted["was_running"]), (name, pids[name], was_running))
            self.assertFalse(alive(pids[name]))
            pids[name] = restarted["pid"]
            self.assertTrue(alive(pids[name]))
            self.assertEqual(argv(pids[name]), before)
            with open(os.path.join(self.dir, "run", f"{name}.pid")) as f:
                self.assertEqual(int(f.read()), pids[name])
        answer = yield fetch("GET", cluster["shards"]["a"]["storage_url"] + "health")
        self.assertEqual(answer.code, 200, answer)
        answer = yield fetch("GET", cluster["fronts"][0] + "input/post.json", params={"node": "emontx", "json": '{"power":100}', "apikey": key})
        self.assertEqual((answer.code, answer.body), (200, b"ok"), answer)
        code, out, err = yield run_cluster("restart", self.dir, "nothing")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no process 'nothing'", json.loads(err.splitlines()[-1])["error"])

        code, out, err = yield run_cluster("down", self.dir)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["stopped"], pids)
        for name, pid in pids.items():
            self.assertFalse(alive(pid), name)
        for host, port in self.addresses(cluster):
            self.assertFalse(listening(host, port), (host, port))
        self.assertEqual(os.listdir(os.path.join(self.dir, "run")), [])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "cluster.json")))

        # Its ports are kept for the next up: one taken by another program is refused
        # before anything starts (and nothing is left that would block the next up).
        host, port = urlsplit(cluster["entry"]).hostname, urlsplit(cluster["entry"]).port
        squatter = socket.socket()
        self.addCleanup(squatter.close)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((host, port))
        squatter.listen()
        code, out, err = yield run_cluster("up", self.dir)
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"port {port} on {host} is taken", json.loads(err.splitlines()[-1])["error"])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "cluster.json")))

    @defer.inlineCallbacks
    def test_down_without_a_cluster_is_refused(self):
        code, out, err = yield run_cluster("down", self.dir)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(json.loads(err.splitlines()[-1]), {"error": f"no cluster is up in {self.dir} (no {self.dir}/cluster.json)"})


class ShardCountTests(unittest.TestCase):
    """``bin/cluster up --shards N`` (bench/cluster.py runs 1 to 8): the files ``up`` writes,
    read back as the processes read them; no process is started."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="emond-cluster-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, cluster: LocalCluster) -> Layout:
        layout = cluster._layout()
        cluster._write_files(layout)
        return layout

    def test_three_shards_each_on_its_machine_with_its_storage_server(self):
        cluster = LocalCluster(self.dir, shards=3, settings={"input": {"rate_limit": 0.0}, "users": {"registrations_per_address": 500}})
        layout = self.write(cluster)
        self.assertEqual(list(layout.shards), ["a", "b", "c"])
        shard_c = load_node_config(cluster.path("shard-c", "emond.toml"))
        front = load_node_config(cluster.path("front1", "emond.toml"))
        for config in (shard_c, front):
            self.assertEqual({name: list(s.storage) for name, s in config.shards.items()}, {"a": [1], "b": [2], "c": [3]})
            self.assertEqual(urlsplit(config.shards["c"].redis).hostname, "127.0.0.22")  # a and b keep .12, .13
            self.assertEqual(config.input.rate_limit, 0.0)
            self.assertEqual(config.users.registrations_per_address, 500)
        self.assertEqual(shard_c.node.shard, "c")
        storage_c = load_storage_config(cluster.path("shard-c", "storage.toml"))
        self.assertEqual(storage_c.storage.id, 3)
        self.assertEqual(storage_c.storage.listen.split(":")[-1], "interface=127.0.0.22")

    def test_the_default_is_two_shards_with_the_default_limits(self):
        cluster = LocalCluster(self.dir)
        self.write(cluster)
        config = load_node_config(cluster.path("front1", "emond.toml"))
        self.assertEqual(set(config.shards), {"a", "b"})
        default = load_node_config(os.path.join(ROOT, "etc", "emond.toml"))
        self.assertEqual(config.input.rate_limit, default.input.rate_limit)

    def test_a_dir_made_with_another_shard_count_is_refused(self):
        self.write(LocalCluster(self.dir, shards=2))
        with self.assertRaises(ClusterError) as caught:
            LocalCluster(self.dir, shards=4)._layout()
        self.assertIn("2 shards, not 4", str(caught.exception))

    def test_a_shard_count_out_of_range_is_refused(self):
        for count in (0, 27):
            with self.assertRaises(ClusterError):
                LocalCluster(self.dir, shards=count)
        with self.assertRaises(ClusterError):
            LocalCluster(self.dir, settings={"redis": {"url": "redis://elsewhere"}})
