"""The command-line tables stay readable at 80 columns: numbers and header words are never cut
with '…' (wrapped at spaces instead), whether the table fits or not."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from rich.console import Console

from allocators.declared_topology import load_declared
from allocators.topology_table import topology_table
from offload.tools.cli import main
from offload.tools.demo import finetune_table
from offload.tools.doctor import CheckResult
from offload.tools.doctor_cli import _table as doctor_table
from offload.tools.report_cli import comparison_table
from offload.tools.tiny_finetune import TinyFinetuneResult


@pytest.fixture(autouse=True)
def eighty_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def rendered(table) -> str:
    console = Console(width=80, file=io.StringIO())
    console.print(table)
    return console.file.getvalue()


def assert_readable(text: str) -> None:
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_demo_losses_are_shown_whole():
    rows = [
        {
            "step": i,
            "forward_ms": 1234.5,
            "backward_ms": 2345.6,
            "optimizer_ms": 30.5,
            "wait_ms": 0.1,
            "d2h_nbytes": 40 << 20,
            "h2d_nbytes": 4096,
        }
        for i in range(2)
    ]
    result = TinyFinetuneResult((6.2547123, 6.1), (6.2547121, 6.1), pd.DataFrame(rows))
    text = rendered(finetune_table(result))
    assert_readable(text)
    assert "6.254712" in text and "1234.5" in text


def test_topology_headers_are_whole():
    text = rendered(topology_table(load_declared("paper-2aic")))
    assert_readable(text)
    assert "movable" in text and "distance" in text and "256" in text


def test_long_doctor_findings_wrap():
    results = [
        CheckResult("cpu kernel", "ok", "optim_cpu C++ kernel built: /root/.cache/" + "x" * 90),
        CheckResult("memlock", "warn", "limit 8.00 MiB " * 6, "raise it: ulimit -l unlimited"),
    ]
    assert_readable(rendered(doctor_table(results)))


def test_many_runs_side_by_side_keep_their_numbers():
    frame = pd.DataFrame(
        {"run": [f"run-{i}-long-name" for i in range(6)], "forward_ms": [1234.5678] * 6}
    )
    text = rendered(comparison_table(frame))
    assert_readable(text)
    assert "1235" in text


def test_plan_tables_fit(capsys):
    main(["plan", "--model", "qwen2.5-7b", "--seq", "4096", "--topology", "paper-2aic"])
    assert_readable(capsys.readouterr().out)
