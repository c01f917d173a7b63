"""Config: the examples load; bad files are refused with one line naming the key."""

from __future__ import annotations

import os
import subprocess

from twisted.trial import unittest

from emond.config import ConfigError, load_node_config, load_storage_config

ETC = os.path.join(os.path.dirname(__file__), "..", "etc")


class ConfigCase(unittest.TestCase):
    def write(self, text: str, name: str = "emond.toml") -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def refused(self, loader, text: str) -> str:
        error = self.assertRaises(ConfigError, loader, self.write(text))
        message = str(error)
        self.assertNotIn("\n", message)
        return message

    def certs(self, directory: str, *names: str) -> None:
        subprocess.run([os.path.join(ETC, "make-certs"), directory, *names], check=True, capture_output=True)


class NodeConfigTests(ConfigCase):
    def test_example_loads(self) -> None:
        config = load_node_config(os.path.join(ETC, "emond.toml"))
        self.assertEqual(config.node.name, "node0")
        self.assertEqual(config.node.storage, (0,))
        self.assertEqual(config.input.queues, 64)
        self.assertIsNone(config.tls)
        # relative paths are relative to the config file's folder
        self.assertEqual(config.node.datadir, os.path.normpath(os.path.join(os.path.abspath(ETC), "..", "var")))
        self.assertEqual(config.sqlite_path, os.path.join(config.node.datadir, "emond.db"))

    def test_defaults_for_an_empty_file(self) -> None:
        config = load_node_config(self.write(""))
        self.assertEqual(config.node.http, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(config.redis.url, "")
        self.assertEqual(config.engines.window_future, 48 * 3600)

    def test_config_is_immutable(self) -> None:
        config = load_node_config(self.write(""))
        self.assertRaises(AttributeError, setattr, config.node, "name", "x")

    def test_unknown_key(self) -> None:
        self.assertEqual(self.refused(load_node_config, "[node]\nnmae = 'x'\n"), "[node] nmae: unknown key")

    def test_unknown_section(self) -> None:
        self.assertEqual(self.refused(load_node_config, "[nodes]\nname = 'x'\n"), "[nodes]: unknown section")

    def test_wrong_types(self) -> None:
        self.assertEqual(
            self.refused(load_node_config, "[input]\nqueues = '64'\n"), "[input] queues: expected an integer, got '64'"
        )
        self.assertEqual(
            self.refused(load_node_config, "[users]\nregistration = 1\n"), "[users] registration: expected true or false, got 1"
        )
        self.assertEqual(
            self.refused(load_node_config, "[input]\nqueues = true\n"), "[input] queues: expected an integer, got True"
        )
        self.assertEqual(
            self.refused(load_node_config, "[node]\nstorage = [0, 'a']\n"), "[node] storage[1]: expected an integer, got 'a'"
        )
        self.assertEqual(self.refused(load_node_config, "[node]\nstorage = 0\n"), "[node] storage: expected a list, got 0")

    def test_bad_values(self) -> None:
        self.assertIn("[node] http: not a server endpoint", self.refused(load_node_config, "[node]\nhttp = 'bogus:1'\n"))
        self.assertIn("[database] url:", self.refused(load_node_config, "[database]\nurl = 'postgres://x'\n"))
        self.assertIn("[input] queues:", self.refused(load_node_config, "[input]\nqueues = 0\n"))
        self.assertIn("[feeds] default_server:", self.refused(load_node_config, "[feeds]\ndefault_server = 3\n"))

    def test_pool_sizes(self) -> None:
        config = load_node_config(self.write(""))
        self.assertEqual((config.users.kdf_threads, config.users.kdf_queue), (2, 16))
        self.assertEqual((config.feeds.render_threads, config.feeds.render_queue), (2, 32))
        self.assertEqual((config.engines.read_threads, config.engines.read_queue), (4, 100))
        self.assertEqual(
            self.refused(load_node_config, "[users]\nkdf_threads = 0\n"), "[users] kdf_threads: must be at least 1, got 0"
        )
        self.assertEqual(
            self.refused(load_node_config, "[feeds]\nrender_queue = -1\n"), "[feeds] render_queue: must not be negative, got -1"
        )
        self.assertEqual(
            self.refused(load_node_config, "[engines]\nread_threads = 0\n"), "[engines] read_threads: must be at least 1, got 0"
        )

    def test_not_toml(self) -> None:
        self.assertIn("not valid TOML", self.refused(load_node_config, "[node\n"))

    def test_missing_file(self) -> None:
        self.assertIn("config file not found", str(self.assertRaises(ConfigError, load_node_config, "/nonexistent.toml")))

    def test_tls_required_with_a_remote_server(self) -> None:
        remote = "[storage.servers]\n1 = { endpoint = 'tcp:127.0.0.1:7443', name = 'storage1' }\n"
        self.assertEqual(self.refused(load_node_config, remote), "[tls] ca: required key missing")
        message = self.refused(load_node_config, remote + "[tls]\nca = 'tls/ca.pem'\ncert = 'tls/node0.pem'\n")
        self.assertTrue(message.startswith("[tls] ca: file not found: "), message)

    def test_remote_server_with_tls(self) -> None:
        path = self.write(
            "[storage.servers]\n1 = { endpoint = 'tcp:127.0.0.1:7443', name = 'storage1' }\n"
            "[tls]\nca = 'tls/ca.pem'\ncert = 'tls/node0.pem'\n"
        )
        self.certs(os.path.join(os.path.dirname(path), "tls"), "node0")
        config = load_node_config(path)
        self.assertEqual(config.storage_servers[1].name, "storage1")
        self.assertEqual(config.tls.ca, os.path.join(os.path.dirname(os.path.abspath(path)), "tls", "ca.pem"))

    def test_remote_server_unknown_key(self) -> None:
        message = self.refused(load_node_config, "[storage.servers]\n1 = { endpoint = 'tcp:h:1', nam = 'x' }\n")
        self.assertEqual(message, "[storage.servers.1] nam: unknown key")


class ShardsConfigTests(ConfigCase):
    """``[shards.NAME]`` and the roles of ``[node]`` (architecture §7)."""

    MYSQL = "[database]\nurl = 'mysql://emond:pw@127.0.0.1:3306/emond'\n"
    TWO = (
        "[node]\nstorage = [1, 2]\nshard = 'a'\n[feeds]\ndefault_server = 1\n"
        "[shards.a]\nredis = 'redis://127.0.0.1:6379/0'\nstorage = [1]\n"
        "[shards.b]\nsentinels = ['127.0.0.1:26379', '127.0.0.2:26379']\nservice = 'shard-b'\nstorage = [2]\nweight = 2.0\n"
    )

    def test_without_shards_one_default_shard_holds_every_server(self) -> None:
        config = load_node_config(self.write("[node]\nstorage = [0, 3]\n"))
        self.assertEqual(list(config.shards), ["default"])
        self.assertEqual(config.shards["default"].storage, (0, 3))
        self.assertEqual(config.shards["default"].redis, "")  # the node's [redis]
        self.assertEqual((config.node.front, config.node.shard), (True, "default"))
        self.assertEqual(config.default_server("default"), 0)

    def test_two_shards(self) -> None:
        config = load_node_config(self.write(self.TWO + self.MYSQL))
        self.assertEqual(sorted(config.shards), ["a", "b"])
        self.assertEqual(config.shards["b"].sentinels, ("127.0.0.1:26379", "127.0.0.2:26379"))
        self.assertEqual(config.shard_of_server(2), "b")
        # a new feed goes to [feeds] default_server when it is the shard's, else to the shard's first
        self.assertEqual((config.default_server("a"), config.default_server("b")), (1, 2))

    def test_several_shards_need_the_central_mariadb(self) -> None:
        message = self.refused(load_node_config, self.TWO)
        self.assertTrue(message.startswith("[database] url: several shards share one central database"), message)

    def test_the_process_shard_must_be_configured(self) -> None:
        text = self.TWO.replace("shard = 'a'", "shard = 'c'") + self.MYSQL
        self.assertIn("[node] shard: 'c' is not a configured shard (a, b)", self.refused(load_node_config, text))
        text = self.TWO.replace("shard = 'a'", "shard = ''\nfront = false") + self.MYSQL
        self.assertIn("this process would do nothing", self.refused(load_node_config, text))

    def test_storage_servers_belong_to_exactly_one_shard(self) -> None:
        both = self.TWO.replace("storage = [2]", "storage = [1]") + self.MYSQL
        self.assertEqual(self.refused(load_node_config, both), "[shards.b] storage: server 1 is also shard 'a''s")
        unknown = self.TWO.replace("storage = [2]", "storage = [2, 9]") + self.MYSQL
        self.assertIn("server 9 is neither hosted", self.refused(load_node_config, unknown))
        orphan = self.TWO.replace("storage = [1, 2]", "storage = [1, 2, 3]") + self.MYSQL
        self.assertEqual(self.refused(load_node_config, orphan), "[shards]: storage server 3 belongs to no shard")

    def test_bad_shard_sections(self) -> None:
        base = "[node]\nshard = 's'\n" + self.MYSQL
        cases = {
            "[shards.S]\nredis = 'redis://h:1/0'\nstorage = [0]\n": "a shard name is 1-32 of a-z",
            "[shards.s]\nredis = 'http://h:1/0'\nstorage = [0]\n": "[shards.s] redis: expected redis://",
            "[shards.s]\nsentinels = ['h:1']\nstorage = [0]\n": "[shards.s] service: required with sentinels",
            "[shards.s]\nsentinels = ['h']\nservice = 'm'\nstorage = [0]\n": "[shards.s] sentinels: expected HOST:PORT",
            "[shards.s]\nredis = 'redis://h:1/0'\nsentinels = ['h:1']\nservice = 'm'\nstorage = [0]\n": "not both",
            "[shards.s]\nredis = 'redis://h:1/0'\nstorage = []\n": "a shard needs at least one storage server",
            "[shards.s]\nredis = 'redis://h:1/0'\nstorage = [0]\ntimeout = 0\n": "must be more than 0 seconds",
            "[shards.s]\nredis = 'redis://h:1/0'\nstorage = [0]\nwait_replicas = -1\n": "wait_replicas: must not be negative",
            "[shards.s]\nredis = 'redis://h:1/0'\nstorage = [0]\nweight = 0\n": "weight: must be more than 0",
            "[shards.s]\nredis = 'redis://h:1/0'\nstorage = [0]\nport = 1\n": "[shards.s] port: unknown key",
            "[shards]\n": "[shards]: expected one table per shard",
        }
        for section, expected in cases.items():
            message = self.refused(load_node_config, base + section)
            self.assertIn(expected, message, section)


class RedisTLSConfigTests(ConfigCase):
    """A Redis over TLS: ``rediss://`` urls, sentinels with ``tls = true``, ``tls_name``; and
    the sentinels' own ``sentinel_password``."""

    TLS = "[tls]\nca = 'tls/ca.pem'\ncert = 'tls/node0.pem'\n"
    SHARD = "[node]\nshard = 's'\n[shards.s]\nstorage = [0]\n"
    SENTINELS = "sentinels = ['10.0.0.3:26379']\nservice = 'shard-s'\n"

    def loaded(self, text: str):
        path = self.write(text)
        self.certs(os.path.join(os.path.dirname(path), "tls"), "node0")
        return load_node_config(path)

    def test_rediss_urls(self) -> None:
        config = self.loaded(
            "[redis]\nurl = 'rediss://:pw@10.0.0.1:6380/0'\ntls_name = 'redis1'\n" + self.TLS + self.SHARD + "redis = 'rediss://10.0.0.2:6380/1'\n"
        )
        self.assertEqual((config.redis.uses_tls, config.redis.tls_name), (True, "redis1"))
        shard = config.shards["s"]
        self.assertEqual((shard.uses_tls, shard.tls_name, shard.tls), (True, "", False))  # "": the url's host
        self.assertTrue(config.tls.cert.endswith("node0.pem"), config.tls)  # loaded without [storage.servers]

    def test_sentinels_over_tls_with_their_password(self) -> None:
        text = self.TLS + self.SHARD + self.SENTINELS + "tls = true\ntls_name = 'redis'\nsentinel_password = 'spw'\npassword = 'mpw'\n"
        shard = self.loaded(text).shards["s"]
        self.assertEqual((shard.uses_tls, shard.tls_name, shard.sentinel_password, shard.password), (True, "redis", "spw", "mpw"))
        shard = self.loaded(self.SHARD + self.SENTINELS + "sentinel_password = 'spw'\n").shards["s"]
        self.assertEqual((shard.uses_tls, shard.sentinel_password), (False, "spw"))

    def test_tls_to_redis_needs_the_tls_section(self) -> None:
        needs = "Redis over TLS needs the [tls] section (ca, cert"
        cases = {
            "[redis]\nurl = 'rediss://10.0.0.1:6380/0'\n": "[redis] url: ",
            self.SHARD + "redis = 'rediss://10.0.0.2:6380/0'\n": "[shards.s] redis: ",
            self.SHARD + self.SENTINELS + "tls = true\n": "[shards.s] tls: ",
        }
        for text, key in cases.items():
            self.assertEqual(self.refused(load_node_config, text), key + needs + ": the CA that signs Redis's certificate, and the node's)")
            message = self.refused(load_node_config, text + self.TLS)  # the files are not there
            self.assertTrue(message.startswith("[tls] ca: file not found: "), message)

    def test_without_tls_to_redis_the_tls_section_is_not_read(self) -> None:
        config = load_node_config(self.write("[redis]\nurl = 'redis://10.0.0.1:6379/0'\n" + self.TLS))
        self.assertIsNone(config.tls)

    def test_misplaced_keys_and_schemes(self) -> None:
        cases = {
            "[redis]\nurl = 'redis://h:1/0'\ntls_name = 'r'\n": "[redis] tls_name: only with a rediss:// url",
            "[redis]\ntls_name = 'r'\n": "[redis] tls_name: only with a rediss:// url",
            "[redis]\nurl = 'redis+tls://h:1/0'\n": "[redis] url: expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///PATH, got 'redis+tls://h:1/0'",
            self.SHARD + "redis = 'tls://h:1/0'\n": "[shards.s] redis: expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or sentinels, got 'tls://h:1/0'",
            self.SHARD + "redis = 'redis://h:1/0'\ntls_name = 'r'\n": "[shards.s] tls_name: only with TLS (a rediss:// url, or sentinels with tls = true)",
            self.SHARD + self.SENTINELS + "tls_name = 'r'\n": "[shards.s] tls_name: only with TLS (a rediss:// url, or sentinels with tls = true)",
            self.SHARD + "redis = 'redis://h:1/0'\ntls = true\n": "[shards.s] tls: only with sentinels (a redis url asks for TLS with rediss://)",
            self.SHARD + "redis = 'rediss://h:1/0'\ntls = true\n": "[shards.s] tls: only with sentinels (a redis url asks for TLS with rediss://)",
            self.SHARD + "redis = 'redis://h:1/0'\nsentinel_password = 'p'\n": "[shards.s] sentinel_password: only with sentinels",
            self.SHARD + self.SENTINELS + "tls = 'yes'\n": "[shards.s] tls: expected true or false, got 'yes'",
            self.SHARD + self.SENTINELS + "sentinel_password = 1\n": "[shards.s] sentinel_password: expected a string, got 1",
        }
        for text, expected in cases.items():
            self.assertEqual(self.refused(load_node_config, text), expected, text)


class StorageConfigTests(ConfigCase):
    def test_example_loads_with_certificates(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(ETC, "emond-storage.toml")) as f:
            text = f.read()
        path = os.path.join(directory, "emond-storage.toml")
        with open(path, "w") as f:
            f.write(text)
        self.certs(os.path.join(directory, "tls"), "storage1")
        config = load_storage_config(path)
        self.assertEqual(config.storage.id, 1)
        self.assertEqual(config.storage.allow, ("node0",))

    def test_storage_section_required(self) -> None:
        self.assertEqual(self.refused(load_storage_config, ""), "[storage]: required section missing")

    def test_storage_id_required(self) -> None:
        self.assertEqual(self.refused(load_storage_config, "[storage]\nlisten = 'tcp:7443'\n"), "[storage] id: required key missing")

    def test_tls_always_required(self) -> None:
        self.assertEqual(self.refused(load_storage_config, "[storage]\nid = 1\n"), "[tls] ca: required key missing")


class StopAndLogConfigTests(ConfigCase):
    """[node] and [storage] drain_timeout (the SIGTERM budget) and log_level."""

    STORAGE = '[storage]\nid = 1\n{extra}[tls]\nca = "tls/ca.pem"\ncert = "tls/storage1.pem"\n'

    def storage(self, extra: str) -> str:
        path = self.write(self.STORAGE.format(extra=extra), "storage.toml")
        self.certs(os.path.join(os.path.dirname(path), "tls"), "storage1")
        return path

    def test_defaults(self) -> None:
        node = load_node_config(self.write(""))
        self.assertEqual((node.node.drain_timeout, node.node.log_level), (10.0, "info"))
        storage = load_storage_config(self.storage(""))
        self.assertEqual((storage.storage.drain_timeout, storage.storage.log_level), (10.0, "info"))

    def test_levels(self) -> None:
        for level in ("debug", "info", "warn", "error", "critical"):
            self.assertEqual(load_node_config(self.write(f'[node]\nlog_level = "{level}"\n')).node.log_level, level)
        self.assertEqual(
            self.refused(load_node_config, '[node]\nlog_level = "verbose"\n'),
            "[node] log_level: expected one of debug, info, warn, error, critical, got 'verbose'",
        )
        error = self.assertRaises(ConfigError, load_storage_config, self.storage('log_level = "WARN"\n'))
        self.assertEqual(str(error), "[storage] log_level: expected one of debug, info, warn, error, critical, got 'WARN'")

    def test_drain_timeout_must_be_positive(self) -> None:
        self.assertEqual(
            self.refused(load_node_config, "[node]\ndrain_timeout = 0\n"), "[node] drain_timeout: must be more than 0 seconds, got 0.0"
        )
        error = self.assertRaises(ConfigError, load_storage_config, self.storage("drain_timeout = -1.0\n"))
        self.assertEqual(str(error), "[storage] drain_timeout: must be more than 0 seconds, got -1.0")


class EveryProblemTests(ConfigCase):
    """Checking goes on past the first problem: ConfigError holds each with its line; its
    message stays the first, one line (what the daemons and the tests above read)."""

    def test_every_problem_with_its_line(self) -> None:
        text = "[input]\nqueues = 'many'\nmax_values = -3\n[users]\nkdf_threads = 0\n[bogus]\n"
        error = self.assertRaises(ConfigError, load_node_config, self.write(text))
        self.assertEqual(str(error), "[bogus]: unknown section")  # the first checked
        # in the order checked: sections, then their keys, then the values' ranges
        self.assertEqual([(p.table, p.key, p.line) for p in error.problems], [
            ("bogus", None, 6), ("input", "queues", 2), ("input", "max_values", 3), ("users", "kdf_threads", 5),
        ])
        self.assertEqual(error.located(), [
            f"{error.path}:2: [input] queues: expected an integer, got 'many'",
            f"{error.path}:3: [input] max_values: must be at least 1, got -3",
            f"{error.path}:5: [users] kdf_threads: must be at least 1, got 0",
            f"{error.path}:6: [bogus]: unknown section",
        ])

    def test_a_refused_value_is_not_judged_again(self) -> None:
        # the bad list is refused once; the shards are not told its servers are unknown
        text = "[node]\nstorage = 'x'\nshard = 's'\n[shards.s]\nredis = 'redis://h:1/0'\nstorage = [0]\n"
        error = self.assertRaises(ConfigError, load_node_config, self.write(text))
        self.assertEqual([str(p) for p in error.problems], ["[node] storage: expected a list, got 'x'"])

    def test_legacy_raise_keeps_its_key(self) -> None:
        error = ConfigError("[node] drain_timeout: must be more than 0, got 0")
        self.assertEqual((error.problems[0].table, error.problems[0].key, str(error)),
                         ("node", "drain_timeout", "[node] drain_timeout: must be more than 0, got 0"))


class KeyLinesTests(unittest.TestCase):
    def test_tables_keys_inline_tables_and_strings(self) -> None:
        from emond.tomllines import KeyLines

        lines = KeyLines(
            "top = 1\n"
            "[node]  # the node\n"
            "name = 'x'\n"
            "notes = '''\n"
            "fake = 1\n"
            "'''\n"
            "[storage.servers]\n"
            "1 = { endpoint = 'tcp:h:1', name = 'storage1' }\n"
            "[shards.a]\n"
            "redis.url = 'x'\n"
            '[shards."b"]\n'
        )
        self.assertEqual(lines.line(None, "top"), 1)
        self.assertEqual(lines.line("node"), 2)
        self.assertEqual(lines.line("node", "name"), 3)
        self.assertEqual(lines.line("node", "fake"), 2)  # inside a multi-line string: not a key; its table's line
        self.assertEqual(lines.line("storage.servers.1", "name"), 8)
        self.assertEqual(lines.line("storage.servers", "2"), 7)
        self.assertEqual(lines.line("shards"), 9)
        self.assertEqual(lines.line("shards.a", "redis"), 10)
        self.assertEqual(lines.line("shards.b", "storage[0]"), 11)
        self.assertIsNone(lines.line("tls", "ca"))
