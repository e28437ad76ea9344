"""mSENSE (a learnable Monarch DFT inside SENSE) and ``monarch-matrices train mri`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monarch_matrices.cli import main
from monarch_matrices.recipes.mri import MonarchSense, UNet
from monarch_matrices.recipes.mri_data import (
    cartesian_mask,
    coil_sensitivities,
    ellipse_phantom,
    sense_reconstruct,
    simulate_kspace,
)

pytest.importorskip("skimage")

TINY = ["--size", "16", "--coils", "4", "--train-phantoms", "6", "--test-phantoms", "3",
        "--cg-iters", "3", "--unet-width", "4", "--batch-size", "2", "--threads", "1",
        "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def acquisition(n: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.stack([ellipse_phantom(n, g) for _ in range(2)])
    s = coil_sensitivities(n, 4)
    m = torch.stack([cartesian_mask(n, r, g) for r in (2, 4)])[:, None]
    return x, s, m, simulate_kspace(x, s, m, 0.01, g)


def test_msense_starts_as_sense():
    x, s, m, k = acquisition()
    model = MonarchSense(16, lam=0.01, iters=5)
    with torch.no_grad():
        ours = model(k, s, m)
    theirs = sense_reconstruct(k, s, m, lam=0.01, iters=5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_msense_adjoint_stays_the_adjoint_after_training_moves_it():
    model = MonarchSense(8, lam=0.0, iters=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    a = torch.randn(3, 8, 8, dtype=torch.complex64)
    b = torch.randn(3, 8, 8, dtype=torch.complex64)
    lhs = (model.forward_transform(a).conj() * b).sum()
    rhs = (a.conj() * model.adjoint_transform(b)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_msense_gradients_reach_the_factors():
    x, s, m, k = acquisition()
    model = MonarchSense(16, lam=0.01, iters=3)
    torch.nn.functional.mse_loss(model(k, s, m).abs(), x).backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_unet_keeps_the_shape_and_refuses_odd_sizes():
    net = UNet(4)
    assert net(torch.rand(2, 16, 16)).shape == (2, 16, 16)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 10, 10))


def train(out: Path, *args: str) -> int:
    return main(["train", "mri", "--out", str(out), *TINY, *args])


def test_run_writes_metrics_per_acceleration_and_a_grid(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--steps", "2", "--accelerations", "2,4") == 0
    assert {p.name for p in out.iterdir()} == {"checkpoint.pt", "metrics.json", "mri.png"}
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["methods"]) == {"zero-filled", "SENSE", "mSENSE", "U-Net"}
    for method in m["methods"].values():
        assert set(method["per_acceleration"]) == {"2", "4"}
        for s in method["per_acceleration"].values():
            assert 0 < s["psnr"] < 100 and -1 <= s["ssim"] <= 1
    assert m["methods"]["mSENSE"]["params"] == 2 * 2 * 16**3  # dft2(16, 16): two 16-block factors
    assert set(m["mSENSE_minus_SENSE"]) == {"2", "4"}
    assert train(out, "--steps", "2") == 2
    assert "not empty" in capsys.readouterr().err


def test_resume_matches_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = ("--steps", "3", "--no-unet", "--accelerations", "2")
    assert train(whole, *args) == 0
    assert train(parts, *args, "--stop-after", "2") == 0
    assert train(parts, *args, "--resume") == 0
    a, b = (json.loads((p / "metrics.json").read_text())["methods"] for p in (whole, parts))
    assert a["mSENSE"]["per_acceleration"] == b["mSENSE"]["per_acceleration"]


@pytest.mark.parametrize(
    ("args", "match"),
    [(["--accelerations", "2,x"], "expected numbers"), (["--accelerations", "0.5"], ">= 1"),
     (["--size", "18"], "multiple of 4"), (["--noise", "-1"], "--noise")],
)
def test_bad_options_exit_2(tmp_path, capsys, args, match):
    assert train(tmp_path / "run", *args) == 2
    assert match in capsys.readouterr().err
