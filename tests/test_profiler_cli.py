"""`offload-profile` subcommands on a CPU-only machine: they run, write CSV and the profile JSON,
and the GPU parts print one line saying why they were skipped."""

import pytest

from profilers.cli import main
from profilers.machine_profile import load_profile
from profilers.result_row import read_rows_csv


def test_latency_quick_writes_csv_and_profile(tmp_path):
    assert main(["latency", "--quick", "--max-size", "64MiB", "--out", str(tmp_path)]) == 0
    rows = read_rows_csv(tmp_path / "profile_latency.csv")
    assert {r.page_size for r in rows} == {"4KiB", "2MiB"}
    assert {r.placement for r in rows} == {"node0"}
    profile = load_profile(tmp_path / "profile.json")
    assert profile.nodes[0].latency_ns is not None and profile.nodes[0].latency_ns > 0


def test_memory_quick_adds_to_the_same_profile(tmp_path):
    assert (
        main(["latency", "--quick", "--max-size", "64MiB", "--out", str(tmp_path), "--nodes", "0"])
        == 0
    )
    assert main(["memory", "--quick", "--out", str(tmp_path)]) == 0
    rows = read_rows_csv(tmp_path / "profile_memory.csv")
    assert {r.case for r in rows} == {"read", "write", "copy", "triad"}
    rates = load_profile(tmp_path / "profile.json").nodes[0]
    assert rates.read_gib_per_s > 0 and rates.write_gib_per_s > 0
    assert rates.latency_ns is not None


def test_unknown_node_is_one_readable_error(tmp_path, capsys):
    assert (
        main(["latency", "--quick", "--max-size", "64MiB", "--out", str(tmp_path), "--nodes", "7"])
        == 2
    )
    assert "NUMA node 7" in capsys.readouterr().err


def test_too_few_trials_is_refused(tmp_path, capsys):
    assert (
        main(["latency", "--quick", "--max-size", "64MiB", "--out", str(tmp_path), "--trials", "2"])
        == 2
    )
    assert "at least 5" in capsys.readouterr().err


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert (
        main(["latency", "--quick", "--max-size", "64MiB", "--out", str(tmp_path), "--plot"]) == 0
    )
    assert (tmp_path / "profile_latency.png").stat().st_size > 0


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


@pytest.mark.skipif(not _cpu_only(), reason="checks the skip line printed on CPU-only machines")
def test_bandwidth_prints_one_skip_line_without_gpu(tmp_path, capsys):
    assert main(["bandwidth", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "skipped bandwidth: no CUDA GPU" in " ".join(out.split())
    assert not (tmp_path / "profile_bandwidth.csv").exists()
    assert any(
        "bandwidth: no CUDA GPU" in s for s in load_profile(tmp_path / "profile.json").skipped
    )


@pytest.mark.skipif(not _cpu_only(), reason="checks the skip line printed on CPU-only machines")
def test_pinning_measures_allocation_and_skips_registration_without_gpu(tmp_path, capsys):
    assert main(["pinning", "--quick", "--out", str(tmp_path)]) == 0
    assert "cudaHostRegister and pin_memory: no CUDA GPU" in " ".join(
        capsys.readouterr().out.split()
    )
    rows = read_rows_csv(tmp_path / "profile_pinning.csv")
    assert {(r.case, r.page_size) for r in rows} == {
        ("allocate+prefault", "4KiB"),
        ("allocate+prefault", "2MiB"),
    }
    assert load_profile(tmp_path / "profile.json").nodes[0].prefault_s_per_gib > 0


@pytest.mark.gpu
@pytest.mark.skipif(_cpu_only(), reason="needs a CUDA GPU")
def test_bandwidth_quick_on_gpu_writes_pinned_and_reference_rows(tmp_path):
    assert main(["bandwidth", "--quick", "--out", str(tmp_path), "--nodes", "0"]) == 0
    rows = read_rows_csv(tmp_path / "profile_bandwidth.csv")
    assert {r.memory for r in rows} == {"pinned", "pageable", "pin_memory"}
    assert all(r.median > 0 for r in rows)
    rates = load_profile(tmp_path / "profile.json").nodes[0]
    assert rates.h2d_gib_per_s > 0 and rates.d2h_gib_per_s > 0
