import json
from pathlib import Path

import pytest

from allocators.cli_app import run_subcommands
from allocators.declared_topology import load_declared
from allocators.sysfs_topology import discover
from allocators.topology_json import topology_to_dict
from profilers.cli import main as profile_main

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    # rich wraps at 80 columns when not on a terminal; a wide one keeps cells on one line.
    monkeypatch.setenv("COLUMNS", "200")


def offload_main(argv):
    # Only this module's subcommand: the offload tool's other subcommands belong to other modules.
    return run_subcommands("offload", "test", ["offload.tools.topology_cli"], argv)


def test_offload_topology_prints_the_node_table(capsys):
    assert offload_main(["topology", "--sysfs-root", str(FIXTURES / "one-socket-one-cxl")]) == 0
    out = capsys.readouterr().out
    assert "one-socket-one-cxl" in out
    assert "local DRAM" in out and "CXL #1" in out
    assert "node 1 (cxl): no CPUs; cxl region0/dax0.0" in out


def test_topology_prints_the_notes_under_the_tables(capsys):
    offload_main(["topology", "--sysfs-root", str(FIXTURES / "vm-gpu-unknown-node")])
    out = " ".join(capsys.readouterr().out.split())
    assert "note: GPU 0 (0000:00:05.0) reports NUMA node -1" in out


def test_json_dump_parses_and_matches_topology_to_dict(capsys):
    root = FIXTURES / "two-socket-two-cxl"
    assert offload_main(["topology", "--sysfs-root", str(root), "--json"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped == topology_to_dict(discover(root, use_nvml=False))
    assert dumped["tiers"] == {"hbm": [0], "local_dram": [1], "remote_dram": [0], "cxl": [3, 2]}
    assert dumped["distances"]["0"]["3"] == 24


def test_offload_profile_topology_reads_a_declared_file(capsys):
    assert profile_main(["topology", "--file", "paper-2aic", "--json"]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped == topology_to_dict(load_declared("paper-2aic"))
    assert [n["kind"] for n in dumped["nodes"]] == ["dram", "cxl", "cxl"]


def test_sysfs_root_and_file_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        profile_main(["topology", "--sysfs-root", "/sys", "--file", "paper-1aic"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_bad_file_prints_one_error_line_and_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "schema: offload-topology/1\nnodes:\n  - {id: 0, cpus: '0-3', capacity: 64 gigs}\n"
    )
    assert profile_main(["topology", "--file", str(bad)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: bad.yaml: nodes[0].capacity = '64 gigs' is not a size" in err
    assert "Traceback" not in err


def test_a_root_that_is_not_sysfs_exits_2_naming_it(capsys, tmp_path):
    assert offload_main(["topology", "--sysfs-root", str(tmp_path)]) == 2
    assert f"'{tmp_path}' is not a sysfs tree" in capsys.readouterr().err
