"""`offload topology`: show the memory tiers offload places data on, from sysfs or a declared file.

Wiring only: the command itself is allocators.topology_command, shared with `offload-profile`.
"""

from __future__ import annotations

from allocators.topology_command import add_topology_command


def register(subparsers) -> None:
    """Add the ``topology`` subcommand to the ``offload`` tool's parser.

    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["topology", "--sysfs-root", "/sys"]).sysfs_root
    '/sys'
    """
    add_topology_command(
        subparsers,
        help_text="show the NUMA nodes, memory tiers and GPUs that offload places data on",
    )
