"""The GPU session script: every stage's command parses with the script it names, the budget skips
what does not fit, a stage that overruns is killed with its children, failures do not stop the
rest, the tarball holds what stages wrote, and unpacking refuses paths outside the results."""

import argparse
import importlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from experiments import gpu_session
from experiments.gpu_session import (
    PACK_RESERVE_S,
    Probe,
    SessionConfig,
    Stage,
    all_stages,
    main,
    run_session,
    select_stages,
    skip_reason,
    unpack,
)

ROOT = Path(__file__).resolve().parent.parent
CPU = Probe("test-machine", cuda=False, deepspeed=False)
GPU = Probe("test-machine", cuda=True, deepspeed=True)


class _Parsed(Exception):
    """Raised by the patched parse_args once the arguments parsed, before the script runs."""


@pytest.fixture
def parse_only(monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)


def _argv(stage: Stage, tmp_path: Path) -> list[str]:
    return [gpu_session.resolve(a, "test-machine", sys.executable) for a in stage.argv]


@pytest.mark.parametrize("stage", all_stages(), ids=lambda s: s.name)
def test_every_stage_command_parses_with_the_script_it_names(stage, tmp_path, parse_only):
    argv = _argv(stage, tmp_path)
    assert argv[0] == sys.executable
    if argv[1] == "-c":
        compile(argv[2], stage.name, "exec")
        return
    if argv[1] == "-m" and argv[2] == "pytest":
        return  # pytest's own parser: see the next test
    if argv[1] == "-m":
        module, args = importlib.import_module(argv[2]), argv[3:]
    else:
        script = ROOT / argv[1]
        assert script.is_file(), f"{stage.name}: {script} does not exist"
        module = importlib.import_module(f"experiments.{script.stem}")
        args = argv[2:]
    with pytest.raises(_Parsed) as parsed:
        module.main(args)
    assert isinstance(parsed.value.args[0], argparse.Namespace)


@pytest.mark.parametrize(
    "stage", [s for s in all_stages() if s.argv[1:3] == ("-m", "pytest")], ids=lambda s: s.name
)
def test_pytest_stages_parse_with_pytest(stage, tmp_path):
    argv = _argv(stage, tmp_path)
    junit = [a for a in argv if a.startswith("--junitxml=")]
    argv = [a for a in argv if a not in junit] + [f"--junitxml={tmp_path / 'j.xml'}"]
    done = subprocess.run(
        [*argv, "--collect-only", "tests/test_units.py"], cwd=ROOT, capture_output=True, text=True
    )
    # 0: collected; 5: the marker selected nothing in this one file. 4 would be a usage error.
    assert done.returncode in (0, 5), done.stdout[-2000:] + done.stderr[-2000:]


def test_bench_cpu_adam_sizes_of_the_stage_are_known_sizes():
    from experiments.bench_cpu_adam import SIZES

    (stage,) = select_stages(all_stages(), names=["cpu-adam"])
    sizes = stage.argv[stage.argv.index("--sizes") + 1]
    assert set(sizes.split(",")) <= set(SIZES)


def test_stage_names_are_unique_and_part_one_comes_first():
    stages = all_stages()
    assert len({s.name for s in stages}) == len(stages)
    parts = [s.part for s in stages]
    assert parts == sorted(parts)
    assert all(s.estimate_s <= s.cap_s for s in stages)


def test_dry_run_lists_every_stage_and_the_device_command(monkeypatch, capsys):
    monkeypatch.setattr(gpu_session, "probe_machine", lambda: CPU)
    assert main(["--dry-run", "--part", "all"]) == 0
    out = capsys.readouterr().out
    for stage in all_stages():
        assert stage.name in out
    assert "gpu_session.py --out-dir" in out and "timeout_s 600" in out


def test_list_prints_the_selected_part_only(capsys):
    assert main(["--list", "--part", "2"]) == 0
    names = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [s.name for s in all_stages() if s.part == 2]


def test_an_unknown_stage_name_says_which_names_exist(capsys):
    assert main(["--stages", "env,nope", "--list"]) == 2
    assert "unknown stage 'nope'; write some of: env," in capsys.readouterr().err


def test_an_unknown_part_says_what_to_write():
    with pytest.raises(ValueError, match="write 1, 2 or all"):
        select_stages(all_stages(), part="3")


def test_on_a_cpu_machine_every_gpu_stage_is_skipped_with_the_reason():
    for stage in all_stages():
        reason = skip_reason(stage, CPU, remaining_s=1e6)
        if stage.needs_gpu:
            assert "torch.cuda.is_available() is False" in reason
        elif stage.needs_deepspeed:
            assert "needs deepspeed" in reason


def test_the_device_command_fits_the_tool_and_survives_missing_wheels():
    command = gpu_session.device_command()
    assert len(command) < 2000
    # A failed wheel install must not end the session before it starts.
    assert command.startswith("(") and "|| echo" in command.split(";")[0]


def test_the_docs_name_every_stage():
    text = (ROOT / "docs" / "gpu_session.md").read_text()
    missing = [s.name for s in all_stages() if f"`{s.name}`" not in text]
    assert not missing


def _stage(name: str, code: str, *, cap_s: int = 30, estimate_s: int = 0, **kw) -> Stage:
    kw.setdefault("needs_gpu", False)
    return Stage(name, 0, ("{python}", "-c", code), cap_s, estimate_s, "test", **kw)


