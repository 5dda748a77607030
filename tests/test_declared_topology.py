import re
from pathlib import Path

import pytest
import yaml

from allocators.declared_topology import SHIPPED_DIR, load_declared, shipped_topologies
from allocators.errors import TopologyError

GIB = 1024**3


def write(tmp_path: Path, doc: dict | str, name: str = "box.yaml") -> Path:
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def machine(**changes) -> dict:
    doc = {
        "schema": "offload-topology/1",
        "nodes": [
            {"id": 0, "cpus": "0-15", "capacity": "128GiB"},
            {"id": 1, "capacity": "64GiB"},
        ],
    }
    doc.update(changes)
    return doc


def load_error(tmp_path: Path, doc: dict | str) -> str:
    with pytest.raises(TopologyError) as info:
        load_declared(write(tmp_path, doc))
    return str(info.value)


def test_paper_1aic_is_one_dram_node_with_cpus_and_one_cxl_node():
    topo = load_declared("paper-1aic")
    assert [(n.id, n.kind, n.has_cpus) for n in topo.nodes] == [
        (0, "dram", True),
        (1, "cxl", False),
    ]
    assert topo.gpus[0].numa_node == 0


def test_paper_2aic_has_two_cxl_nodes_as_cxl_tiers():
    tiers = load_declared("paper-2aic").tiers
    assert [n.id for n in tiers.local_dram] == [0]
    assert [n.id for n in tiers.cxl] == [1, 2]


def test_paper_files_carry_the_published_dma_rates_and_latencies():
    topo = load_declared("paper-1aic")
    local, cxl = topo.node(0).rates, topo.node(1).rates
    assert (local.h2d_gib_per_s, local.d2h_gib_per_s) == (51.8, 51.7)
    assert (cxl.h2d_gib_per_s, cxl.d2h_gib_per_s) == (49.8, 34.7)
    assert (local.latency_ns, cxl.latency_ns) == (120.0, 250.0)


def test_every_shipped_file_loads():
    assert set(shipped_topologies()) >= {"paper-1aic", "paper-2aic"}
    for name in shipped_topologies():
        assert load_declared(name).name == name


def test_short_name_and_path_load_the_same_topology():
    by_name = load_declared("paper-2aic")
    by_path = load_declared(SHIPPED_DIR / "paper-2aic.yaml")
    assert by_name == by_path


def test_unknown_name_lists_the_shipped_files():
    with pytest.raises(
        TopologyError, match="no topology file 'paper-9aic'.*paper-1aic, paper-2aic"
    ):
        load_declared("paper-9aic")


def test_cpus_may_be_a_range_string_or_a_list(tmp_path):
    doc = machine()
    doc["nodes"][0]["cpus"] = [3, 0, 1, 2]
    assert load_declared(write(tmp_path, doc)).node(0).cpus == (0, 1, 2, 3)
    doc["nodes"][0]["cpus"] = "0-3"
    assert load_declared(write(tmp_path, doc)).node(0).cpus == (0, 1, 2, 3)


def test_free_defaults_to_capacity(tmp_path):
    node = load_declared(write(tmp_path, machine())).node(1)
    assert node.total_bytes == node.free_bytes == 64 * GIB


def test_kind_defaults_to_dram_with_cpus_and_cxl_without(tmp_path):
    topo = load_declared(write(tmp_path, machine()))
    assert (topo.node(0).kind, topo.node(1).kind) == ("dram", "cxl")


def test_default_distances_put_cxl_near_its_home_node(tmp_path):
    doc = machine(
        nodes=[
            {"id": 0, "cpus": "0-7", "capacity": "64GiB"},
            {"id": 1, "cpus": "8-15", "capacity": "64GiB"},
            {"id": 2, "capacity": "128GiB"},
            {"id": 3, "capacity": "128GiB", "attached_to": 1},
        ]
    )
    topo = load_declared(write(tmp_path, doc))
    assert topo.distances[0] == {0: 10, 1: 21, 2: 14, 3: 24}
    assert topo.distances[3] == {0: 24, 1: 14, 2: 26, 3: 10}
    assert any("distances not declared" in note for note in topo.notes)


def test_declared_distances_are_used_in_node_order(tmp_path):
    topo = load_declared(write(tmp_path, machine(distances=[[10, 17], [17, 10]])))
    assert topo.distance(0, 1) == 17


