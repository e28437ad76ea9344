"""monarchify / densify on real architectures: what changes, what must not, and exactness."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.convert.models import FAMILIES, names, output, transformers
from torch import nn

from monarch_matrices.convert import ConversionError, densify, monarchify, monarchify_layer
from monarch_matrices.nn import MonarchLinear
from monarch_matrices.ops import monarch_to_dense, project

Conv1D = transformers.pytorch_utils.Conv1D


def dense_map(module: nn.Module) -> torch.Tensor:
    """The (out, in) matrix a dense layer applies, whichever way it stores it."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def test_monarchify_replaces_exactly_the_targets_and_keeps_the_rest(family):
    model = family.build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    originals = {n: m for n, m in model.named_modules()}
    x = family.inputs(2)
    report = monarchify(model, targets=["mlp", "attention"], min_features=16)

    targets = names(family, "mlp", "qkv", "attention_output")
    assert report.model is model
    assert {e.name for e in report.layers} == targets
    for name, module in model.named_modules():
        if name in targets:
            assert isinstance(module, MonarchLinear) and module.nblocks == 4
            old = originals[name]
            w1, w2, _, rel = project(dense_map(old).detach(), nblocks=4)
            torch.testing.assert_close(module.w1, w1)  # Conv1D projected as its transpose
            torch.testing.assert_close(module.w2, w2)
            assert module.projection_error == pytest.approx(float(rel))
            assert module.replaced_type == type(old).__name__
        elif not any(name.startswith(t + ".") for t in targets):
            assert module is originals[name]
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[0] not in targets:
            assert torch.equal(p, before[name]), name  # untouched weights untouched
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert report.params_after < report.params_before
    assert output(model, x).shape == output(family.build(), x).shape
    assert torch.isfinite(output(model, x)).all()


def test_gpt2_tied_output_embedding_stays_tied_and_is_reported_when_asked_for():
    model = FAMILIES["gpt2"].build()
    wte = model.transformer.wte.weight
    report = monarchify(model, targets="all", min_features=16)
    assert model.lm_head.weight is wte and model.transformer.wte.weight is wte
    assert "lm_head" not in {e.name for e in report.layers}

    fresh = FAMILIES["gpt2"].build()
    state = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ConversionError, match=r"tied to transformer\.wte\.weight"):
        monarchify(fresh, targets=["lm_head"], min_features=16)
    assert type(fresh.lm_head) is nn.Linear
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


def test_densify_is_exact_and_restores_the_dense_types(family):
    model = family.build().double()
    x = {k: v.double() if v.is_floating_point() else v for k, v in family.inputs(2).items()}
    monarchify(model, targets="all", min_features=16)
    monarch_out = output(model, x)
    dense = densify(model, inplace=False)
    assert any(isinstance(m, MonarchLinear) for m in model.modules())  # copy left alone
    assert not any(isinstance(m, MonarchLinear) for m in dense.modules())
    torch.testing.assert_close(output(dense, x), monarch_out, rtol=1e-12, atol=1e-12)
    expected = Conv1D if family.name == "gpt2" else nn.Linear
    for name in names(family, "mlp"):
        assert type(dense.get_submodule(name)) is expected


def test_densify_keeps_dtype_device_mode_and_grad_flags():
    layer = MonarchLinear(48, 96, nblocks=4, dtype=torch.bfloat16).eval()
    layer.w1.requires_grad_(False)
    layer.w2.requires_grad_(False)
    dense = densify(nn.Sequential(layer))[0]
    assert type(dense) is nn.Linear and dense.weight.dtype == torch.bfloat16
    assert not dense.training and not dense.weight.requires_grad and dense.bias.requires_grad
    exact = monarch_to_dense(layer.w1.double(), layer.w2.double()).to(torch.bfloat16)
    assert torch.equal(dense.weight, exact)  # formed in float64, rounded once


def test_inplace_false_leaves_the_model_alone():
    model = FAMILIES["bert"].build()
    state = copy.deepcopy(model.state_dict())
    report = monarchify(model, targets="mlp", min_features=16, inplace=False)
    assert report.model is not model
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_failure_leaves_the_model_unchanged():
    model = FAMILIES["bert"].build()
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")  # the last target
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="NaN"):
        monarchify(model, targets="mlp", min_features=16)
    assert not any(isinstance(m, MonarchLinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) or (k.endswith("1.output.dense.weight") and v.isnan().any())


def test_small_layers_are_skipped_and_reported():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 32))
    report = monarchify(model, targets="all", min_features=64)
    assert [e.name for e in report.layers] == ["0"]
    assert [(s.name, s.reason) for s in report.skipped] == [("2", "smaller than min_features=64")]
    assert type(model[2]) is nn.Linear
    with pytest.raises(ConversionError, match="all 4 selected layers were skipped"):
        monarchify(FAMILIES["bert"].build(), targets="mlp", min_features=128)


