"""`offload report`: saved runs compared as a table, CSV and PNGs; profiles shown; bad files exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from allocators.cli_app import run_subcommands
from tests.test_run_record import run_tiny

PROFILE = Path(__file__).resolve().parent.parent / "experiments/results/cpu-2core/profile.json"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # Off a terminal rich draws 80 columns wide; the checks below read whole headers and lines.
    monkeypatch.setenv("COLUMNS", "200")


def report(*argv: str) -> int:
    return run_subcommands("offload", "x", ["offload.cli_report"], ["report", *argv])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    return run_tiny(2).save(folder / "short.json"), run_tiny(3).save(folder / "long.json")


def test_two_runs_render_side_by_side(two_runs, capsys):
    assert report(*map(str, two_runs)) == 0
    out = capsys.readouterr().out
    assert "short" in out and "long" in out
    assert "forward_ms_median" in out and "host_dram_nbytes_max" in out


def test_csv_has_one_row_per_run_and_unit_named_columns(two_runs, tmp_path):
    out = tmp_path / "cmp.csv"
    assert report(*map(str, two_runs), "--csv", str(out)) == 0
    frame = pd.read_csv(out)
    assert frame["run"].tolist() == ["short", "long"]
    assert frame["steps"].tolist() == [2, 3]
    expected = {
        "forward_ms_median",
        "backward_ms_median",
        "optimizer_ms_median",
        "wait_ms_median",
        "h2d_gb_per_s_median",
        "d2h_gb_per_s_median",
        "hidden_transfer_fraction_median",
        "peak_hbm_nbytes_max",
        "host_dram_nbytes_max",
    }
    assert expected <= set(frame.columns)


def test_plot_writes_nonempty_pngs(two_runs, tmp_path):
    assert report(*map(str, two_runs), "--plot", str(tmp_path / "figs")) == 0
    pngs = sorted((tmp_path / "figs").glob("*.png"))
    assert [p.name for p in pngs] == ["run_steps.png", "run_tiers.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 1000 for p in pngs)


def test_malformed_run_is_one_line_naming_the_key(two_runs, tmp_path, capsys):
    data = json.loads(two_runs[0].read_text())
    del data["steps"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert report(str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'steps'" in err and "bad.json" in err


def test_profile_renders_its_rates(capsys):
    assert report(str(PROFILE)) == 0
    out = capsys.readouterr().out
    assert "profile of vm" in out and "read_gib_per_s" in out


def test_csv_without_runs_says_what_to_give(tmp_path, capsys):
    assert report(str(PROFILE), "--csv", str(tmp_path / "x.csv")) == 2
    assert "OffloadSession.save" in capsys.readouterr().err
