"""OffloadConfig: defaults, the three sources and their order, and errors that say what to write."""

from __future__ import annotations

import pytest

from offload.config import ConfigError, OffloadConfig, resolve_config


def test_defaults_offload_activations_and_optimizer():
    config = OffloadConfig()
    assert (config.activations, config.optimizer_offload, config.policy) == (
        "saved_tensors",
        True,
        "cxl_aware",
    )
    assert config.max_grad_norm is None and config.grad_accumulation_steps == 1


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"activations": "everything"}, "activations = 'everything' is not one of"),
        ({"policy": "fast"}, "write one of|is not one of"),
        ({"budgets": {"hbm": "1GiB"}}, "tiers are"),
        ({"budgets": {"dram": "64GB!"}}, "write '64GiB'"),
        ({"bucket_nbytes": "lots"}, "bucket_nbytes"),
        ({"grad_accumulation_steps": 0}, "grad_accumulation_steps = 0 must be an integer >= 1"),
        ({"max_grad_norm": -1.0}, "positive number"),
        ({"optimizer_offload": "yes"}, "True or False"),
        ({"bukcet_nbytes": 1}, "unknown offload setting"),
    ],
)
def test_bad_values_say_what_to_write(kwargs, hint):
    with pytest.raises(ConfigError, match=hint):
        OffloadConfig.from_kwargs(**kwargs)


def test_sizes_and_booleans_are_parsed():
    config = OffloadConfig.from_kwargs(
        bucket_nbytes="8MiB", budgets={"dram": "2GiB"}, activations=False
    )
    assert (config.bucket_nbytes, config.budgets, config.activations) == (
        8 << 20,
        {"dram": 2 << 30},
        "off",
    )


def test_yaml_file(tmp_path):
    path = tmp_path / "offload.yaml"
    path.write_text("activations: checkpoint\nbudgets:\n  dram: 1GiB\nmax_grad_norm: 1.0\n")
    config = OffloadConfig.from_yaml(path)
    assert (config.activations, config.budgets["dram"], config.max_grad_norm) == (
        "checkpoint",
        1 << 30,
        1.0,
    )


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "offload.yaml"
    path.write_text("- checkpoint\n")
    with pytest.raises(ConfigError, match="write a mapping"):
        OffloadConfig.from_yaml(path)


def test_environment_is_overridden_by_file_and_kwargs(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_ACTIVATIONS", "off")
    monkeypatch.setenv("OFFLOAD_GRAD_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("OFFLOAD_BUDGET_DRAM", "3GiB")
    path = tmp_path / "offload.yaml"
    path.write_text("grad_accumulation_steps: 2\n")
    config = resolve_config(path, {"max_grad_norm": 0.5})
    assert config.activations == "off"
    assert config.grad_accumulation_steps == 2
    assert config.budgets == {"dram": 3 << 30}
    assert config.max_grad_norm == 0.5


def test_unknown_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("OFFLOAD_BUKCET_NBYTES", "1MiB")
    with pytest.raises(ConfigError, match="OFFLOAD_BUKCET_NBYTES is not an offload setting"):
        resolve_config(None)


def test_bad_environment_boolean(monkeypatch):
    monkeypatch.setenv("OFFLOAD_OVERLAP_STEP", "maybe")
    with pytest.raises(ConfigError, match="write 1 or 0"):
        resolve_config(None)


def test_planned_policy_and_profile_path_are_read_lazily(tmp_path):
    missing = tmp_path / "not-yet-written.json"
    # The profile is read when planning, so a config may name one the profiler has yet to write.
    config = OffloadConfig.from_kwargs(policy="planned", profile=missing)
    assert (config.policy, config.profile) == ("planned", str(missing))
    assert OffloadConfig(policy="planned").profile is None


@pytest.mark.parametrize(
    ("kwargs", "hint"),
    [
        ({"policy": "planned", "profile": 3}, "path of an offload-profile JSON"),
        ({"policy": "planned", "profile": ""}, "path of an offload-profile JSON"),
        ({"profile": "p.json"}, "set policy='planned' or drop profile"),
    ],
)
def test_bad_profile_settings_say_what_to_write(kwargs, hint):
    with pytest.raises(ConfigError, match=hint):
        OffloadConfig.from_kwargs(**kwargs)


def test_profile_from_the_environment(monkeypatch):
    monkeypatch.setenv("OFFLOAD_POLICY", "planned")
    monkeypatch.setenv("OFFLOAD_PROFILE", "/data/profile.json")
    config = resolve_config(None)
    assert (config.policy, config.profile) == ("planned", "/data/profile.json")


def test_config_accepts_every_policy_the_planner_plans():
    from allocators.policies import POLICIES, POLICY_NAMES

    for policy in POLICY_NAMES:
        assert OffloadConfig(policy=policy).policy == policy
    assert set(POLICY_NAMES) == {*POLICIES, "planned"}
