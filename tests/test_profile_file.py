"""The profile JSON: round trip, per-node rates for the planner, and validation errors by key."""

import dataclasses
import json

import pytest

from allocators.topology import NodeRates, NumaNode, Topology
from profilers.machine_info import MachineInfo, Versions
from profilers.machine_profile import (
    SCHEMA,
    MachineProfile,
    NodeProfile,
    ProfileError,
    load_profile,
    merge_profiles,
)
from profilers.profile_rates import build_profile, node_rates
from profilers.result_row import ResultRow, read_rows_csv, write_rows_csv
from profilers.trial_stats import TrialStats


def _profile() -> MachineProfile:
    return MachineProfile(
        created_utc="2026-01-01T00:00:00Z",
        machine=MachineInfo("host", "Some CPU", 16, 32, 128 << 30),
        versions=Versions("3.11.7", "2.13.0", "13.0", "580.1", "0.1.0"),
        topology={"nodes": [{"id": 0}, {"id": 2}]},
        nodes={
            0: NodeProfile(latency_ns=112.0, read_gib_per_s=60.0, h2d_gib_per_s=51.8),
            2: NodeProfile(latency_ns=250.0, d2h_gib_per_s=34.7, pin_s_per_gib=0.2),
        },
        skipped=("bandwidth: no GPU",),
    )


def _written(tmp_path, data) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


def test_round_trip_keeps_every_field(tmp_path):
    profile = _profile()
    assert load_profile(profile.save(tmp_path / "p.json")) == profile


def test_file_says_its_schema(tmp_path):
    data = json.loads(_profile().save(tmp_path / "p.json").read_text())
    assert data["schema"] == SCHEMA == "offload-profile/1"


def test_to_node_rates_gives_topology_rates():
    rates = _profile().to_node_rates()
    assert rates[0] == NodeRates(latency_ns=112.0, read_gib_per_s=60.0, h2d_gib_per_s=51.8)
    assert rates[2].d2h_gib_per_s == 34.7


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda d: d.pop("machine"), "'machine'"),
        (lambda d: d["machine"].pop("cores"), "'machine.cores'"),
        (lambda d: d["machine"].update(cores="sixteen"), "'machine.cores'"),
        (lambda d: d["machine"].update(cores=True), "'machine.cores'"),
        (lambda d: d["versions"].update(torch=2), "'versions.torch'"),
        (lambda d: d["nodes"]["0"].update(latency_ns="fast"), "'nodes.0.latency_ns'"),
        (lambda d: d["nodes"]["0"].update(read_gib_per_s=-1.0), "'nodes.0.read_gib_per_s'"),
        (lambda d: d["nodes"]["0"].update(bogus_rate=1.0), "'nodes.0.bogus_rate'"),
        (lambda d: d["nodes"].update(zero={}), "'nodes.zero'"),
        (lambda d: d.update(schema="offload-profile/9"), "'schema'"),
    ],
)
def test_validation_error_names_the_key(tmp_path, mutate, key):
    data = _profile().to_dict()
    mutate(data)
    with pytest.raises(ProfileError, match=key):
        load_profile(_written(tmp_path, data))


def test_not_json_is_a_profile_error(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not JSON"):
        load_profile(path)


def test_merge_keeps_rates_the_new_run_did_not_measure():
    old = _profile()
    new = dataclasses.replace(old, nodes={0: NodeProfile(latency_ns=100.0)}, skipped=())
    merged = merge_profiles(old, new)
    assert merged.nodes[0].latency_ns == 100.0
    assert merged.nodes[0].read_gib_per_s == 60.0
    assert merged.nodes[2] == old.nodes[2]


def _row(benchmark, case, placement, nbytes, median, **extra):
    return ResultRow.from_stats(
        benchmark,
        case,
        placement,
        nbytes,
        "x",
        TrialStats(median, median, median, 5, False),
        **extra,
    )


def test_node_rates_pick_largest_latency_and_best_stream_rate():
    rows = [
        _row("latency", "chase", "node0", 16 << 10, 2.0, page_size="4KiB"),
        _row("latency", "chase", "node0", 1 << 30, 160.0, page_size="4KiB"),
        _row("latency", "chase", "node0", 1 << 30, 120.0, page_size="2MiB"),
        _row("memory", "read", "node0", 1 << 28, 8.0, threads=1),
        _row("memory", "read", "node0", 1 << 28, 15.0, threads=2),
        _row("memory", "read", "node0:1+node2:1", 1 << 28, 99.0, threads=2),
        _row("bandwidth", "h2d", "node0", 1 << 31, 50.0, memory="pinned", streams=1),
        _row("bandwidth", "h2d", "node0", 1 << 20, 20.0, memory="pinned", streams=1),
        _row("optimizer", "adamw", "node0", 0, 10.0, elements=10_000_000),
    ]
    rates = node_rates(rows)
    assert list(rates) == [0]
    assert rates[0].latency_ns == 120.0
    assert rates[0].read_gib_per_s == 15.0
    assert rates[0].h2d_gib_per_s == 50.0
    assert rates[0].adamw_elements_per_s == pytest.approx(1e9)


def test_built_profile_survives_a_file_round_trip(tmp_path):
    node = NumaNode(id=0, kind="dram", cpus=(0, 1), total_bytes=1 << 30, free_bytes=1 << 29)
    topo = Topology(nodes=(node,), distances={0: {0: 10}}, gpus=(), source="test")
    rows = [_row("latency", "chase", "node0", 1 << 28, 150.0, kernel="c")]
    profile = build_profile(rows, topo, skipped=["bandwidth: no CUDA GPU"])
    loaded = load_profile(profile.save(tmp_path / "profile.json"))
    assert loaded.nodes[0].latency_ns == 150.0
    assert loaded.topology["nodes"][0]["id"] == 0
    assert loaded.skipped == ("bandwidth: no CUDA GPU",)


def test_rows_csv_round_trip(tmp_path):
    rows = [
        _row("latency", "chase", "node0", 1 << 28, 150.0, page_size="2MiB", thp_fraction=1.0),
        _row("memory", "copy", "node0", 1 << 28, 10.0, threads=2, degraded=True, note="numpy"),
    ]
    assert read_rows_csv(write_rows_csv(rows, tmp_path / "rows.csv")) == rows
