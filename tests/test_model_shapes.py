"""Model shapes: parameter counts from the shape match the published model sizes."""

import json

import pytest

from offload.planning.model_shapes import (
    MODELS,
    ModelShapeError,
    load_model_shape,
    shape_from_config,
)


@pytest.mark.parametrize(
    ("name", "billions"),
    [("qwen2.5-7b", 7.62), ("mistral-nemo-12b", 12.25), ("llama-1.1b", 1.10)],
)
def test_parameter_count_matches_the_published_size(name, billions):
    assert MODELS[name].n_params / 1e9 == pytest.approx(billions, abs=0.01)


def test_the_paper_optimizer_table_sizes_are_tensors_of_its_models():
    # reference/PAPER.md's CPU AdamW sizes are single tensors of the two models.
    qwen = set(MODELS["qwen2.5-7b"].tensor_numels())
    nemo = set(MODELS["mistral-nemo-12b"].tensor_numels())
    assert {1_835_008, 12_845_056, 67_895_296, 544_997_376} <= qwen
    assert {20_971_520, 671_088_640} <= nemo


def test_layers_and_embeddings_add_up_to_the_total():
    shape = MODELS["qwen2.5-7b"]
    embeddings = 2 * shape.vocab * shape.hidden + shape.hidden  # untied head and final norm
    assert shape.layers * shape.n_params_per_layer + embeddings == shape.n_params


def test_a_config_json_gives_the_same_shape_as_the_builtin(tmp_path):
    config = {
        "model_type": "mistral",
        "num_hidden_layers": 40,
        "hidden_size": 5120,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 131072,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert load_model_shape(str(path)).n_params == MODELS["mistral-nemo-12b"].n_params


def test_a_tied_embedding_is_counted_once():
    config = {
        "num_hidden_layers": 1,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "vocab_size": 10,
        "tie_word_embeddings": True,
    }
    tied = shape_from_config(config)
    untied = shape_from_config({**config, "tie_word_embeddings": False})
    assert untied.n_params - tied.n_params == 10 * 8


def test_an_unknown_name_says_what_to_write():
    with pytest.raises(ModelShapeError, match="qwen2.5-7b"):
        load_model_shape("gpt-5")


def test_a_config_without_a_needed_key_names_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelShapeError, match="num_hidden_layers"):
        load_model_shape(str(path))
