"""Where enable()'s settings come from and which values it refuses: a passed argument wins (even
one equal to its default), then the YAML file (config= or OFFLOAD_CONFIG), then OFFLOAD_*, then the
defaults; booleans, sizes, thread counts and YAML keys are taken only as written to mean."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import offload
from allocators.errors import ConfigError, OffloadError
from offload.config import OffloadConfig, resolve_config


def tiny():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def yaml_file(tmp_path, text: str):
    path = tmp_path / "offload.yaml"
    path.write_text(text)
    return path


def test_an_argument_equal_to_the_default_beats_the_environment(monkeypatch):
    monkeypatch.setenv("OFFLOAD_POLICY", "planned")
    model, opt = tiny()
    with offload.enable(model, opt, policy="cxl_aware", budgets={"dram": "1GiB"}) as sess:
        assert sess.config.policy == "cxl_aware"


def test_the_environment_applies_when_no_argument_is_passed(monkeypatch):
    monkeypatch.setenv("OFFLOAD_ACTIVATIONS", "off")
    model, opt = tiny()
    with offload.enable(model, opt, budgets={"dram": "1GiB"}) as sess:
        assert sess.config.activations == "off"


# Each row: what the YAML says, what the environment says, what is passed -> the setting's value.
PRECEDENCE = [
    # the YAML file beats OFFLOAD_*, even where it writes the default
    ("policy: cxl_aware\n", {"OFFLOAD_POLICY": "planned"}, {}, ("policy", "cxl_aware")),
    ("overlap_step: true\n", {"OFFLOAD_OVERLAP_STEP": "0"}, {}, ("overlap_step", True)),
    # a passed argument beats the YAML file, even where it is the default
    ("overlap_step: false\n", {}, {"overlap_step": True}, ("overlap_step", True)),
    ("activations: off\n", {}, {"activations": True}, ("activations", "saved_tensors")),
    # what nobody gives is the default
    ("", {}, {}, ("bucket_nbytes", 32 << 20)),
]


@pytest.mark.parametrize(("text", "environ", "given", "expected"), PRECEDENCE)
def test_precedence_arguments_then_yaml_then_environment_then_defaults(
    tmp_path, text, environ, given, expected
):
    config = resolve_config(yaml_file(tmp_path, text), given, environ=environ)
    name, value = expected
    assert getattr(config, name) == value


def test_offload_config_file_is_the_yaml_layer_when_config_is_not_passed(tmp_path):
    path = yaml_file(tmp_path, "policy: cxl_aware\n")
    environ = {"OFFLOAD_CONFIG": str(path), "OFFLOAD_POLICY": "planned"}
    assert resolve_config(None, environ=environ).policy == "cxl_aware"


def test_an_offload_config_object_counts_whole():
    environ = {"OFFLOAD_POLICY": "planned"}
    assert resolve_config(OffloadConfig(), environ=environ).policy == "cxl_aware"


def test_offload_budgets_is_read_as_tier_sizes():
    environ = {"OFFLOAD_BUDGETS": "dram=64GiB,cxl=256GiB"}
    assert resolve_config(None, environ=environ).budgets == {"dram": 64 << 30, "cxl": 256 << 30}


BAD_SETTINGS = [
    # booleans: 1 was taken (it equals True, the default) while 0 was refused
    ({"optimizer_offload": 1}, "must be True or False"),
    ({"optimizer_offload": 0}, "must be True or False"),
    ({"activations": 1}, "is not one of"),
    # sizes: no truncation, no astronomic floats
    ({"bucket_nbytes": 1.5}, "not a whole number of bytes"),
    ({"bucket_nbytes": "0.5B"}, "not a whole number of bytes"),
    ({"budgets": {"dram": 1e99}}, "too large"),
    ({"budgets": {"dram": 10**30}}, "too large"),
    ({"optimizer_threads": 10_000}, "more than 1024"),
]


@pytest.mark.parametrize(("kwargs", "fragment"), BAD_SETTINGS)
def test_lenient_values_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(None, kwargs, environ={})


def test_enable_refuses_a_one_for_a_boolean():
    model, opt = tiny()
    with pytest.raises(ConfigError, match="optimizer_offload = 1 must be True or False"):
        offload.enable(model, opt, optimizer_offload=1, budgets={"dram": "1GiB"})


BAD_ENVIRONMENT = [
    ({"OFFLOAD_BUDGETS": "dram:64GiB"}, "OFFLOAD_BUDGETS 'dram:64GiB' is not TIER=SIZE"),
    ({"OFFLOAD_BUDGETS": "hbm=1GiB"}, "'hbm' is not a tier"),
    ({"OFFLOAD_BUDGETS": "dram=1GiB,dram=2GiB"}, "gives tier 'dram' twice"),
    ({"OFFLOAD_BUDGETS": "dram=1GiB", "OFFLOAD_BUDGET_CXL": "1GiB"}, "both set"),
    ({"OFFLOAD_BUCKET_NBYTES": "1.5"}, "not a whole number of bytes"),
]


@pytest.mark.parametrize(("environ", "fragment"), BAD_ENVIRONMENT)
def test_bad_environment_values_are_refused(environ, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_config(None, environ=environ)


def test_a_yaml_key_given_twice_is_refused(tmp_path):
    path = yaml_file(tmp_path, "policy: planned\nactivations: off\npolicy: cxl_aware\n")
    with pytest.raises(ConfigError, match="'policy' is given twice"):
        resolve_config(path, environ={})


def test_a_model_without_parameters_is_told_so():
    with pytest.raises(OffloadError, match="has no parameters") as info:
        offload.enable(nn.ReLU(), None, budgets={"dram": "1GiB"})
    assert "model.to(" not in str(info.value)
