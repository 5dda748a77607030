"""The live dashboard: the panel shows every field of a snapshot, a non-terminal gets one log line
per step, the thread ends with the session, and turning it on changes no loss."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import offload
from allocators.declared_topology import load_declared
from allocators.errors import ConfigError
from allocators.sysfs_topology import discover
from offload.tools.dashboard import DashboardSnapshot, MemoryBar, log_line, render_dashboard
from offload.tools.dashboard_thread import DashboardThread, SessionProbe
from offload.tools.tiny_finetune import tiny_llama as shared_tiny_llama
from offload.tools.tiny_finetune import train_steps
from offload.tools.transfer_ceilings import transfer_ceilings

pytest.importorskip("transformers")

BUDGETS = {"dram": "1GiB"}
PROFILE = Path(__file__).parent.parent / "experiments" / "results" / "cpu-2core" / "profile.json"

FULL = DashboardSnapshot(
    step=41,
    memory=(
        MemoryBar("HBM cuda:0", 30 << 30, 80 << 30),
        MemoryBar("DRAM node 0", 3 << 30, 64 << 30),
        MemoryBar("CXL node 2", 5 << 30, 256 << 30),
    ),
    forward_ms=101.5,
    backward_ms=202.5,
    optimizer_ms=33.5,
    wait_ms=7.25,
    h2d_gb_per_s=12.34,
    d2h_gb_per_s=23.45,
    h2d_ceiling_gb_per_s=55.6,
    d2h_ceiling_gb_per_s=37.3,
    ceiling_source="profile h100.json",
    hidden_transfer_fraction=0.87,
    optimizer_elements_per_s=1.23e9,
    steps_per_s=2.96,
    tokens_per_s=24242.0,
)


def rendered(snapshot: DashboardSnapshot) -> str:
    console = Console(record=True, width=120, file=io.StringIO())
    console.print(render_dashboard(snapshot))
    return console.export_text()


@pytest.fixture(scope="module")
def topology():
    return discover()


def tiny_llama() -> nn.Module:
    return shared_tiny_llama(0, hidden=64, layers=2, vocab=128)


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 32), generator=gen) for _ in range(n)]


def train(model, optimizer, data) -> list[float]:
    return list(train_steps(model, optimizer, data))


def dashboard_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "offload-dashboard"]


def dashboard_of(sess) -> DashboardThread | None:
    """The dashboard enable() subscribed to the session, if any."""
    return next((s for s in sess.subscribers if isinstance(s, DashboardThread)), None)


def test_panel_shows_every_field():
    text = rendered(FULL)
    for expected in (
        "step 41",
        "HBM cuda:0",
        "30.00 GiB",
        "80.00 GiB",
        "DRAM node 0",
        "64.00 GiB",
        "CXL node 2",
        "256 GiB",
        "H2D",
        "12.34",
        "55.6",
        "D2H",
        "23.45",
        "37.3",
        "ceiling from profile h100.json",
        "forward",
        "101.5",
        "backward",
        "202.5",
        "optimizer",
        "33.5",
        "waiting",
        "7.2",
        "337.5 ms",
        "hidden transfer 87%",
        "1.23e+09 elements/s",
        "2.96 steps/s",
        "24,242 tokens/s",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_panel_without_ceiling_or_tokens_says_so():
    snapshot = DashboardSnapshot(
        step=0,
        memory=FULL.memory[1:2],
        forward_ms=1.0,
        backward_ms=2.0,
        optimizer_ms=3.0,
        wait_ms=0.0,
        steps_per_s=1.0,
    )
    text = rendered(snapshot)
    assert "no ceiling measured" in text
    assert "- tokens/s" in text
    assert "HBM" not in text


def test_panel_before_the_first_step_shows_memory_only():
    text = rendered(DashboardSnapshot(step=None, memory=FULL.memory[1:2]))
    assert "DRAM node 0" in text
    assert "waiting for the first optimizer step" in text


def test_log_line_holds_every_field_on_one_line():
    line = log_line(FULL)
    assert "\n" not in line
    for expected in ("step 41", "forward 101.5 ms", "waiting 7.2 ms", "h2d 12.34 GB/s",
                     "d2h 23.45 GB/s", "ceiling from profile h100.json", "hidden 87%",
                     "1.23e+09 elements/s", "2.96 steps/s", "24,242 tokens/s",
                     "CXL node 2 5.00 GiB / 256 GiB"):  # fmt: skip
        assert expected in line


def test_ceilings_come_from_the_declared_topology():
    topo = load_declared("paper-1aic")
    ceilings = transfer_ceilings(topo, None, [0, 1])
    assert ceilings.source.startswith("declared rates")
    assert ceilings.h2d_gb_per_s == pytest.approx(51.8 * 1.073741824)
    assert ceilings.d2h_gb_per_s == pytest.approx(51.7 * 1.073741824)
    assert transfer_ceilings(topo, None, [1]).d2h_gb_per_s == pytest.approx(34.7 * 1.073741824)


def test_ceilings_come_from_the_profile_over_the_topology(tmp_path):
    data = json.loads(PROFILE.read_text())
    data["nodes"]["0"]["h2d_gib_per_s"] = 20.0
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    ceilings = transfer_ceilings(load_declared("paper-1aic"), str(path), [0])
    assert ceilings.source == f"profile {path}"
    assert ceilings.h2d_gb_per_s == pytest.approx(20.0 * 1.073741824)
    assert ceilings.d2h_gb_per_s is None


def test_no_rates_means_no_ceiling(topology):
    assert transfer_ceilings(topology, None, [0]).source is None


def test_non_terminal_prints_one_log_line_per_step(topology, capsys, monkeypatch):
    # These make rich treat any output as a terminal.
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology, dashboard=True):
        train(model, opt, batches(3))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("offload ")]
    assert [line.split(":")[0] for line in lines] == [f"offload step {i}" for i in range(3)]
    assert all("tokens/s" in line and "DRAM node 0" in line for line in lines)
    # 2 x 32 token ids per step were seen by the forward pre-hook.
    assert "- tokens/s" not in lines[-1]


def test_thread_stops_on_disable(topology):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sess = offload.enable(model, opt, budgets=BUDGETS, topology=topology, dashboard=True)
    assert len(dashboard_threads()) == 1
    train(model, opt, batches(1))
    sess.disable()
    assert dashboard_threads() == []
    assert not model._forward_pre_hooks


def test_thread_stops_on_an_exception_in_the_with_block(topology):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match="boom"):
        with offload.enable(model, opt, budgets=BUDGETS, topology=topology, dashboard=True):
            assert len(dashboard_threads()) == 1
            raise RuntimeError("boom")
    assert dashboard_threads() == []


def test_dashboard_does_not_change_losses(topology):
    results = []
    for dashboard in (False, True):
        model = tiny_llama()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with offload.enable(
            model, opt, budgets=BUDGETS, topology=topology, dashboard=dashboard
        ) as sess:
            results.append(train(model, opt, batches(4)))
            assert (dashboard_of(sess) is not None) == dashboard
    assert results[0] == results[1]


def test_terminal_gets_the_live_panel(topology):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology) as sess:
        dash = DashboardThread(
            sess, sess.optimizer_offload, console=console, refresh_per_s=50
        ).start()
        for _ in range(2):
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
        dash.stop()
        snapshot = dash.probe.latest()
    assert not dash.running
    assert "memory: used / budget" in out.getvalue()
    assert "step 1" in out.getvalue()
    # Float inputs carry no token ids; steps and optimizer elements are still counted.
    assert snapshot.tokens_per_s is None
    assert snapshot.optimizer_elements_per_s is not None


def test_config_checks_and_reads_dashboard(monkeypatch):
    with pytest.raises(ConfigError, match="dashboard = 'yes' must be True or False"):
        offload.OffloadConfig(dashboard="yes")
    monkeypatch.setenv("OFFLOAD_DASHBOARD", "1")
    assert offload.OffloadConfig.from_kwargs(**offload.OffloadConfig.from_env()).dashboard


def test_a_failing_dashboard_logs_and_leaves_training_alone(topology, caplog, monkeypatch):
    def broken(self):
        raise RuntimeError("cannot read counters")

    monkeypatch.setattr(SessionProbe, "poll", broken)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology, dashboard=True) as sess:
        losses = train(model, opt, batches(2))
        dashboard_of(sess).stop()
    assert len(losses) == 2 and len(sess.report()) == 2
    assert "the offload dashboard failed and stopped" in caplog.text
    assert dashboard_threads() == []


def test_cpu_time_reads_the_running_thread_then_its_total(topology):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology) as sess:
        dash = DashboardThread(sess, sess.optimizer_offload, console=console, refresh_per_s=50)
        assert dash.cpu_time_s() == 0.0
        dash.start()
        first = dash.cpu_time_s()
        for _ in range(3):
            model(torch.randn(4, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
        running = dash.cpu_time_s()
        dash.stop()
    # The thread's own clock: it only grows, and no thread used more than the whole process.
    assert 0.0 <= first <= running <= time.process_time()
    assert dash.cpu_time_s() == dash.cpu_s >= running


def test_a_dashboard_started_mid_run_draws_only_the_steps_after_it(topology):
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        model(torch.randn(4, 16)).sum().backward()
        opt.step()
        opt.zero_grad()

    out = io.StringIO()
    with offload.enable(model, opt, budgets=BUDGETS, topology=topology) as sess:
        for _ in range(2):
            step()
        dash = DashboardThread(sess, sess.optimizer_offload, console=Console(file=out)).start()
        step()
        dash.stop()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["offload step 2"]
    # One step since the probe began: its rate counts that step, not the two before.
    assert dash.probe._marks[-1].steps - dash.probe._marks[0].steps == 1
