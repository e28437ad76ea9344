"""``train finetune``: D2S on a tiny local BERT and CSV (any model and CSV can be given)."""

from __future__ import annotations

import csv

import pytest
from tests.recipes.helpers import train

from monarch_matrices.recipes.finetune import DEFAULT_LOWRANK

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["good", "great", "love", "fine", "bad", "awful", "hate", "poor", "the", "film", "was"]


@pytest.fixture
def tiny_model(tmp_path):
    """A 1-layer BERT (hidden 128, so Monarch fits) and a word-level tokenizer, saved."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]")
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=128,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=256, max_position_embeddings=32)
    path = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture
def reviews(tmp_path):
    """A CSV whose label follows the sentiment words; one row of another label to skip."""
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="latin-1") as f:
        w = csv.writer(f)
        w.writerow(["mood", "review"])
        for i in range(120):
            pos = i % 2 == 0
            word = WORDS[i % 4] if pos else WORDS[4 + i % 4]
            w.writerow(["pos" if pos else "neg", f"the film was {word} {word}"])
        w.writerow(["meh", "the film was"])
    return path


@pytest.mark.parametrize("variant", [["--layers", "dense"], ["--init", "project"],
                                     ["--init", "random"],
                                     ["--init", "calibrated", "--calibrate", "40"],
                                     ["--init", "calibrated", "--calibrate", "40",
                                      "--lowrank", "4"],
                                     ["--init", "calibrated", "--calibrate", "40",
                                      "--lowrank", "0"],
                                     ["--init", "calibrated", "--calibrate", "40",
                                      "--lowrank", "0", "--fit-residual-sums"]])
def test_each_variant_trains_and_reports(tmp_path, tiny_model, reviews, variant):
    m = train("finetune", tmp_path / "run", "--model", str(tiny_model), "--data", str(reviews),
              "--text-column", "review", "--label-column", "mood", "--labels", "neg,pos",
              "--steps", "30", "--batch-size", "16", "--lr", "2e-3", "--eval-every", "10",
              *variant)
    assert m["finished"] and m["data"]["train"] + m["data"]["test"] == 120
    assert m["final"]["test_accuracy"] >= 85  # the words give the label away
    loss = [v for _, v in m["history"]["train loss"]]
    assert loss[-1] < loss[0]
    assert m["params_trained"] < m["params"]  # the word embeddings are frozen
    if variant[0] == "--layers":
        assert m["conversion"] is None
    else:
        conv = m["conversion"]
        lowrank = (int(variant[variant.index("--lowrank") + 1]) if "--lowrank" in variant
                   else DEFAULT_LOWRANK)
        # the 4 attention layers (128 -> 128) are kept dense where Monarch + rank R
        # saves nothing (rank 32: 2·128²/4 + 32·256 = 128²); the 2 MLP layers always save
        attention_saves = 2 * 128 * 128 // 4 + lowrank * 256 < 128 * 128
        assert conv["layers"] == (6 if attention_saves else 2)
        assert conv["init"] == variant[1] and conv["param_ratio"] < 1
        assert (conv["mean_projection_error"] is None) == (variant[1] == "random")
        assert conv["calibration_texts"] == (40 if variant[1] == "calibrated" else None)
        assert conv["seconds"] > 0
        assert conv["lowrank"] == (lowrank or None)  # DEFAULT_LOWRANK unless given
        assert conv["residual_sums"] is ("--fit-residual-sums" in variant)


@pytest.mark.parametrize("init", ["project", "calibrated"])
def test_resume_is_exact_with_dropout(tmp_path, tiny_model, reviews, init):
    # stops after the first evaluation (step 10), which switches the model to eval
    # and back: dropout must be on in every training step, before and after
    args = ["--model", str(tiny_model), "--data", str(reviews), "--text-column", "review",
            "--label-column", "mood", "--labels", "neg,pos", "--steps", "20",
            "--batch-size", "16", "--eval-every", "10", "--init", init, "--dropout", "0.1"]
    whole = train("finetune", tmp_path / "whole", *args)
    train("finetune", tmp_path / "part", *args, "--stop-after", "13")
    resumed = train("finetune", tmp_path / "part", *args, "--resume")
    assert resumed["history"] == whole["history"]


def test_dropout_is_on_from_the_first_step(tmp_path, tiny_model, reviews, monkeypatch):
    from monarch_matrices.recipes import loop

    seen = []
    real_train = loop.train

    def spy(task, model, *a, **kw):
        real_loss = task.loss
        task.loss = lambda m, b: (seen.append(all(x.training for x in model.modules())),
                                  real_loss(m, b))[1]
        return real_train(task, model, *a, **kw)

    monkeypatch.setattr("monarch_matrices.recipes.finetune.train", spy)
    train("finetune", tmp_path / "run", "--model", str(tiny_model), "--data", str(reviews),
          "--text-column", "review", "--label-column", "mood", "--labels", "neg,pos",
          "--steps", "3", "--batch-size", "16", "--layers", "dense")
    assert seen == [True, True, True]


def test_calibrate_needs_the_calibrated_start(tmp_path, tiny_model, reviews):
    from monarch_matrices.cli import main

    rc = main(["train", "finetune", "--out", str(tmp_path / "run"), "--model", str(tiny_model),
               "--data", str(reviews), "--text-column", "review", "--label-column", "mood",
               "--labels", "neg,pos", "--init", "project", "--calibrate", "40"])
    assert rc == 2 and not (tmp_path / "run" / "metrics.json").exists()
    rc = main(["train", "finetune", "--out", str(tmp_path / "run"), "--model", str(tiny_model),
               "--data", str(reviews), "--layers", "dense", "--lowrank", "4"])
    assert rc == 2 and not (tmp_path / "run" / "metrics.json").exists()


def test_dropout_option_reaches_every_dropout(tiny_model):
    from torch import nn

    from monarch_matrices.recipes.finetune import load_encoder

    encoder, _, _ = load_encoder(str(tiny_model), dropout=0.0)
    assert encoder.config.hidden_dropout_prob == encoder.config.attention_probs_dropout_prob == 0
    assert all(m.p == 0 for m in encoder.modules() if isinstance(m, nn.Dropout))
    default, _, _ = load_encoder(str(tiny_model))
    assert any(m.p > 0 for m in default.modules() if isinstance(m, nn.Dropout))


def test_dropout_must_be_a_probability(tmp_path, tiny_model, reviews):
    from monarch_matrices.cli import main

    rc = main(["train", "finetune", "--out", str(tmp_path / "run"), "--model", str(tiny_model),
               "--data", str(reviews), "--text-column", "review", "--label-column", "mood",
               "--labels", "neg,pos", "--dropout", "1.5"])
    assert rc == 2
