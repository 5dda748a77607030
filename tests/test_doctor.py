"""`offload doctor`: each check on sysfs fixtures or monkeypatched inputs, exit codes and --json."""

import errno
import json
import resource
from pathlib import Path

import pytest

from allocators import numa
from allocators.cli_app import run_subcommands
from allocators.sysfs_topology import discover
from offload.tools import doctor
from offload.tools.doctor import PinProbe

FIXTURES = Path(__file__).parent / "fixtures" / "sysfs"


def topo(name):
    return discover(FIXTURES / name, use_nvml=False)


def doctor_cli(*argv):
    return run_subcommands("offload", "x", ["offload.tools.doctor_cli"], ["doctor", *argv])


@pytest.fixture
def quiet_machine(monkeypatch):
    """No GPU, an unlimited memlock limit: only the check under test can fail or warn."""
    monkeypatch.setattr(doctor, "nvml_gpu_count", lambda: (None, "no NVML library"))
    monkeypatch.setattr(doctor, "torch_cuda_count", lambda: (0, "a CPU-only torch build"))
    monkeypatch.setattr(doctor, "read_memlock_limit", lambda: resource.RLIM_INFINITY)


def test_movable_cxl_node_warns_with_the_fix():
    result = doctor.check_cxl_movable(topo("cxl-movable"))
    assert result.status == "warn"
    assert "[1]" in result.finding and "ZONE_MOVABLE" in result.finding
    assert "online_kernel" in result.fix


def test_cxl_online_as_kernel_memory_is_ok():
    assert doctor.check_cxl_movable(topo("one-socket-one-cxl")).status == "ok"
    assert doctor.check_cxl_movable(topo("this-machine")).finding == "no CXL nodes"


def test_pinning_that_migrates_pages_off_the_cxl_node_fails():
    moved = PinProbe(pinned=True, reason=None, pages_per_node={0: 1000, 1: 24})
    [result] = doctor.check_cxl_pin(topo("cxl-movable"), True, None, probe=lambda node: moved)
    assert result.status == "fail"
    assert "1000 of 1024 pages left node 1" in result.finding and "--no-movable" in result.fix


def test_pinning_that_keeps_pages_on_the_cxl_node_is_ok():
    kept = PinProbe(pinned=True, reason=None, pages_per_node={1: 1024})
    [result] = doctor.check_cxl_pin(topo("cxl-movable"), True, None, probe=lambda node: kept)
    assert result.status == "ok"


def test_a_refused_pin_warns_and_points_at_memlock():
    refused = PinProbe(pinned=False, reason="cudaError 2: out of memory", pages_per_node={1: 1024})
    [result] = doctor.check_cxl_pin(topo("cxl-movable"), True, None, probe=lambda node: refused)
    assert result.status == "warn" and "out of memory" in result.finding
    assert "memlock" in result.fix


def test_pin_test_is_skipped_without_cuda_or_on_a_captured_tree():
    def never(node):
        raise AssertionError("probed")

    [no_cuda] = doctor.check_cxl_pin(topo("cxl-movable"), True, "CPU-only torch", probe=never)
    [captured] = doctor.check_cxl_pin(topo("cxl-movable"), False, None, probe=never)
    assert no_cuda.status == captured.status == "skipped"
    assert "CPU-only torch" in no_cuda.finding and "captured" in captured.finding


def test_mbind_on_this_machine_is_allowed():
    assert doctor.check_mbind(0, doctor.read_cap_eff()).status == "ok"


def test_mbind_eperm_fails_with_the_cap_sys_nice_fix(monkeypatch):
    monkeypatch.setattr(numa, "_warned", set())
    real = numa._syscall
    monkeypatch.setattr(
        numa, "_syscall", lambda name, *a: (-1, errno.EPERM) if name == "mbind" else real(name, *a)
    )
    result = doctor.check_mbind(0, cap_eff=0)
    assert result.status == "fail"
    assert "CAP_SYS_NICE is not set" in result.finding and "--cap-add SYS_NICE" in result.fix


