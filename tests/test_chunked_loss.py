"""The chunked causal-LM loss gives transformers' loss and gradients, and under offload.enable()
(loss_chunk_tokens=N) an unchanged loop trains exactly as without it."""

from __future__ import annotations

import pytest
import torch

import offload
from allocators.errors import ConfigError
from allocators.sysfs_topology import discover
from offload.config import OffloadConfig
from offload.runtime.chunked_loss import ChunkedLossPatch, chunked_causal_lm_loss
from offload.tools.tiny_finetune import tiny_llama, train_steps

BUDGETS = {"dram": "1GiB"}


def grads_of(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("chunk_tokens", [1, 7, 32, 1000])
def test_loss_and_gradients_match_transformers(chunk_tokens):
    model = tiny_llama(hidden=64, layers=2, vocab=256)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 16), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    reference = model(input_ids=ids, labels=labels).loss
    reference.backward()
    expected = grads_of(model)
    model.zero_grad()
    patch = ChunkedLossPatch(model, chunk_tokens)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    patch.remove()
    assert out.logits is None
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-6)
    for ours, ref in zip(grads_of(model), expected, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=False)
    hidden, labels = torch.randn(3, 5, 8), torch.randint(0, 13, (3, 5))
    logits = head(hidden)
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 13), targets, reduction="sum"
    ) / torch.tensor(40)
    ours = chunked_causal_lm_loss(hidden, head, labels, 4, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(ours, expected)


def test_a_loop_under_offload_with_chunked_loss_trains_as_plain_torch():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (1, 64), generator=gen) for _ in range(5)]
    reference = tiny_llama()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    expected = train_steps(reference, ref_opt, batches)
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(
        model, opt, topology=discover(), budgets=BUDGETS, loss_chunk_tokens=16
    ) as sess:
        losses = train_steps(model, opt, batches)
        assert "forward" in vars(model)
        # The session's own forward hooks still see the (patched) forward.
        assert (sess.report()["forward_ms"] > 0).all()
    assert "forward" not in vars(model)
    for ours, ref in zip(losses, expected, strict=True):
        assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref))


def test_a_model_without_an_lm_head_is_refused_with_what_to_do():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="drop loss_chunk_tokens"):
        offload.enable(model, opt, topology=discover(), budgets=BUDGETS, loss_chunk_tokens=8)
    assert "forward" not in vars(model)
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


def test_the_setting_is_validated_and_read_from_the_environment():
    with pytest.raises(ConfigError, match="loss_chunk_tokens"):
        OffloadConfig.from_kwargs(loss_chunk_tokens=0)
    assert OffloadConfig.from_env({"OFFLOAD_LOSS_CHUNK_TOKENS": "4096"}) == {
        "loss_chunk_tokens": 4096
    }
