"""Random and malformed settings, budgets and topology files: every one is either accepted or
refused with one of our errors and a message, never a TypeError or KeyError from deep inside."""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import fields

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocators.declared_topology import SHIPPED_DIR, load_declared, parse_declared
from allocators.errors import (
    BudgetExceededError,
    ConfigError,
    OffloadError,
    PlacementError,
    TopologyError,
)
from allocators.policies import parse_budgets
from allocators.units import parse_size
from offload.config import OffloadConfig, resolve_config

CLEAR_ERRORS = (ConfigError, TopologyError, PlacementError, BudgetExceededError)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SETTING_NAMES = [f.name for f in fields(OffloadConfig)]
PAPER = yaml.safe_load((SHIPPED_DIR / "paper-2aic.yaml").read_text())

sizes = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.builds(
        lambda number, point, unit: f"{number}{point}{unit}",
        st.integers(min_value=0, max_value=10**400),
        st.sampled_from(["", ".5", " ", "."]),
        st.sampled_from(["", "B", "KiB", " MiB", "GiB", "TB", "k", "gigs", "iB", "e3"]),
    ),
    st.text(max_size=12),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=10), sizes
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-3, 9)), inner, max_size=4),
    ),
    max_leaves=10,
)
known_values = {
    "activations": st.sampled_from(["off", "saved_tensors", "checkpoint", True, False, None]),
    "policy": st.sampled_from(["local_only", "naive_interleave", "cxl_aware", "planned"]),
    "budgets": st.dictionaries(st.sampled_from(["dram", "cxl", "remote_dram", "hbm"]), sizes),
}
setting_values = st.one_of(values, sizes, *known_values.values())
setting_kwargs = st.dictionaries(
    st.one_of(st.sampled_from(SETTING_NAMES), st.text(max_size=8)), setting_values, max_size=5
)


def refuses_clearly(call) -> object:
    """Run ``call``; an error must be one of ours with a message. Returns the result or None."""
    try:
        return call()
    except CLEAR_ERRORS as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


def in_file(text: str | bytes, call):
    """``call(path)`` on a temporary file holding ``text`` (hypothesis forbids tmp_path here)."""
    data = text.encode() if isinstance(text, str) else text
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as handle:
        handle.write(data)
    try:
        return call(handle.name)
    finally:
        os.unlink(handle.name)


@FUZZ
@given(setting_kwargs)
def test_settings_from_keyword_arguments(kwargs):
    config = refuses_clearly(lambda: OffloadConfig.from_kwargs(**kwargs))
    if config is not None:
        # An accepted config survives a round trip and validation again.
        assert refuses_clearly(lambda: config.replace()) == config


@FUZZ
@given(setting_kwargs.map(lambda kw: {k: v for k, v in kw.items() if k in SETTING_NAMES}))
def test_settings_given_to_the_constructor(kwargs):
    refuses_clearly(lambda: OffloadConfig(**kwargs))


@FUZZ
@given(setting_kwargs)
def test_settings_from_yaml_text(kwargs):
    text = yaml.safe_dump(kwargs, allow_unicode=True)
    refuses_clearly(lambda: in_file(text, OffloadConfig.from_yaml))
    refuses_clearly(lambda: in_file(text, lambda path: resolve_config(path)))


yaml_noise = st.lists(
    st.sampled_from(
        [
            "a",
            ":",
            " ",
            "\n",
            "  ",
            "- ",
            "[",
            "]",
            "{",
            "}",
            ",",
            "'",
            '"',
            "&x",
            "*x",
            "? ",
            "!!int",
            "!!binary",
            "1GiB",
            "policy",
            "budgets",
            "dram",
            "nodes",
            "id",
            "0",
            "#",
            "|",
            "\t",
            "%YAML 1.2\n",
            "---\n",
            "\xff",
            "activations",
        ]
    ),
    max_size=30,
).map("".join)