def test_gpu_hbm_and_node_are_read(tmp_path):
    doc = machine(gpus=[{"index": 0, "name": "H100", "numa_node": 0, "hbm": "80GiB"}])
    (gpu,) = load_declared(write(tmp_path, doc)).gpus
    assert (gpu.name, gpu.numa_node, gpu.total_bytes, gpu.source) == (
        "H100",
        0,
        80 * GIB,
        "declared",
    )


def test_bad_size_names_the_key_path_and_the_fix(tmp_path):
    doc = machine()
    doc["nodes"][1]["capacity"] = "64 gigs"
    message = load_error(tmp_path, doc)
    assert "box.yaml: nodes[1].capacity = '64 gigs' is not a size; write '64GiB'" in message


def test_unknown_key_is_rejected_with_the_allowed_ones(tmp_path):
    doc = machine()
    doc["nodes"][0]["capcity"] = "1GiB"
    message = load_error(tmp_path, doc)
    assert "nodes[0]: unknown key 'capcity' (did you mean 'capacity'?)" in message
    assert "allowed: id, kind, cpus, capacity, free" in message


def test_unknown_rate_key_is_rejected(tmp_path):
    doc = machine()
    doc["nodes"][1]["rates"] = {"latency": 250}
    assert re.search(
        r"nodes\[1\]\.rates: unknown key 'latency'.*latency_ns", load_error(tmp_path, doc)
    )


def test_missing_schema_says_what_to_write(tmp_path):
    doc = machine()
    del doc["schema"]
    assert "start the file with 'schema: offload-topology/1'" in load_error(tmp_path, doc)


def test_other_schema_versions_are_refused(tmp_path):
    assert "schema = 'offload-topology/2' is not supported" in load_error(
        tmp_path, machine(schema="offload-topology/2")
    )


def test_cxl_node_with_cpus_is_refused(tmp_path):
    doc = machine()
    doc["nodes"][1].update(kind="cxl", cpus="16-17")
    assert "nodes[1]: kind 'cxl' with cpus '16-17'" in load_error(tmp_path, doc)


def test_repeated_node_ids_are_refused(tmp_path):
    doc = machine()
    doc["nodes"][1]["id"] = 0
    assert "nodes[1].id = 0 repeats nodes[0].id" in load_error(tmp_path, doc)


def test_a_cpu_in_two_nodes_is_refused(tmp_path):
    doc = machine()
    doc["nodes"][1]["cpus"] = "15-16"
    assert "nodes[1].cpus: CPU 15 is already in nodes[0]" in load_error(tmp_path, doc)


def test_free_above_capacity_is_refused(tmp_path):
    doc = machine()
    doc["nodes"][1]["free"] = "65GiB"
    assert "nodes[1].free = '65GiB' is more than capacity '64GiB'" in load_error(tmp_path, doc)


def test_distance_matrix_of_the_wrong_shape_is_refused(tmp_path):
    message = load_error(tmp_path, machine(distances=[[10, 21]]))
    assert "write 2 rows of 2 numbers, in the order of nodes (ids [0, 1])" in message


def test_distance_diagonal_must_be_10(tmp_path):
    message = load_error(tmp_path, machine(distances=[[10, 21], [21, 12]]))
    assert "distances[1][1] = 12: the diagonal is 10" in message


def test_gpu_on_a_node_without_cpus_is_refused(tmp_path):
    doc = machine(gpus=[{"index": 0, "numa_node": 1, "hbm": "80GiB"}])
    assert "gpus[0].numa_node = 1 is not a node with cpus" in load_error(tmp_path, doc)


def test_attached_to_must_name_a_cpu_node(tmp_path):
    doc = machine()
    doc["nodes"][1]["attached_to"] = 1
    assert "nodes[1].attached_to = 1" in load_error(tmp_path, doc)


def test_non_positive_rate_is_refused(tmp_path):
    doc = machine()
    doc["nodes"][1]["rates"] = {"h2d_gib_per_s": 0}
    assert "nodes[1].rates.h2d_gib_per_s = 0 is not a positive number of GiB/s" in load_error(
        tmp_path, doc
    )


def test_invalid_yaml_reports_the_line(tmp_path):
    text = "schema: offload-topology/1\nnodes:\n  - id: 0\n   cpus: [0\n"
    assert re.search(r"box\.yaml: not valid YAML at line \d+", load_error(tmp_path, text))


def test_document_that_is_not_a_mapping_is_refused(tmp_path):
    assert "the document must be a mapping" in load_error(tmp_path, "- just\n- a list\n")
