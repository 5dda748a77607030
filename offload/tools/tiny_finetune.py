"""A tiny random-weight Llama fine-tuned for a few steps twice, plain and under offload.enable(),
so the demo can show the report and that offload changed no loss. Not a benchmark: no ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

import offload
from allocators.topology import Topology


@dataclass(frozen=True)
class TinyFinetuneResult:
    """Per-step losses of both runs and the offload session's report."""

    plain_losses: tuple[float, ...]
    offload_losses: tuple[float, ...]
    report: pd.DataFrame

    @property
    def max_loss_diff(self) -> float:
        return max(abs(a - b) for a, b in zip(self.plain_losses, self.offload_losses, strict=True))


def tiny_llama(seed: int = 0, *, hidden: int = 128, layers: int = 4, vocab: int = 512):
    """A LlamaForCausalLM with random weights (no download): the shape of the demo and tests.

    >>> sum(p.numel() for p in tiny_llama(hidden=64, layers=2, vocab=128).parameters()) > 0
    True
    """
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    return transformers.LlamaForCausalLM(config).train()


def train_steps(model, optimizer, batches: list[torch.Tensor]) -> tuple[float, ...]:
    """The user's causal-LM loop, unchanged whether or not offload is on; one loss per batch.

    >>> model = tiny_llama(hidden=64, layers=2, vocab=128)
    >>> ids = torch.randint(0, 128, (1, 8))
    >>> len(train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), [ids, ids]))
    2
    """
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return tuple(losses)


def run_tiny_finetune(
    *, steps: int = 8, batch: int = 2, seq: int = 256, topology: Topology | None = None
) -> TinyFinetuneResult:
    """Train the tiny model ``steps`` steps plainly, then again from the same seed under offload.

    >>> result = run_tiny_finetune(steps=2, seq=16)  # doctest: +SKIP
    >>> result.max_loss_diff < 1e-6  # doctest: +SKIP
    True
    """
    gen = torch.Generator().manual_seed(1)
    vocab = tiny_llama().config.vocab_size
    batches = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(steps)]

    model = tiny_llama()
    plain = train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3), batches)

    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with offload.enable(model, optimizer, budgets={"dram": "2GiB"}, topology=topology) as sess:
        ours = train_steps(model, optimizer, batches)
        report = sess.report()
    return TinyFinetuneResult(plain_losses=plain, offload_losses=ours, report=report)