def _run(tmp_path: Path, stages: list[Stage], probe: Probe = CPU, budget_s: float = 300):
    root = tmp_path / "repo"
    (root / "experiments" / "results").mkdir(parents=True, exist_ok=True)
    config = SessionConfig(out_dir=tmp_path / "out", budget_s=budget_s, root=root)
    summary = run_session(stages, probe, config)
    return summary, {r.name: r for r in summary.stages}, root


def test_a_failing_stage_does_not_stop_the_next(tmp_path):
    _, results, _ = _run(
        tmp_path, [_stage("fails", "raise SystemExit(3)"), _stage("runs", "print('hello')")]
    )
    assert (results["fails"].status, results["fails"].rc) == ("failed", 3)
    assert (results["runs"].status, results["runs"].rc) == ("ok", 0)
    assert "hello" in (tmp_path / "out" / "gpu_session.log").read_text()


def test_a_stage_over_its_cap_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    _, results, _ = _run(tmp_path, [_stage("sleepy", code, cap_s=3), _stage("after", "pass")])
    assert results["sleepy"].status == "timeout"
    assert "killed after its cap" in results["sleepy"].reason
    assert results["after"].status == "ok"
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the kernel reaps it shortly after the group's SIGTERM
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} outlived its stage's kill")


def test_a_stage_whose_estimate_does_not_fit_is_skipped_and_later_ones_still_run(tmp_path):
    stages = [_stage("long", "pass", estimate_s=100), _stage("short", "pass", estimate_s=1)]
    _, results, _ = _run(tmp_path, stages, budget_s=PACK_RESERVE_S + 20)
    assert results["long"].status == "skipped"
    assert "does not fit" in results["long"].reason
    assert results["short"].status == "ok"


def test_gpu_and_deepspeed_stages_are_skipped_on_a_cpu_machine(tmp_path):
    stages = [
        _stage("gpu", "pass", needs_gpu=True),
        _stage("ds", "pass", needs_deepspeed=True),
    ]
    _, results, _ = _run(tmp_path, stages)
    assert results["gpu"].status == "skipped"
    assert "torch.cuda.is_available() is False" in results["gpu"].reason
    assert "needs deepspeed" in results["ds"].reason


def test_a_stage_whose_input_is_missing_is_skipped_not_failed(tmp_path):
    stage = _stage("needs", "pass", requires=("{session}/report.csv",))
    _, results, _ = _run(tmp_path, [stage])
    assert results["needs"].status == "skipped"
    assert "gpu_session/report.csv (an earlier stage)" in results["needs"].reason


def test_the_tarball_holds_what_stages_wrote_and_the_summary(tmp_path):
    write = (
        "import pathlib; p = pathlib.Path('experiments/results/{machine}/bench.csv'); "
        "p.parent.mkdir(parents=True, exist_ok=True); p.write_text('a,b\\n1,2\\n')"
    )
    _, _, _ = _run(tmp_path, [_stage("writes", write)])
    with tarfile.open(tmp_path / "out" / "gpu_results.tar.gz") as tar:
        names = set(tar.getnames())
        bench = tar.extractfile("experiments/results/test-machine/bench.csv").read()
    assert bench == b"a,b\n1,2\n"
    assert "experiments/results/test-machine/gpu_session/summary.json" in names
    assert "experiments/results/test-machine/gpu_session/gpu_session.log" in names
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["stages"][0]["status"] == "ok"
    assert "experiments/results/test-machine/bench.csv" in saved["packed_files"]


def test_files_that_were_there_before_and_did_not_change_are_not_packed(tmp_path):
    root = tmp_path / "repo"
    old = root / "experiments" / "results" / "cpu-2core" / "old.csv"
    old.parent.mkdir(parents=True)
    old.write_text("x\n")
    summary, _, _ = _run(tmp_path, [_stage("quiet", "pass")])
    assert "experiments/results/cpu-2core/old.csv" not in summary.packed_files


def _tarball(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_unpack_writes_results_into_the_repo(tmp_path):
    tarball = _tarball(tmp_path / "t.tar.gz", {"experiments/results/gpu/a.csv": b"x\n"})
    assert unpack(tarball, root=tmp_path / "repo") == ["experiments/results/gpu/a.csv"]
    assert (tmp_path / "repo/experiments/results/gpu/a.csv").read_bytes() == b"x\n"


@pytest.mark.parametrize(
    "name, why",
    [
        ("experiments/results/../../evil.txt", "has '..'"),
        ("../evil.txt", "has '..'"),
        ("offload/enable.py", "outside experiments/results/ and docs/"),
        ("experiments/resultsX/a.csv", "outside"),
    ],
)
def test_unpack_refuses_paths_outside_results_and_docs_and_writes_nothing(tmp_path, name, why):
    members = {"experiments/results/gpu/ok.csv": b"ok\n", name: b"evil\n"}
    tarball = _tarball(tmp_path / "t.tar.gz", members)
    with pytest.raises(ValueError, match="was not unpacked") as refused:
        unpack(tarball, root=tmp_path / "repo")
    assert why in str(refused.value)
    assert not (tmp_path / "repo").exists()


def test_unpack_refuses_links(tmp_path):
    tarball = _tarball(tmp_path / "t.tar.gz", {}, link="experiments/results/gpu/link")
    with pytest.raises(ValueError, match="links are refused"):
        unpack(tarball, root=tmp_path / "repo")
