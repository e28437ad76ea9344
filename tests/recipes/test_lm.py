"""``train lm``: metrics, learning, resume, S2D and the output-folder rules."""

from __future__ import annotations

import pytest
import torch
from tests.recipes.helpers import COMMON, LM_TINY, train

from monarch_matrices.cli import main
from monarch_matrices.nn import MonarchLowRankLinear
from monarch_matrices.recipes.common import make_optimizer
from monarch_matrices.recipes.layers import densify_training, make_linear
from monarch_matrices.recipes.lm import GPT, GPTConfig


@pytest.mark.parametrize("layers", ["dense", "monarch"])
def test_tiny_run_writes_metrics_and_plot_and_learns(tmp_path, corpus, layers):
    m = train("lm", tmp_path / "run", "--data", str(corpus), "--steps", "40",
              "--layers", layers, *LM_TINY)
    assert m["finished"] and m["steps"] == 40 and m["layers"] == layers
    for key in ("wall_time_s", "train_time_s", "tokens_per_s", "params", "command"):
        assert m[key], key
    assert "train lm" in m["command"] and "--steps 40" in m["command"]
    assert m["final"]["val_perplexity"] == pytest.approx(2.718281828 ** m["final"]["val_loss"])
    train_loss = [v for _, v in m["history"]["train loss"]]
    val_loss = [v for _, v in m["history"]["val loss"]]
    assert train_loss[-1] < 0.9 * train_loss[0] and val_loss[-1] < val_loss[0]
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, corpus):
    args = ["--data", str(corpus), "--steps", "30", "--densify-at", "0.5", "--lowrank", "2",
            *LM_TINY]
    whole = train("lm", tmp_path / "whole", *args)
    part = train("lm", tmp_path / "part", *args, "--stop-after", "20")  # past the switch
    assert not part["finished"] and part["steps"] == 20
    resumed = train("lm", tmp_path / "part", *args, "--resume")
    assert resumed["finished"] and resumed["steps"] == 30
    assert resumed["history"] == whole["history"]  # same seed, same data, same numbers
    assert resumed["densified"] == whole["densified"]


def test_densify_at_switches_to_dense_without_changing_the_function(tmp_path, corpus):
    m = train("lm", tmp_path / "s2d", "--data", str(corpus), "--steps", "20",
              "--densify-at", "0.5", *LM_TINY)
    switch = m["densified"]
    assert switch["step"] == 10 and switch["layers"] == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    assert switch["max_abs_output_change"] < 1e-4
    assert m["params_final"] > m["params"]  # the dense layers hold more parameters


def test_densify_training_keeps_function_and_carries_optimizer_state():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg, make_linear("monarch", nblocks=4, lowrank=3))
    optimizer = make_optimizer(model, 1e-2, 0.1)
    x = torch.randint(0, 20, (4, 16))
    for _ in range(3):  # make the low-rank term non-zero and the optimizer state real
        model(x, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert any(isinstance(m, MonarchLowRankLinear) for m in model.modules())
    wte = model.wte.weight
    state = optimizer.state[wte]["exp_avg"].clone()
    with torch.no_grad():
        before = model(x)
    model, optimizer, n = densify_training(
        model, optimizer, lambda m, fresh: make_optimizer(m, 1e-2, 0.1, fresh))
    assert n == 8 and not any(isinstance(m, MonarchLowRankLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert model.wte.weight is wte and torch.equal(optimizer.state[wte]["exp_avg"], state)
    groups = {g["name"]: g["params"] for g in optimizer.param_groups}
    assert {id(p) for p in groups["fresh"]} == {
        id(m.weight) for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)
    }
    assert all(p not in optimizer.state for p in groups["fresh"])  # fresh AdamW state
    assert model.blocks[0].mlp.fc1.bias in optimizer.state  # biases are copied, state too


def test_weight_decay_covers_monarch_factors_not_norms_or_biases():
    cfg = GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=32)
    model = GPT(cfg, make_linear("monarch", nblocks=4))
    groups = {g["name"]: {id(p) for p in g["params"]} for g in make_optimizer(model, 1, 0.1)
              .param_groups}
    block = model.blocks[0]
    assert {id(block.mlp.fc1.w1), id(block.mlp.fc1.w2), id(model.wte.weight)} <= groups["decay"]
    assert {id(block.mlp.fc1.bias), id(block.ln_1.weight)} <= groups["no_decay"]


def test_output_folder_rules(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["train", "lm", "--out", str(out), "--data", str(corpus), "--steps", "2",
            *LM_TINY, *COMMON]
    assert main(args) == 0
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--force"]) == 2 and "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").exists()
    assert main([*args[:3], str(tmp_path / "new"), *args[4:], "--resume"]) == 2
    assert main([*args, "--resume", "--lr", "0.5"]) == 2 and "lr=" in capsys.readouterr().err
    assert main([*args, "--layers", "dense", "--densify-at", "0.5", "--force"]) == 2
