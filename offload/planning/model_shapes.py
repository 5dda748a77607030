"""Decoder-only transformer shapes (the paper's Qwen2.5-7B and Mistral-NeMo-12B, a 1.1B Llama, or
any transformers config.json) and the parameter counts computed from them; no weights, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allocators.errors import OffloadError
from allocators.json_text import parse_json_file


class ModelShapeError(OffloadError, ValueError):
    """A model name is unknown or a config file lacks a field the shape needs."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder (GQA attention, gated MLP, RMSNorm).

    ``qkv_bias`` is True for Qwen2 (biases on q, k, v); ``tied_embeddings`` shares the input
    embedding with the LM head.

    >>> MODELS["qwen2.5-7b"].n_params
    7615616512
    """

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    qkv_bias: bool = False

    def tensor_numels(self) -> tuple[int, ...]:
        """Element count of every parameter tensor, in module order.

        The CPU optimizer steps tensor by tensor, and its speed on slow memory depends on the size
        of each tensor (reference/PAPER.md: the CXL penalty appears above about 20M elements).

        >>> max(MODELS["qwen2.5-7b"].tensor_numels())  # the embedding
        544997376
        """
        head = () if self.tied_embeddings else (self.vocab * self.hidden,)
        layer = self._layer_numels()
        return (self.vocab * self.hidden, *layer * self.layers, self.hidden, *head)

    def _layer_numels(self) -> tuple[int, ...]:
        q_out = self.heads * self.head_dim
        kv_out = self.kv_heads * self.head_dim
        layer = [
            self.hidden,  # input RMSNorm
            self.hidden * q_out,
            self.hidden * kv_out,
            self.hidden * kv_out,
        ]
        if self.qkv_bias:
            layer += [q_out, kv_out, kv_out]
        layer += [
            q_out * self.hidden,  # o_proj
            self.hidden,  # post-attention RMSNorm
            self.hidden * self.intermediate,  # gate
            self.hidden * self.intermediate,  # up
            self.intermediate * self.hidden,  # down
        ]
        return tuple(layer)

    @property
    def n_params(self) -> int:
        """Total parameter count."""
        return sum(self.tensor_numels())

    @property
    def n_params_per_layer(self) -> int:
        """Parameters of one decoder layer (what ZeRO-3 fetches per layer)."""
        return sum(self._layer_numels())

    def llama_config_kwargs(self) -> dict[str, int]:
        """The sizes as ``transformers.LlamaConfig`` keyword arguments (the inverse of
        :func:`shape_from_config` for the sizes); ``qkv_bias`` is not carried, as Llama has no
        bias on q, k, v alone, nor ``tied_embeddings`` (pass ``tie_word_embeddings`` yourself).

        >>> MODELS["llama-1.1b"].llama_config_kwargs()["num_key_value_heads"]
        4
        >>> shape_from_config(MODELS["llama-1.1b"].llama_config_kwargs()).n_params == (
        ...     MODELS["llama-1.1b"].n_params)
        True
        """
        return {
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
        }


MODELS: dict[str, ModelShape] = {
    "qwen2.5-7b": ModelShape(
        name="qwen2.5-7b",
        layers=28,
        hidden=3584,
        intermediate=18944,
        heads=28,
        kv_heads=4,
        head_dim=128,
        vocab=152064,
        qkv_bias=True,
    ),
    "mistral-nemo-12b": ModelShape(
        name="mistral-nemo-12b",
        layers=40,
        hidden=5120,
        intermediate=14336,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=131072,
    ),
    # The Llama-shaped 1.1B of reference/MEASURED.md (TinyLlama's shape).
    "llama-1.1b": ModelShape(
        name="llama-1.1b",
        layers=22,
        hidden=2048,
        intermediate=5632,
        heads=32,
        kv_heads=4,
        head_dim=64,
        vocab=32000,
    ),
}


# Other names configs use for the same sizes (GPT-2 style), tried when the Llama name is absent.
_ALIASES = {
    "num_hidden_layers": ("n_layer", "num_layers"),
    "hidden_size": ("n_embd", "d_model"),
    "num_attention_heads": ("n_head", "num_heads"),
    "intermediate_size": ("n_inner", "ffn_dim"),
}


def _with_aliases(config: dict) -> dict:
    out = dict(config)
    for key, aliases in _ALIASES.items():
        if key in out:
            continue
        for alias in aliases:
            if alias in config:
                out[key] = config[alias]
                break
    # GPT-2 writes n_inner = None for its default MLP width, four times the hidden size.
    if out.get("intermediate_size") is None and "hidden_size" in out and "n_inner" in config:
        out["intermediate_size"] = 4 * int(out["hidden_size"])
    return out


def shape_from_config(config: dict, name: str = "config") -> ModelShape:
    """Build a shape from a transformers config dict (the keys of a Llama/Qwen2/Mistral config.json,
    or GPT-2's ``n_layer``/``n_embd``/``n_head``/``n_inner``). Parameter counts assume a gated
    MLP (three matrices), so they overstate a plain MLP's; the KV cache sizes (layers, KV heads,
    head dim) are exact either way.

    >>> shape_from_config({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
    ...                    "num_attention_heads": 4, "vocab_size": 100}).kv_heads
    4
    >>> gpt2 = shape_from_config({"n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None,
    ...                           "vocab_size": 50257})
    >>> gpt2.layers, gpt2.head_dim, gpt2.intermediate
    (12, 64, 3072)
    """
    if not isinstance(config, dict):
        raise ModelShapeError(
            f"{name} holds a {type(config).__name__}, not a config; give a transformers "
            "config.json (a mapping with num_hidden_layers, hidden_size, ...)"
        )
    config = _with_aliases(config)
    required = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "vocab_size",
    )
    missing = [key for key in required if key not in config]
    if missing:
        raise ModelShapeError(
            f"{name} lacks {missing}; a Llama-family config.json has num_hidden_layers, "
            "hidden_size, intermediate_size, num_attention_heads and vocab_size (GPT-2 style "
            "n_layer, n_embd, n_head, n_inner are read too)"
        )
    sizes = {key: _positive_size(config, key, name) for key in required}
    for key in ("num_key_value_heads", "head_dim"):
        if config.get(key) is not None:
            sizes[key] = _positive_size(config, key, name)
    heads = sizes["num_attention_heads"]
    hidden = sizes["hidden_size"]
    return ModelShape(
        name=str(config.get("_name_or_path") or config.get("model_type") or name),
        layers=sizes["num_hidden_layers"],
        hidden=hidden,
        intermediate=sizes["intermediate_size"],
        heads=heads,
        kv_heads=sizes.get("num_key_value_heads", heads),
        head_dim=sizes.get("head_dim", hidden // heads),
        vocab=sizes["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
    )


def _positive_size(config: dict, key: str, name: str) -> int:
    value = config[key]
    # A zero (an all-zero config) would divide by zero or size the model at nothing.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelShapeError(
            f"{name}: {key} = {value!r} must be a positive integer, as in a transformers "
            "config.json (e.g. hidden_size: 4096)"
        )
    return value


def load_model_shape(spec: str) -> ModelShape:
    """Return a known shape by name, or read a transformers ``config.json`` path.

    >>> load_model_shape("mistral-nemo-12b").layers
    40
    """
    if spec in MODELS:
        return MODELS[spec]
    path = Path(spec)
    if not path.suffix == ".json":
        raise ModelShapeError(
            f"model {spec!r} is unknown; write one of {sorted(MODELS)} or a path to a "
            "transformers config.json"
        )
    try:
        config = parse_json_file(path)
    except ValueError as exc:
        raise ModelShapeError(
            f"{spec} is not valid JSON ({exc}); give a transformers config.json"
        ) from None
    return shape_from_config(config, name=path.stem)
