"""The `topology` subcommand shared by the `offload` and `offload-profile` tools: read the machine
(sysfs) or a declared file and print it as tables or JSON. Argument wiring only; no discovery here.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from allocators.declared_topology import load_declared, shipped_topologies
from allocators.sysfs_topology import discover
from allocators.topology import Topology
from allocators.topology_json import topology_to_dict
from allocators.topology_table import print_topology


def add_topology_command(subparsers, *, help_text: str) -> argparse.ArgumentParser:
    """Add ``topology [--sysfs-root DIR | --file YAML_OR_NAME] [--json]`` to a CLI.

    >>> parser = argparse.ArgumentParser()
    >>> _ = add_topology_command(parser.add_subparsers(), help_text="show tiers")
    >>> args = parser.parse_args(["topology", "--file", "paper-1aic", "--json"])
    >>> args.file, args.json
    ('paper-1aic', True)
    """
    parser = subparsers.add_parser("topology", help=help_text, description=help_text)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--sysfs-root",
        metavar="DIR",
        default="/sys",
        help="read the NUMA nodes from this sysfs tree (default /sys; a captured copy works too)",
    )
    source.add_argument(
        "--file",
        metavar="YAML_OR_NAME",
        help=f"a declared topology: a YAML path or a shipped name ({', '.join(shipped_topologies())})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run_topology_command)
    return parser


def load_topology(*, sysfs_root: str = "/sys", file: str | None = None) -> Topology:
    """The declared topology when ``file`` is given, else the one discovered under ``sysfs_root``.

    >>> load_topology(file="paper-2aic").name
    'paper-2aic'
    """
    return load_declared(file) if file else discover(sysfs_root)


def run_topology_command(args: argparse.Namespace) -> int:
    """Print the topology the parsed arguments name; returns the exit code 0.

    >>> import contextlib, io
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...     rc = run_topology_command(argparse.Namespace(sysfs_root="/sys", file="paper-1aic", json=True))
    >>> rc, json.loads(out.getvalue())["name"]
    (0, 'paper-1aic')
    """
    topo = load_topology(sysfs_root=args.sysfs_root, file=args.file)
    if args.json:
        sys.stdout.write(json.dumps(topology_to_dict(topo), indent=2) + "\n")
    else:
        print_topology(topo, Console())
    return 0
