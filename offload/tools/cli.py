"""The `offload` command: one subcommand per module, listed here in the order `--help` shows."""

from __future__ import annotations

from collections.abc import Sequence

from allocators.cli_app import run_subcommands

SUBCOMMANDS = (
    "offload.tools.demo",
    "offload.tools.topology_cli",
    "offload.tools.plan_cli",
    "offload.tools.doctor_cli",
    "offload.tools.report_cli",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``offload SUBCOMMAND ...``; e.g. ``main(["topology"])`` prints this machine's tiers."""
    return run_subcommands(
        "offload", "Tiered memory offload for long-context LLM training", SUBCOMMANDS, argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
