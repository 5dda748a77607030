"""The activation-bytes estimate against what offload.enable() really offloads: tiny random Llamas
of three shapes, fp32 and bf16, each mode, every saved tensor and the default 1 MiB threshold."""

from __future__ import annotations

import pytest
import torch

import offload
from offload.planning.activation_bytes import estimate_activations, saved_tensors
from offload.planning.model_shapes import MODELS, ModelShape

transformers = pytest.importorskip("transformers")

# The estimate is exact on these shapes today; 1% leaves room for a saved scalar more or less.
TOLERANCE = 0.01

SHAPES = {
    "gqa": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "odd-sizes": dict(
        vocab_size=1000,
        hidden_size=96,
        intermediate_size=352,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
    ),
    "mha-wide-heads": dict(
        vocab_size=320,
        hidden_size=160,
        intermediate_size=448,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=5,
        head_dim=40,
    ),
}


def _measure(shape: str, dtype: torch.dtype, batch: int, seq: int, **settings) -> tuple[int, int]:
    """Bytes offloaded by one forward, and the host bytes the activations class then holds."""
    config = transformers.LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with offload.enable(model, None, budgets={"dram": "4GiB"}, **settings) as sess:
        loss = model(input_ids=ids, labels=ids).loss
        moved = sess._activations.offloaded_nbytes if sess._activations else 0
        rows = sess.memory.allocator.usage()
        held = sum(r.used_nbytes_by_class["activations"] for r in rows if r.node is None)
        loss.backward()
    return moved, held


def _estimate(shape: str, dtype: torch.dtype, batch: int, seq: int, **settings):
    config = transformers.LlamaConfig(**SHAPES[shape])
    model_shape = ModelShape(
        name=shape,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab=config.vocab_size,
    )
    return estimate_activations(
        model_shape,
        batch=batch,
        seq=seq,
        mode=settings.get("activations", "saved_tensors"),
        dtype_nbytes=torch.empty((), dtype=dtype).element_size(),
        min_nbytes=settings.get("activation_min_nbytes", 1 << 20),
        loss_chunk_tokens=settings.get("loss_chunk_tokens"),
    )


CASES = [
    pytest.param(shape, dtype, mode, id=f"{shape}-{str(dtype)[6:]}-{mode}")
    for shape in SHAPES
    for dtype in (torch.float32, torch.bfloat16)
    for mode in ("saved_tensors", "checkpoint")
]


@pytest.mark.parametrize(("shape", "dtype", "mode"), CASES)
def test_estimate_matches_every_offloaded_save(shape, dtype, mode):
    settings = {"activations": mode, "activation_min_nbytes": 0}
    moved, held = _measure(shape, dtype, 2, 64, **settings)
    est = _estimate(shape, dtype, 2, 64, **settings)
    assert est.moved_nbytes == pytest.approx(moved, rel=TOLERANCE)
    assert est.host_nbytes == pytest.approx(held, rel=TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_estimate_keeps_only_saves_over_the_default_threshold(dtype):
    # At 2 x 1024 tokens the bf16 [b, s, h] saves (512 KiB) stay on the device, fp32 ones go.
    moved, held = _measure("gqa", dtype, 2, 1024)
    est = _estimate("gqa", dtype, 2, 1024)
    assert moved > 0
    assert est.moved_nbytes == pytest.approx(moved, rel=TOLERANCE)
    assert est.host_nbytes == pytest.approx(held, rel=TOLERANCE)


def test_estimate_matches_a_chunked_loss():
    settings = {"activation_min_nbytes": 0, "loss_chunk_tokens": 48}
    moved, held = _measure("gqa", torch.bfloat16, 2, 64, **settings)
    est = _estimate("gqa", torch.bfloat16, 2, 64, **settings)
    assert est.moved_nbytes == pytest.approx(moved, rel=TOLERANCE)
    assert est.host_nbytes == pytest.approx(held, rel=TOLERANCE)


def test_saved_tensors_mode_is_many_times_the_layer_inputs():
    shape = MODELS["qwen2.5-7b"]
    sizes = {"batch": 1, "seq": 4096, "loss_chunk_tokens": 4096}
    full = estimate_activations(shape, **sizes).moved_nbytes
    layer_inputs = estimate_activations(shape, mode="checkpoint", **sizes).moved_nbytes
    assert full > 20 * layer_inputs


def test_unchunked_loss_keeps_fp32_log_probs_once():
    shape = ModelShape("tiny", 1, 8, 16, 2, 1, 4, 1000)
    names = {t.name: t for t in saved_tensors(shape, batch=1, seq=16, mode="checkpoint")}
    assert names["loss log-probs (fp32)"].nbytes == 4 * 16 * 1000
    assert names["loss log-probs (fp32)"].count == 1


def test_off_mode_offloads_nothing():
    shape = ModelShape("tiny", 1, 8, 16, 2, 1, 4, 10)
    assert estimate_activations(shape, batch=1, seq=8, mode="off").host_nbytes == 0


def test_unknown_mode_is_refused_with_the_modes():
    shape = ModelShape("tiny", 1, 8, 16, 2, 1, 4, 10)
    with pytest.raises(ValueError, match="saved_tensors, checkpoint, off"):
        estimate_activations(shape, batch=1, seq=8, mode="everything")
