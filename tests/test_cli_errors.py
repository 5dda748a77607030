"""Every command line's bad input ends in exit code 2 and one line naming the problem, never a
traceback; user text ([ in a path) is printed as written; bad arguments are refused before work."""

from __future__ import annotations

import json

import pytest

from allocators.host_buffer import machine_memory_nbytes
from offload.tools import demo
from offload.tools.cli import main as offload_main
from profilers.cli import main as profile_main
from profilers.machine_info import MachineInfo, Versions
from profilers.machine_profile import MachineProfile, NodeProfile


def profile_of_nodes(path, nodes):
    MachineProfile(
        created_utc="2026-01-01T00:00:00Z",
        machine=MachineInfo("elsewhere", "Some CPU", 16, 32, 128 << 30),
        versions=Versions("3.11.7", "2.13.0", None, None, "0.1.0"),
        topology={"nodes": [{"id": n} for n in nodes]},
        nodes={n: NodeProfile(latency_ns=100.0, read_gib_per_s=50.0) for n in nodes},
    ).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Bad inputs as files: name -> path."""
    paths = {
        "zero.json": json.dumps(
            dict.fromkeys(
                (
                    "num_hidden_layers",
                    "hidden_size",
                    "intermediate_size",
                    "num_attention_heads",
                    "vocab_size",
                ),
                0,
            )
        ),
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "binary.json": bytes(range(256)) * 4,
        "binary.yaml": bytes(range(256)) * 4,
        "twice.yaml": "budgets:\n  dram: 1GiB\nbudgets:\n  dram: 2GiB\n",
        "a-file": "not a folder",
    }
    out = {}
    for name, content in paths.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        out[name] = str(path)
    (tmp_path / "a-folder").mkdir()
    out["a-folder"] = str(tmp_path / "a-folder")
    out["[bracketed].yaml"] = str(tmp_path / "[bold]x[/bold].yaml")
    out["profile-node-7"] = profile_of_nodes(tmp_path / "other.json", [0, 7])
    return out


PLAN = ["plan", "--model", "llama-1.1b", "--topology", "paper-1aic"]

# (argv, {files to substitute}, what the one line must say)
OFFLOAD_CASES = [
    (["plan", "--model", "{zero.json}", "--topology", "paper-1aic"], "must be a positive integer"),
    (["plan", "--model", "{deep.json}", "--topology", "paper-1aic"], "nested too deeply"),
    (["plan", "--model", "{binary.json}", "--topology", "paper-1aic"], "is not valid JSON"),
    ([*PLAN, "--profile", "{binary.json}"], "is not JSON"),
    ([*PLAN, "--profile", "{deep.json}"], "nested too deeply"),
    ([*PLAN, "--profile", "{profile-node-7}"], "node(s) [7], which this topology lacks"),
    ([*PLAN, "--budget", "hbm=1GiB"], "'hbm' is not a tier"),
    ([*PLAN, "--budget", "dram=1e99"], "is not a size"),
    ([*PLAN, "--budget", "dram=1GiB", "--budget", "dram=2GiB"], "gives tier 'dram' twice"),
    (["plan", "--model", "llama-1.1b", "--topology", "{[bracketed].yaml}"], "[bold]x[/bold].yaml"),
    (["plan", "--model", "llama-1.1b", "--topology", "{binary.yaml}"], "cannot be read"),
    (["report", "{deep.json}"], "nested too deeply"),
    (["report", "{[bracketed].yaml}"], "[bold]x[/bold].yaml not found"),
    (["report", "x.json", "--csv", "{a-folder}"], "is a folder"),
    (["report", "x.json", "--plot", "{a-file}/figures"], "is a file, not a folder"),
    (["doctor", "--config", "{binary.yaml}"], "cannot be read"),
    (["doctor", "--config", "{twice.yaml}"], "'budgets' is given twice"),
    (["doctor", "--config", "{a-folder}"], "cannot be read"),
    (["doctor", "--budget", "dram"], "is not TIER=SIZE"),
    (["doctor", "--model", "{zero.json}"], "must be a positive integer"),
    (["topology", "--file", "{deep.json}"], "not valid YAML"),
    (["topology", "--file", "{binary.yaml}"], "cannot be read"),
    (["demo", "--steps", "0"], "--steps 0 must be at least 1"),
    (["demo", "--seq", "0"], "--seq 0 must be at least 1"),
    (["demo", "--buffer", "0"], "--buffer 0 must be at least one byte"),
    (["demo", "--buffer", "1.5"], "not a whole number of bytes"),
]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def expand(argv: list[str], files: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for name, path in files.items():
            arg = arg.replace("{" + name + "}", path)
        out.append(arg)
    return out


@pytest.fixture(autouse=True)
def no_profiling(monkeypatch):
    """`offload demo` must check its arguments before profiling, so profiling here is a failure."""

    def profiled(argv):
        raise AssertionError(f"offload demo profiled ({argv}) before checking its arguments")

    monkeypatch.setattr(demo, "profile_main", profiled)


@pytest.mark.parametrize(("argv", "fragment"), OFFLOAD_CASES, ids=lambda v: str(v)[:60])
def test_offload_bad_input_is_one_line_and_exit_2(files, capsys, argv, fragment):
    assert offload_main(expand(argv, files)) == 2
    assert fragment in one_error_line(capsys)


def test_doctor_honours_the_environment_enable_reads(monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_BUDGETS", "dram=1GiB,dram=2GiB")
    assert offload_main(["doctor"]) == 2
    assert "OFFLOAD_BUDGETS gives tier 'dram' twice" in one_error_line(capsys)


def test_doctor_reads_offload_config(monkeypatch, files, capsys):
    monkeypatch.setenv("OFFLOAD_CONFIG", files["twice.yaml"])
    assert offload_main(["doctor"]) == 2
    assert "'budgets' is given twice" in one_error_line(capsys)


PROFILE_CASES = [
    (["latency", "--quick", "--cpu-node", "7"], "--cpu-node 7: no such NUMA node"),
    (["bandwidth", "--quick", "--cpu-node", "7"], "--cpu-node 7: no such NUMA node"),
    (["memory", "--quick", "--cpu-node", "7"], "--cpu-node 7: no such NUMA node"),
    (["all", "--quick", "--cpu-node", "7"], "--cpu-node 7: no such NUMA node"),
    (["pinning", "--quick", "--nodes", "7"], "NUMA node 7 does not exist"),
    (["latency", "--quick", "--trials", "1"], "--trials 1"),
    (["latency", "--quick", "--max-size", "1.5"], "not a whole number of bytes"),
    (["latency", "--quick", "--max-size", "{twice the machine}"], "more than this machine's"),
    (["all", "--quick", "--max-size", "{twice the machine}"], "more than this machine's"),
]


@pytest.mark.parametrize(("argv", "fragment"), PROFILE_CASES, ids=lambda v: str(v)[:60])
def test_offload_profile_bad_input_is_refused_before_measuring(
    tmp_path, monkeypatch, capsys, argv, fragment
):
    from profilers import cli_common

    def measured(*args):
        raise AssertionError("measured before checking the options")

    monkeypatch.setattr(cli_common, "write_outcomes", measured)
    for module in ("cli_latency", "cli_memory", "cli_bandwidth", "cli_pinning"):
        monkeypatch.setattr(f"profilers.{module}.measure", measured)
    monkeypatch.setattr("profilers.cli_all.STEPS", ())
    too_big = str(2 * machine_memory_nbytes())
    argv = [a.replace("{twice the machine}", too_big) for a in argv]
    assert profile_main([*argv, "--out", str(tmp_path)]) == 2
    assert fragment in one_error_line(capsys)
