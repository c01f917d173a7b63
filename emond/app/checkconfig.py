"""``emond-admin check-config FILE``: check a config as the daemon would load it, starting
nothing, and report every problem with its line.

    emond-admin check-config etc/emond.toml
    {"ok": true, "kind": "node", "file": "etc/emond.toml"}
    emond-admin check-config etc/bad.toml                          (exit 1, on stderr)
    {"error": "etc/bad.toml: 2 errors (checked as a node config)", "kind": "node", "file": "etc/bad.toml",
     "errors": ["etc/bad.toml:12: [input] max_values: must be at least 1, got -3",
                "etc/bad.toml:20: [tls] cert: file not found: /etc/emond/tls/node0.pem"]}

The checks are the loaders' own (``emond.config.load_node_config`` for ``twistd emond``,
``load_storage_config`` for ``twistd emond-storage``), so a file that passes here is one the
daemon accepts and every error here is one it refuses to start on (it prints the same lines).
The kind is read from the file (a ``[storage]`` section with a storage server's keys, id,
listen, ..., and none of a node's sections: a storage server's), or given with ``--kind``.
What the check cannot see: whether Redis, the database and the storage servers answer, and
whether the shards agree with those recorded in the database (the node checks at start).
"""

from __future__ import annotations

import argparse
from types import MappingProxyType
from typing import Any

from emond.app.admin_common import answer, fail
from emond.config import ConfigError, config_kind, load_node_config, load_storage_config

LOADERS = MappingProxyType({"node": load_node_config, "storage": load_storage_config})


def register(commands: Any) -> None:
    """Add ``check-config`` to emond-admin's subcommands (it reads no node config of its own)."""
    check = commands.add_parser("check-config", help="check a node's or a storage server's config, every error with its line")
    check.add_argument("file")
    check.add_argument("--kind", choices=sorted(LOADERS), help="check it as this kind of config (default: found from the file)")
    check.set_defaults(offline=check_config)


def check_config(args: argparse.Namespace) -> None:
    """Print the verdict on ``args.file``: exit 0 if the daemon would start with it, else 1."""
    kind = args.kind
    try:
        kind = kind or config_kind(args.file)
        LOADERS[kind](args.file)
    except ConfigError as e:
        what = f"checked as a {kind} config" if kind else "its kind could not be read"
        count = len(e.problems)
        fail(f"{args.file}: {count} error{'s' if count != 1 else ''} ({what})", kind=kind, file=args.file, errors=e.located())
    answer({"ok": True, "kind": kind, "file": args.file})
