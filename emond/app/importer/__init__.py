"""``emond-admin import``: move an emoncms server onto emond.

    emond-admin [--config FILE] import --mysql URL --phpfina DIR --phptimeseries DIR
        [--redis URL] [--shard NAME] [--copy|--adopt] [--dry-run]

Reads the emoncms database (users with their password hashes and API keys, inputs with
their process lists, feeds), checks each feed's data files and copies them (SHA-256
verified) or adopts them in place into the storage of the node configured by FILE, and
takes the input/feed last values and process state from the old Redis (``--redis``) or
leaves emond to rebuild them from the files. Ids are kept. Progress goes to stderr (a bar
on a terminal); the report is one JSON line on stdout. What cannot be imported is listed
in the report with its reason; running the command again imports what is left and
changes nothing imported already (``run``'s docstring says how).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from emond.app.importer.progress import progress_for
from emond.app.importer.run import ImportFailed, Importer, ImportOptions
from emond.config import NodeConfig

__all__ = ["add_parser", "import_command", "ImportFailed", "Importer", "ImportOptions"]


def add_parser(commands: Any) -> None:
    """Register ``import`` among ``emond-admin``'s subcommands."""
    cmd = commands.add_parser(
        "import",
        help="import an emoncms server (database, data files, Redis state); run again to finish one cut short",
        description="Import an emoncms server: users (passwords and API keys unchanged), inputs with their process "
        "lists, feeds and their data files. Prints a JSON report; --dry-run writes nothing.",
    )
    cmd.add_argument("--mysql", required=True, metavar="URL", help="the emoncms database: mysql://USER:PASSWORD@HOST:PORT/DB")
    cmd.add_argument("--phpfina", required=True, metavar="DIR", help="emoncms's PHPFina directory (e.g. /var/lib/phpfina)")
    cmd.add_argument("--phptimeseries", required=True, metavar="DIR", help="emoncms's PHPTimeSeries directory")
    cmd.add_argument("--redis", metavar="URL", help="emoncms's Redis (redis://HOST:PORT/DB): last values and process state "
                     "(without it, emond rebuilds them from the files)")
    cmd.add_argument("--shard", metavar="NAME", help="the shard the users go to (default: the placement rule)")
    how = cmd.add_mutually_exclusive_group()
    how.add_argument("--copy", dest="adopt", action="store_false", help="copy the data files into emond's storage (default)")
    how.add_argument("--adopt", dest="adopt", action="store_true", help="use the data files in place (hard links: same filesystem)")
    cmd.add_argument("--dry-run", action="store_true", help="print the report, write nothing")
    cmd.set_defaults(adopt=False, handler=import_command)


async def import_command(reactor: Any, config: NodeConfig, args: argparse.Namespace) -> None:
    """Run the import and print its report (``emond-admin``'s conventions: one JSON line on
    stdout; ``{"error": ...}`` on stderr and exit status 1)."""
    options = ImportOptions(
        mysql=args.mysql, phpfina=args.phpfina, phptimeseries=args.phptimeseries, redis=args.redis,
        shard=args.shard, adopt=args.adopt, dry_run=args.dry_run,
    )
    try:
        report = await Importer(config, options, reactor, progress_for(sys.stderr)).run()
    except ImportFailed as e:
        print(json.dumps({"error": f"import: {e} (nothing verified is undone: run the command again to go on)"}), file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps(report))
