"""The `offload-profile` command: one subcommand per measurement, each in its own module."""

from __future__ import annotations

from collections.abc import Sequence

from allocators.cli_app import run_subcommands

SUBCOMMANDS = (
    "profilers.cli_topology",
    "profilers.cli_latency",
    "profilers.cli_memory",
    "profilers.cli_bandwidth",
    "profilers.cli_optimizer",
    "profilers.cli_contention",
    "profilers.cli_pinning",
    "profilers.cli_all",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``offload-profile SUBCOMMAND ...``; e.g. ``main(["topology"])``.

    >>> main(["latency", "--quick", "--out", "/tmp/profile"])  # doctest: +SKIP
    0
    """
    return run_subcommands(
        "offload-profile", "Measure this machine's memory tiers", SUBCOMMANDS, argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