@FUZZ
@given(st.one_of(yaml_noise, st.binary(max_size=40)))
def test_settings_and_topologies_from_garbled_files(text):
    refuses_clearly(lambda: in_file(text, OffloadConfig.from_yaml))
    refuses_clearly(lambda: in_file(text, load_declared))


@FUZZ
@given(st.dictionaries(st.text(max_size=20), st.text(max_size=12), max_size=4))
def test_settings_from_environment_variables(raw):
    environ = {f"OFFLOAD_{key.upper()}": value for key, value in raw.items()}

    def read():
        return OffloadConfig.from_kwargs(**OffloadConfig.from_env(environ))

    refuses_clearly(read)


@FUZZ
@given(sizes)
def test_sizes(value):
    nbytes = refuses_clearly(lambda: parse_size(value))
    assert nbytes is None or (isinstance(nbytes, int) and nbytes >= 0)


@FUZZ
@given(
    st.one_of(
        values,
        st.dictionaries(
            st.sampled_from(["dram", "cxl", "remote_dram", "hbm", 0]),
            st.one_of(
                sizes, st.dictionaries(st.one_of(st.integers(-1, 4), st.text(max_size=3)), sizes)
            ),
            max_size=4,
        ),
    )
)
def test_budgets_against_the_paper_machine(budgets):
    tiers = load_declared("paper-2aic").tiers
    refuses_clearly(lambda: parse_budgets(budgets, tiers))


def paths_of(doc, prefix=()):
    """Every key path in a loaded YAML document, the document itself first."""
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths_of(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield from paths_of(value, (*prefix, index))


PAPER_PATHS = list(paths_of(PAPER))


def mutated(doc, path, action, value):
    """``doc`` with the item at ``path`` replaced, deleted, or given an extra key."""
    doc = copy.deepcopy(doc)
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent[last], dict):
        parent[last]["extra" if value is None else str(value)[:6]] = value
    else:
        parent[last] = value
    return doc


mutations = st.tuples(
    st.sampled_from(PAPER_PATHS), st.sampled_from(["replace", "delete", "add"]), values
)


@FUZZ
@given(st.lists(mutations, min_size=1, max_size=3))
def test_declared_topologies_with_broken_fields(changes):
    doc = PAPER
    for path, action, value in changes:
        try:
            doc = mutated(doc, path, action, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed or replaced this path
    topology = refuses_clearly(lambda: parse_declared(doc, source="fuzz.yaml"))
    if topology is not None:
        # What was accepted can be grouped into tiers and budgeted without a deep error.
        refuses_clearly(lambda: parse_budgets({"dram": "1GiB", "cxl": "2GiB"}, topology.tiers))
    if isinstance(doc, dict):
        text = yaml.safe_dump(doc, allow_unicode=True)
        refuses_clearly(lambda: in_file(text, load_declared))


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: parse_size("9" * 400 + "GiB"), "too large"),
        (lambda: OffloadConfig(budgets=5), "not a mapping"),
        (lambda: OffloadConfig(budgets={"dram": [1]}), "not a size"),
        (lambda: in_file(b"\xff\xfe", load_declared), "UTF-8"),
        (lambda: in_file(b"\xff\xfe", OffloadConfig.from_yaml), "UTF-8"),
        (lambda: in_file("a: [1", OffloadConfig.from_yaml), "not valid YAML at line 1"),
        (lambda: in_file("1: checkpoint", OffloadConfig.from_yaml), "not text"),
        (lambda: in_file("!!int", OffloadConfig.from_yaml), "not valid YAML"),
        (lambda: in_file("!!int", load_declared), "not valid YAML"),
        (lambda: OffloadConfig.from_yaml("/no/such/offload.yaml"), "cannot be read"),
    ],
)
def test_what_the_fuzzing_found_is_refused_with_a_message(call, fragment):
    with pytest.raises(OffloadError, match=fragment):
        call()
