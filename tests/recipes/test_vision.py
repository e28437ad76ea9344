"""``train vision``: ViT and Mixer end to end on the digits fallback, IDX folders, S2D, resume."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from tests.recipes.helpers import VISION_TINY, train

from monarch_matrices.recipes.data import load_images
from monarch_matrices.recipes.vision import Classifier, VisionConfig


@pytest.mark.parametrize("model", ["vit", "mixer"])
@pytest.mark.parametrize("layers", ["dense", "monarch"])
def test_tiny_run_learns_digits(tmp_path, model, layers):
    m = train("vision", tmp_path / "run", "--model", model, "--layers", layers,
              "--steps", "40", *VISION_TINY)
    assert m["finished"] and "digits" in m["data"]["source"] and m["data"]["test"] == 360
    assert m["final"]["test_accuracy"] > 30  # 10 classes: chance is 10%
    loss = [v for _, v in m["history"]["train loss"]]
    assert loss[-1] < 0.7 * loss[0]
    for key in ("wall_time_s", "samples_per_s", "params", "command"):
        assert m[key], key
    assert (tmp_path / "run" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_s2d_switch_keeps_the_function_and_resume_is_exact(tmp_path):
    args = ["--model", "vit", "--steps", "30", "--densify-at", "0.4", "--lowrank", "2",
            *VISION_TINY]
    whole = train("vision", tmp_path / "whole", *args)
    assert whole["densified"]["step"] == 12 and whole["densified"]["layers"] == 8
    assert whole["densified"]["max_abs_output_change"] < 1e-4
    train("vision", tmp_path / "part", *args, "--stop-after", "8")  # before the switch
    resumed = train("vision", tmp_path / "part", *args, "--resume")
    assert resumed["history"] == whole["history"]


def test_monarch_layers_sit_where_the_docs_say():
    cfg = VisionConfig(image_size=8, num_classes=10, patch_size=2, dim=32, depth=1, heads=2)
    from monarch_matrices.nn import MonarchLinear
    from monarch_matrices.recipes.layers import make_linear

    vit = Classifier("vit", cfg, make_linear("monarch"))
    mixer = Classifier("mixer", cfg, make_linear("monarch"))
    kinds = {n for n, m in vit.named_modules() if isinstance(m, MonarchLinear)}
    assert kinds == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                     "blocks.0.mlp.fc2"}
    kinds = {n for n, m in mixer.named_modules() if isinstance(m, MonarchLinear)}
    assert kinds == {"blocks.0.mlp_channels.fc1", "blocks.0.mlp_channels.fc2"}
    assert vit(torch.randn(3, 1, 8, 8)).shape == mixer(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_an_idx_folder_loads_like_fashion_mnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 12, 12)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 3, n))
    data = load_images(str(tmp_path))
    assert data.train_x.shape == (50, 1, 12, 12) and data.test_x.shape == (20, 1, 12, 12)
    assert data.num_classes == 3 and abs(float(data.train_x.mean())) < 1e-5
    m = train("vision", tmp_path / "run", "--data", str(tmp_path), "--steps", "3",
              *VISION_TINY)
    assert m["data"]["train"] == 50 and m["config"]["patch_size"] == 6


def test_the_learning_rate_default_follows_the_model():
    import argparse

    from monarch_matrices.recipes.vision import DEFAULT_LR, add_arguments, check_arguments

    def parsed(*argv):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--out", "x", *argv])
        check_arguments(args)
        return args.lr

    assert parsed("--model", "vit") == DEFAULT_LR["vit"] == 1e-3
    assert parsed("--model", "mixer") == DEFAULT_LR["mixer"] == 2e-3
    assert parsed("--model", "mixer", "--lr", "5e-4") == 5e-4
