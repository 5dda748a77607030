"""Run records: sess.save() writes offload-run/1, load_run() reads it back typed, bad files name the key."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import offload
from allocators.declared_topology import load_declared
from allocators.sysfs_topology import discover
from offload.config import OffloadConfig
from offload.tools.run_record import SCHEMA, RunRecordError, load_run, record_run, run_summary
from offload.tools.tiny_finetune import tiny_llama
from offload.tools.transfer_ceilings import TransferCeilings

pytest.importorskip("transformers")

STEP_UNITS = ("_ms", "_nbytes", "_gb_per_s", "_fraction", "_threads")


def run_tiny(steps: int = 3):
    """A tiny Llama trained ``steps`` optimizer steps under offload.enable; the closed session."""
    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with offload.enable(
            model, opt, budgets={"dram": "1GiB"}, topology=discover(), activation_min_nbytes=0
        ) as sess:
            for _ in range(steps):
                ids = torch.randint(0, 128, (2, 16), generator=gen)
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
    return sess


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    sess = run_tiny()
    path = sess.save(tmp_path_factory.mktemp("run") / "run.json")
    return sess, path


def test_saved_run_round_trips(saved_run):
    sess, path = saved_run
    record = load_run(path)
    assert record.schema == SCHEMA
    assert record.config["budgets"] == {"dram": 1 << 30}
    assert record.topology["nodes"] and record.machine.torch == torch.__version__
    assert record.steps == sess.records
    assert record.steps_frame().equals(sess.report())


def test_report_columns_carry_their_units(saved_run):
    sess, _ = saved_run
    frame = sess.report()
    assert len(frame) == 3
    assert {"forward_ms", "backward_ms", "optimizer_ms", "wait_ms", "h2d_gb_per_s"} <= set(frame)
    assert {"d2h_gb_per_s", "hidden_transfer_fraction", "host_dram_nbytes"} <= set(frame)
    assert [c for c in frame.columns if c != "step" and not c.endswith(STEP_UNITS)] == []


def test_summary_is_medians_and_peaks(saved_run):
    sess, path = saved_run
    summary = run_summary(load_run(path))
    frame = sess.report()
    assert summary["steps"] == 3
    assert summary["forward_ms_median"] == pytest.approx(frame["forward_ms"].median())
    assert summary["host_dram_nbytes_max"] == frame["host_dram_nbytes"].max() > 0
    assert summary["peak_hbm_nbytes_max"] is None  # no GPU: nothing measured, not zero


def test_cpu_run_records_that_it_has_no_dma_and_no_ceiling(saved_run):
    _, path = saved_run
    record = load_run(path)
    assert not record.has_dma
    assert record.ceilings == TransferCeilings(None, None, None)
    summary = run_summary(record)
    assert summary["copy_kind"] == "host_memcpy"
    assert summary["h2d_ceiling_gb_per_s"] is None and summary["h2d_of_ceiling_fraction"] is None
    assert summary["ceiling_source"].startswith("none")


def test_record_saved_before_ceilings_still_loads(saved_run, tmp_path):
    _, path = saved_run
    old = edit(path, tmp_path, lambda d: d.pop("ceilings"))
    record = load_run(old)
    assert record.ceilings is None and record.steps == load_run(path).steps
    assert run_summary(record)["ceiling_source"].startswith("not recorded")


def test_ceilings_round_trip_through_json(tmp_path):
    ceilings = TransferCeilings(53.7, 55.0, "profile h100.json")
    record = dataclasses.replace(
        record_run(OffloadConfig(), None, discover(), []), ceilings=ceilings
    )
    assert load_run(record.save(tmp_path / "run.json")).ceilings == ceilings


def test_ceilings_cover_only_the_nodes_the_run_budgets():
    topology = load_declared("paper-1aic")
    declared = record_run(OffloadConfig(), None, topology, [])
    assert declared.ceilings.h2d_gb_per_s > 0
    assert declared.ceilings.source == "declared rates (declared:paper-1aic.yaml)"
    nothing = record_run(OffloadConfig(), None, topology, [], nodes=[])
    assert nothing.ceilings == TransferCeilings(None, None, None)


def test_bad_ceiling_is_named(saved_run, tmp_path):
    _, path = saved_run
    bad = edit(path, tmp_path, lambda d: d.update(ceilings={"h2d_gb_per_s": "fast"}))
    with pytest.raises(RunRecordError, match=r"'ceilings\.h2d_gb_per_s' = 'fast'"):
        load_run(bad)


def test_planned_run_records_its_plan(tmp_path):
    model = tiny_llama(0, hidden=64, layers=2, vocab=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(
        model, opt, policy="planned", budgets={"dram": "1GiB"}, topology=discover()
    ) as sess:
        path = sess.save(tmp_path / "planned.json")
    record = load_run(path)
    assert record.config["policy"] == "planned"
    assert record.plan is not None and record.plan.predicted_s["total"] > 0
    shares = [share for group in record.plan.placements.values() for _, share in group]
    assert shares and all(0 < s <= 1 for s in shares)


def edit(path, tmp_path, change):
    data = json.loads(path.read_text())
    change(data)
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(data))
    return out


def test_missing_key_is_named(saved_run, tmp_path):
    _, path = saved_run
    bad = edit(path, tmp_path, lambda d: d["machine"].pop("hostname"))
    with pytest.raises(RunRecordError, match=r"'machine\.hostname'"):
        load_run(bad)


def test_wrong_type_in_a_step_is_named(saved_run, tmp_path):
    _, path = saved_run
    bad = edit(path, tmp_path, lambda d: d["steps"][1].update(forward_ms="fast"))
    with pytest.raises(RunRecordError, match=r"'steps\.1\.forward_ms' = 'fast' must be a number"):
        load_run(bad)


def test_wrong_schema_says_what_was_expected(saved_run, tmp_path):
    _, path = saved_run
    bad = edit(path, tmp_path, lambda d: d.update(schema="offload-run/0"))
    with pytest.raises(RunRecordError, match="'offload-run/0' is not offload-run/1"):
        load_run(bad)


def test_not_json_is_an_error(tmp_path):
    bad = tmp_path / "run.json"
    bad.write_text("{not json")
    with pytest.raises(RunRecordError, match="is not JSON"):
        load_run(bad)
