"""`offload report`: saved runs compared as a table, CSV and PNGs; profiles shown; bad files exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from allocators.cli_app import run_subcommands
from offload.tools.report_cli import _cell, comparison_frame
from offload.tools.run_record import SCHEMA, MachineFacts, RunRecord, load_run
from offload.tools.transfer_ceilings import TransferCeilings
from plots.profile_common import plt
from plots.run_bandwidth import bandwidth_figure
from tests.test_run_record import run_tiny

PROFILE = Path(__file__).resolve().parent.parent / "experiments/results/cpu-2core/profile.json"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # Off a terminal rich draws 80 columns wide; the checks below read whole headers and lines.
    monkeypatch.setenv("COLUMNS", "200")


def report(*argv: str) -> int:
    return run_subcommands("offload", "x", ["offload.tools.report_cli"], ["report", *argv])


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
        "copy_kind",
        "h2d_ceiling_gb_per_s",
        "d2h_ceiling_gb_per_s",
        "h2d_of_ceiling_fraction",
        "d2h_of_ceiling_fraction",
        "ceiling_source",
    }
    assert expected <= set(frame.columns)


def test_table_says_where_the_ceiling_came_from(two_runs, capsys):
    assert report(*map(str, two_runs)) == 0
    out = capsys.readouterr().out
    assert "ceiling_source" in out and "none (no measured profile" in out
    assert "host_memcpy" in out


def dma_record(ceilings):
    steps = [
        {"step": i, "h2d_gb_per_s": h2d, "d2h_gb_per_s": d2h, "peak_hbm_nbytes": 1 << 30}
        for i, (h2d, d2h) in enumerate([(40.0, 30.0), (50.0, 44.0), (45.0, 40.0)])
    ]
    return RunRecord(
        SCHEMA, "", {}, None, {}, MachineFacts("h", "2", "13", "H100"), steps, ceilings
    )


def test_dma_run_is_compared_to_its_ceiling_as_a_fraction():
    frame = comparison_frame({"gpu": dma_record(TransferCeilings(50.0, 55.0, "profile h.json"))})
    row = frame.iloc[0]
    assert row["copy_kind"] == "dma" and row["ceiling_source"] == "profile h.json"
    assert row["h2d_of_ceiling_fraction"] == pytest.approx(45.0 / 50.0)
    assert row["d2h_of_ceiling_fraction"] == pytest.approx(40.0 / 55.0)
    assert "90%" in _cell("h2d_of_ceiling_fraction", row["h2d_of_ceiling_fraction"])


def test_bandwidth_figure_draws_dma_rates_and_ceilings():
    fig = bandwidth_figure({"gpu": dma_record(TransferCeilings(50.0, 55.0, "profile h.json"))})
    ax = fig.axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines["H2D achieved"] == [40.0, 50.0, 45.0]
    assert lines["H2D ceiling"] == [50.0, 50.0] and lines["D2H ceiling"] == [55.0, 55.0]
    assert "measured on h (H100)" in ax.get_title()
    assert any("profile h.json" in t.get_text() for t in ax.texts)
    plt.close(fig)


def test_bandwidth_figure_of_a_cpu_run_says_there_is_no_dma(two_runs):
    fig = bandwidth_figure({"cpu": load_run(two_runs[0])})
    ax = fig.axes[0]
    assert "no DMA" in ax.get_title() and "CPU only, no GPU" in ax.get_title()
    assert not ax.get_lines()
    assert any("host memcpy" in t.get_text() for t in ax.texts)
    plt.close(fig)


def test_plot_writes_nonempty_pngs(two_runs, tmp_path):
    assert report(*map(str, two_runs), "--plot", str(tmp_path / "figs")) == 0
    pngs = sorted((tmp_path / "figs").glob("*.png"))
    assert [p.name for p in pngs] == [
        "report_bandwidth.png",
        "report_bytes_per_tier.png",
        "report_step_breakdown.png",
    ]
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
