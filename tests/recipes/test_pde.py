"""``monarch-matrices train pde`` end to end on tiny problems (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monarch_matrices.cli import main

TINY = ["--train-samples", "8", "--test-samples", "4", "--burgers-n", "32", "--ns-n", "16",
        "--ns-time", "0.05", "--width", "4", "--modes", "4", "--layers", "2",
        "--batch-size", "4", "--threads", "1", "--no-progress"]


def train(out: Path, *args: str) -> int:
    return main(["train", "pde", "--out", str(out), *TINY, *args])


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_both_problems_write_metrics_and_pictures(tmp_path):
    out = tmp_path / "run"
    assert train(out, "--steps", "3") == 0
    assert {p.name for p in out.iterdir()} == {
        "checkpoint.pt", "metrics.json", "data_burgers.pt", "data_ns.pt", "burgers.png",
        "navier_stokes.png"}
    m = metrics(out)
    assert m["recipe"] == "pde" and set(m["problems"]) == {"burgers", "ns"}
    for problem in m["problems"].values():
        fno, mon = problem["models"]["fno"], problem["models"]["monarch"]
        assert mon["params"] > fno["params"] > 0
        assert 0 < fno["test_rel_l2"] < 10 and 0 < mon["test_rel_l2"] < 10
        assert mon["transform_change"] > 0 and "transform_change" not in fno
        assert problem["monarch_vs_fno"]["error_ratio"] == pytest.approx(
            mon["test_rel_l2"] / fno["test_rel_l2"])


def test_resume_gives_the_numbers_of_an_uninterrupted_run(tmp_path, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = ("--problem", "burgers", "--steps", "6", "--checkpoint-every", "2")
    assert train(whole, *args) == 0
    assert train(parts, *args, "--stop-after", "4") == 0  # stops inside the Monarch model
    assert "--resume" in capsys.readouterr().out and not (parts / "metrics.json").exists()
    assert train(parts, *args, "--resume") == 0
    a, b = metrics(whole)["problems"]["burgers"], metrics(parts)["problems"]["burgers"]
    for kind in ("fno", "monarch"):
        assert a["models"][kind]["test_rel_l2"] == b["models"][kind]["test_rel_l2"]
    state = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert len(state["stages"]["burgers/monarch"]["losses"]) == 6


def test_out_dir_rules(tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--problem", "burgers", "--steps", "1")
    assert train(out, *args) == 0
    assert train(out, *args) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert train(out, *args, "--resume", "--lr", "0.5") == 2
    assert "changed: --lr 0.001 → 0.5" in capsys.readouterr().err
    assert train(out, *args, "--force") == 0
    (out / "notes.txt").write_text("mine")
    assert train(out, *args, "--force") == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert train(tmp_path / "new", *args, "--resume") == 2
    assert train(tmp_path / "bad", "--problem", "burgers", "--modes", "40") == 2
    assert "--modes=40 does not fit" in capsys.readouterr().err


def test_one_model_alone(tmp_path, capsys):
    out = tmp_path / "fno"
    assert train(out, "--problem", "burgers", "--steps", "2", "--models", "fno") == 0
    problem = metrics(out)["problems"]["burgers"]
    assert set(problem["models"]) == {"fno"} and "monarch_vs_fno" not in problem
    assert train(tmp_path / "x", "--models", "dense") == 2
    assert "--models 'dense'" in capsys.readouterr().err