def test_nblocks_that_fits_no_layer_is_a_clear_error():
    with pytest.raises(ConversionError, match=r"nblocks=100 fits no selected layer.*<= 64"):
        monarchify(FAMILIES["gpt2"].build(), 100, targets="mlp", min_features=16)


def test_layers_without_savings_shared_or_inside_multihead_attention_are_skipped():
    shared = nn.Linear(64, 64)
    model = nn.ModuleDict({
        "mha": nn.MultiheadAttention(64, 2),
        "a": shared,
        "b": shared,
        "plain": nn.Linear(64, 64),
    })
    report = monarchify(model, 4, targets="all", min_features=1)
    reasons = {s.name: s.reason for s in report.skipped}
    assert "MultiheadAttention" in reasons["mha.out_proj"]
    assert "shared module" in reasons["a"]
    assert [e.name for e in report.layers] == ["plain"]
    assert model["a"] is shared and type(model["mha"].out_proj) is not MonarchLinear
    with pytest.raises(ConversionError, match="Monarch would not save parameters"):
        monarchify(nn.Sequential(nn.Linear(64, 64)), 1, targets="all", min_features=1)
    with pytest.raises(TypeError, match="monarchify_layer"):
        monarchify(nn.Linear(64, 64))


def test_conversion_twice_reports_existing_monarch_layers():
    model = FAMILIES["llama"].build()
    monarchify(model, targets="mlp", min_features=16)
    with pytest.raises(ConversionError, match="already a MonarchLinear"):
        monarchify(model, targets="mlp", min_features=16)


def test_random_init_dtype_and_flags():
    model = FAMILIES["vit"].build().to(torch.bfloat16).train()
    model.vit.layers[0].mlp.fc1.weight.requires_grad_(False)
    report = monarchify(model, targets="mlp", init="random", min_features=16)
    fc1 = model.vit.layers[0].mlp.fc1
    assert isinstance(fc1, MonarchLinear) and fc1.w1.dtype == torch.bfloat16 and fc1.training
    assert not fc1.w1.requires_grad and fc1.bias.requires_grad
    assert all(e.projection_error is None for e in report.layers)
    out = model(pixel_values=torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_monarchify_layer_handles_linear_and_conv1d_and_nothing_else():
    conv = Conv1D(96, 48)  # (nf=out, nx=in): weight stored (48, 96)
    layer = monarchify_layer(conv, nblocks=4)
    x = torch.randn(3, 48)
    w1, w2, _, _ = project(conv.weight.T.detach(), nblocks=4)
    torch.testing.assert_close(layer(x), x @ monarch_to_dense(w1, w2).T + conv.bias)
    with pytest.raises(TypeError, match="Conv2d"):
        monarchify_layer(nn.Conv2d(3, 3, 1))


def test_meta_device_needs_random_init():
    with torch.device("meta"):
        model = FAMILIES["gpt2"].build()
    with pytest.raises(ConversionError, match=r"meta device.*init='random'"):
        monarchify(model, targets="mlp", min_features=16)
    report = monarchify(model, targets="mlp", init="random", min_features=16)
    assert report.model.transformer.h[0].mlp.c_fc.w1.is_meta


# The paper's parameter counts (Dao et al. 2022, tables for GPT-2 and ViT), nblocks=4.
# Built on the meta device: shapes only, no memory, no init, well under a second.
PAPER = [
    ("gpt2-small", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config()),
     ["mlp", "qkv"], 124e6, 72e6),
    ("gpt2-medium",
     lambda: transformers.GPT2LMHeadModel(
         transformers.GPT2Config(n_layer=24, n_embd=1024, n_head=16)),
     ["mlp", "qkv"], 355e6, 165e6),
    ("vit-b16",
     lambda: transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000)),
     ["mlp", "attention"], 86.6e6, 33.0e6),
]


@pytest.mark.parametrize(("name", "build", "targets", "dense", "monarch"), PAPER,
                         ids=[p[0] for p in PAPER])
def test_parameter_counts_reproduce_the_paper(name, build, targets, dense, monarch):
    with torch.device("meta"):
        model = build()
    report = monarchify(model, 4, targets=targets, init="random")
    assert report.params_before == pytest.approx(dense, rel=0.02)
    assert report.params_after == pytest.approx(monarch, rel=0.02)
    assert report.skipped == []
