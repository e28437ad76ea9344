"""save_monarch / load_monarch: bit-for-bit round trips, manifests, and atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from tests.convert.models import names, output, transformers
from torch import nn

from monarch_matrices.convert import (
    atomic_directory,
    densify,
    load_monarch,
    monarchify,
    read_manifest,
    save_monarch,
)
from monarch_matrices.convert import io as convert_io
from monarch_matrices.nn import MonarchLinear, MonarchLowRankLinear


def test_transformers_round_trip_is_bit_for_bit_and_offline(family, tmp_path):
    model = family.build()
    report = monarchify(model, targets="all", min_features=16)
    x = family.inputs(2)
    path = save_monarch(model, tmp_path / "saved", base_model="tiny/" + family.name)
    assert {"model.safetensors", "monarch.json", "config.json"} <= {p.name for p in path.iterdir()}

    loaded = load_monarch(path)  # built from config.json: nothing downloads (HF_HUB_OFFLINE=1)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(output(loaded, x), output(model, x))
    for e in report.layers:
        layer = loaded.get_submodule(e.name)
        assert isinstance(layer, MonarchLinear) and layer.replaced_type == e.replaced
    if family.name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert isinstance(densify(loaded).transformer.h[0].mlp.c_fc,
                          transformers.pytorch_utils.Conv1D)

    manifest = read_manifest(path)
    assert manifest["library"] == "transformers" and manifest["model_class"] == type(model).__name__
    assert manifest["base_model"] == "tiny/" + family.name
    assert set(manifest["layers"]) == {e.name for e in report.layers}
    spec = manifest["layers"][sorted(names(family, "mlp"))[0]]
    assert spec["type"] == "MonarchLinear" and spec["nblocks"] == 4 and spec["dtype"] == "float32"


def test_plain_model_loads_into_its_dense_architecture(tmp_path):
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64, bias=False))

    model = build().to(torch.bfloat16)
    monarchify(model, targets="all", min_features=1, rank=2)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    save_monarch(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"plain PyTorch model.*pass model="):
        load_monarch(tmp_path / "m")
    loaded = load_monarch(tmp_path / "m", model=build())
    assert loaded[2].bias is None and loaded[0].rank == 2 and loaded[0].w1.dtype == torch.bfloat16
    assert torch.equal(loaded(x), model(x))


def test_monarch_lowrank_layers_round_trip(tmp_path):
    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))

    model = build()
    monarchify(model, targets="all", min_features=1, lowrank=3)
    save_monarch(model, tmp_path / "m")
    spec = read_manifest(tmp_path / "m")["layers"]["0"]
    assert spec["type"] == "MonarchLowRankLinear" and spec["lowrank"] == 3
    loaded = load_monarch(tmp_path / "m", model=build())
    assert isinstance(loaded[0], MonarchLowRankLinear) and loaded[0].lowrank == 3
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model(x))


def test_loading_into_the_wrong_model_fails_and_leaves_it_alone(tmp_path):
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    monarchify(model, targets="all", min_features=1)
    save_monarch(model, tmp_path / "m")
    other = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    with pytest.raises(ValueError, match=r"layer '0' is 64→96 here but 64→128"):
        load_monarch(tmp_path / "m", model=other)
    assert type(other[0]) is nn.Linear

    shaped_alike = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(4, 4))
    state = {k: v.clone() for k, v in shaped_alike.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \['3.bias', '3.weight'\]"):
        load_monarch(tmp_path / "m", model=shaped_alike)
    assert type(shaped_alike[0]) is nn.Linear
    assert all(torch.equal(v, state[k]) for k, v in shaped_alike.state_dict().items())


def test_refuses_to_overwrite_unless_forced(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32))
    target = tmp_path / "out"
    target.mkdir()
    save_monarch(model, target)  # an empty folder holds nothing to overwrite
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty; pass force=True"):
        save_monarch(model, target)
    assert (target / "keep.txt").exists()
    save_monarch(model, target, force=True, extra_files={"note.txt": "new"})
    assert not (target / "keep.txt").exists() and (target / "note.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(32, 32))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "weights").write_text("previous")

    def broken(model, filename, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(convert_io, "save_model", broken)
    with pytest.raises(OSError, match="disk full"):
        save_monarch(model, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_monarch(model, tmp_path / "old", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "weights").read_text() == "previous"
    with pytest.raises(ValueError, match="plain file name"):
        save_monarch(model, tmp_path / "x", extra_files={"../escape": "no"})
    assert not (tmp_path / "x").exists()


def test_atomic_directory_appears_only_on_success(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
        assert not (tmp_path / "d").exists()
    assert (tmp_path / "d" / "f").read_text() == "x"


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"has no monarch\.json"):
        read_manifest(tmp_path)
    (tmp_path / "monarch.json").write_text(json.dumps({"format": "monarch-matrices",
                                                       "format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99"):
        read_manifest(tmp_path)


def test_meta_models_cannot_be_saved(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ValueError, match="meta device"):
        save_monarch(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_densified_folder_is_an_ordinary_transformers_checkpoint(name, tmp_path):
    from tests.convert.models import FAMILIES

    family = FAMILIES[name]
    model = family.build()
    monarchify(model, targets="all", min_features=16)
    save_monarch(model, tmp_path / "monarch")
    dense = densify(load_monarch(tmp_path / "monarch"))
    save_monarch(dense, tmp_path / "dense")
    assert read_manifest(tmp_path / "dense")["layers"] == {}
    reloaded = transformers.AutoModel.from_pretrained(tmp_path / "dense") if name == "bert" else (
        transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "dense")  # Conv1D layout kept
    )
    x = family.inputs(2)
    torch.testing.assert_close(output(reloaded, x), output(model, x), rtol=1e-4, atol=1e-5)