def test_cap_eff_is_read_from_proc_status(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nCapEff:\t0000000000804000\n")
    cap_eff = doctor.read_cap_eff(status)
    assert doctor.has_cap(cap_eff, doctor.CAP_SYS_NICE) and doctor.has_cap(
        cap_eff, doctor.CAP_IPC_LOCK
    )
    assert not doctor.has_cap(cap_eff, 0)


@pytest.mark.parametrize(
    ("enabled", "defrag", "status"),
    [
        ("always [madvise] never", "always defer [madvise] never", "ok"),
        ("always madvise [never]", "always defer madvise [never]", "warn"),
        ("[always] madvise never", "always defer madvise [never]", "warn"),
    ],
)
def test_transparent_huge_pages_warn_on_never(tmp_path, enabled, defrag, status):
    thp = tmp_path / "kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "enabled").write_text(enabled + "\n")
    (thp / "defrag").write_text(defrag + "\n")
    result = doctor.check_thp(tmp_path)
    assert result.status == status
    assert ("echo madvise" in result.fix) == (status == "warn")


def test_thp_is_skipped_when_the_tree_has_no_setting():
    assert doctor.check_thp(FIXTURES / "cxl-movable").status == "skipped"


def test_budgets_above_free_memory_fail_naming_node_and_numbers():
    result = doctor.check_budgets(topo("cxl-movable"), {"dram": "100GiB", "cxl": "1GiB"})
    assert result.status == "fail"
    assert "node 0 (dram): budget 100 GiB > free 60.00 GiB" in result.finding
    assert "node 1" not in result.finding


def test_budgets_within_free_memory_pass():
    assert doctor.check_budgets(topo("cxl-movable"), {"dram": "8GiB", "cxl": "8GiB"}).status == "ok"


def test_a_cxl_budget_on_a_machine_without_cxl_fails():
    result = doctor.check_budgets(topo("this-machine"), {"dram": "1GiB", "cxl": "64GiB"})
    assert result.status == "fail" and "no cxl node" in result.finding


def test_no_budgets_skip_the_budget_check():
    assert doctor.check_budgets(topo("cxl-movable"), None).status == "skipped"


@pytest.mark.parametrize(
    ("limit", "cap_eff", "uid", "needed", "status"),
    [
        (8 << 20, 0, 1000, 64 << 30, "warn"),
        (8 << 20, 0, 1000, None, "warn"),
        (128 << 30, 0, 1000, 64 << 30, "ok"),
        (resource.RLIM_INFINITY, 0, 1000, 64 << 30, "ok"),
        (8 << 20, 1 << doctor.CAP_IPC_LOCK, 1000, 64 << 30, "ok"),
        (8 << 20, 0, 0, 64 << 30, "ok"),
    ],
)
def test_a_low_memlock_limit_warns_unless_root_or_cap_ipc_lock(limit, cap_eff, uid, needed, status):
    result = doctor.check_memlock(limit, cap_eff, uid, needed)
    assert result.status == status
    assert ("ulimit -l" in result.fix) == (status == "warn")


def test_no_gpu_gives_skipped_lines():
    results = doctor.check_gpus((None, "no NVML"), (0, "CPU-only torch"), None)
    assert [(r.check, r.status) for r in results] == [("nvml", "skipped"), ("cuda", "skipped")]


def test_a_gpu_hidden_by_cuda_visible_devices_fails():
    nvml_line, cuda_line = doctor.check_gpus((2, None), (0, "no visible GPU"), "")
    assert nvml_line.status == "ok" and cuda_line.status == "fail"
    assert "CUDA_VISIBLE_DEVICES=''" in cuda_line.finding and "unset" in cuda_line.fix


def test_visible_gpus_are_ok():
    results = doctor.check_gpus((1, None), (1, None), "0")
    assert [r.status for r in results] == ["ok", "ok"]


def test_exit_code_is_0_when_nothing_fails(quiet_machine, capsys):
    assert doctor_cli("--sysfs-root", str(FIXTURES / "this-machine")) == 0
    assert "offload doctor" in capsys.readouterr().out


def test_exit_code_is_1_when_a_check_fails(quiet_machine, capsys):
    root = str(FIXTURES / "cxl-movable")
    assert doctor_cli("--sysfs-root", root, "--budget", "dram=1TiB") == 1
    assert "fail" in capsys.readouterr().out


def test_json_output_parses_and_lists_every_check(quiet_machine, capsys):
    root = str(FIXTURES / "cxl-movable")
    assert doctor_cli("--sysfs-root", root, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] is False
    statuses = {c["check"]: c["status"] for c in report["checks"]}
    assert statuses["cxl movable"] == "warn" and statuses["cxl pin node 1"] == "skipped"
    assert statuses["nvml"] == statuses["cuda"] == statuses["budgets"] == "skipped"


def test_config_budgets_are_checked_and_budget_flags_override_them(quiet_machine, tmp_path, capsys):
    config = tmp_path / "offload.yaml"
    config.write_text("budgets:\n  dram: 1TiB\n  cxl: 1GiB\n")
    root = str(FIXTURES / "cxl-movable")
    assert doctor_cli("--sysfs-root", root, "--config", str(config), "--json") == 1
    capsys.readouterr()
    assert doctor_cli("--sysfs-root", root, "--config", str(config), "--budget", "dram=1GiB") == 0


def test_a_malformed_budget_flag_says_what_to_write(quiet_machine, capsys):
    assert doctor_cli("--sysfs-root", str(FIXTURES / "cxl-movable"), "--budget", "dram") == 2
    assert "--budget dram=64GiB" in capsys.readouterr().err


def _model_fits(capsys, fixture: str, *flags: str) -> tuple[int, dict]:
    root = str(FIXTURES / fixture)
    code = doctor_cli(
        "--sysfs-root", root, "--model", "llama-1.1b", "--seq", "8192", "--json", *flags
    )
    checks = json.loads(capsys.readouterr().out)["checks"]
    return code, {c["check"]: c for c in checks}["model fits"]


def test_model_check_sizes_what_offload_enable_allocates(quiet_machine, capsys):
    """A 1.1B model at 8K with enable()'s default activations (every saved tensor of 1 MiB or
    more) needs about 31 GiB on the host: fits a two-socket server, not the captured CI machine
    (4 GiB free when it was captured)."""
    code, fits = _model_fits(capsys, "two-socket")
    assert code == 0 and fits["status"] == "ok"
    assert "activations='saved_tensors' needs 30.79 GiB" in fits["finding"]
    assert "latency_critical" in fits["finding"]
    code, fits = _model_fits(capsys, "this-machine")
    assert code == 1 and fits["status"] == "fail" and "shorten the sequence" in fits["fix"]


def test_model_check_says_what_each_activation_mode_needs(quiet_machine, capsys):
    _, saved = _model_fits(capsys, "two-socket")
    assert "activations='checkpoint' needs 16.16 GiB" in saved["finding"]
    _, checkpoint = _model_fits(capsys, "two-socket", "--activations", "checkpoint")
    assert "with activations='checkpoint' needs 16.16 GiB" in checkpoint["finding"]
    assert "activations='saved_tensors' needs 30.79 GiB" in checkpoint["finding"]
    _, chunked = _model_fits(capsys, "two-socket", "--loss-chunk-tokens", "4096")
    assert "with activations='saved_tensors' needs 29.79 GiB" in chunked["finding"]


def test_model_check_against_budgets_and_bad_input(quiet_machine, capsys):
    from offload.planning.model_shapes import MODELS
    from offload.tools.doctor_model_fit import ModelWorkload, check_model_fits

    work = ModelWorkload(MODELS["llama-1.1b"], seq=8192)
    result = check_model_fits(topo("two-socket"), work, budget_nbytes=1 << 30)
    assert result.status == "fail" and result.fix.startswith("raise the budgets")
    assert doctor_cli("--model", "llama-1.1b", "--seq", "0") == 2
    assert "--seq 0 must be at least 1" in capsys.readouterr().err
    assert doctor_cli("--model", "llama-1.1b", "--loss-chunk-tokens", "0") == 2
    assert "--loss-chunk-tokens 0 must be at least 1" in capsys.readouterr().err
    assert doctor_cli("--model", "no-such-model") == 2
