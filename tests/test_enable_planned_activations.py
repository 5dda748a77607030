"""policy="planned" sizes the activations group for the activation mode the session runs: a budget
too small for saved_tensors mode is refused by enable(), not mid-forward, and one the plan
accepts holds the run."""

from __future__ import annotations

import warnings

import pytest
import torch

import offload
from allocators.errors import BudgetExceededError
from offload.tools.tiny_finetune import tiny_llama

transformers = pytest.importorskip("transformers")

BATCH, SEQ = 2, 256


@pytest.fixture(autouse=True)
def quiet_hf():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _enable(model, budget_nbytes: int, **settings):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sess = offload.enable(
        model,
        opt,
        budgets={"dram": budget_nbytes},
        policy="planned",
        plan_tokens=BATCH * SEQ,
        **settings,
    )
    return sess, opt


def _planned_nbytes(**settings) -> dict[str, int]:
    sess, _ = _enable(tiny_llama(), 1 << 30, **settings)
    with sess:
        return {row.item: row.nbytes for row in sess.plan.table().itertuples()}


def test_saved_tensors_plan_is_many_times_the_checkpoint_plan():
    every = {"activation_min_nbytes": 0}
    saved = _planned_nbytes(**every)["activation_checkpoints"]
    checkpoint = _planned_nbytes(activations="checkpoint", **every)["activation_checkpoints"]
    assert saved > 5 * checkpoint


def test_budget_below_the_saved_tensors_need_is_refused_by_enable():
    need = sum(_planned_nbytes().values())
    model = tiny_llama()
    with pytest.raises(BudgetExceededError, match="planned: the groups need"):
        _enable(model, need - (64 << 10))
    assert "forward" not in vars(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_budget_the_plan_accepts_holds_a_saved_tensors_run():
    # The plan sizes one sequence of BATCH * SEQ tokens; the run's rotary tables are per
    # position, so the pool's 12.5% size classes and a MiB of slack cover the difference.
    need = sum(_planned_nbytes().values())
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    sess, opt = _enable(model, need + (1 << 20))
    with sess:
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        assert len(sess.report()) == 2
