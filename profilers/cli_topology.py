"""`offload-profile topology`: show the nodes a profile would measure, from sysfs or a declared file.

Wiring only: the command itself is allocators.topology_command, shared with `offload`.
"""

from __future__ import annotations

from allocators.topology_command import add_topology_command


def register(subparsers) -> None:
    """Add the ``topology`` subcommand to the ``offload-profile`` tool's parser.

    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> register(parser.add_subparsers())
    >>> parser.parse_args(["topology", "--file", "paper-2aic"]).file
    'paper-2aic'
    """
    add_topology_command(
        subparsers, help_text="show the NUMA nodes and GPUs this machine's profile covers"
    )
