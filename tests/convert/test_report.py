"""The conversion report: consistent numbers, lossless dict/JSON, readable table, plot."""

from __future__ import annotations

import pytest
from torch import nn

from monarch_matrices.convert import MonarchReport, monarchify
from monarch_matrices.convert.report import plot_projection_errors
from monarch_matrices.nn import MonarchLinear


def _report(**kwargs) -> MonarchReport:
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.Linear(256, 8))
    return monarchify(model, 4, targets="all", min_features=64, **kwargs)


def test_numbers_add_up():
    report = _report()
    model = report.model
    assert [e.name for e in report.layers] == ["0", "2"]
    assert [(s.name, s.in_features, s.out_features) for s in report.skipped] == [("3", 256, 8)]
    for e in report.layers:
        layer = model.get_submodule(e.name)
        assert isinstance(layer, MonarchLinear)
        assert e.params_before == e.in_features * e.out_features + e.out_features
        assert e.params_after == sum(p.numel() for p in layer.parameters())
        assert e.flops_before == 2 * e.in_features * e.out_features
        assert e.flops_after == 2 * (layer.w1.numel() + layer.w2.numel())
        assert 0 < e.projection_error < 1 and e.group == "other" and e.replaced == "Linear"
    saved_flops = sum(e.flops_before - e.flops_after for e in report.layers)
    assert report.linear_flops_before - report.linear_flops_after == saved_flops
    saved_params = sum(e.params_before - e.params_after for e in report.layers)
    assert report.params_before - report.params_after == saved_params
    assert report.param_ratio == pytest.approx(report.params_after / report.params_before)


def test_dict_and_json_round_trip():
    report = _report()
    again = MonarchReport.from_json(report.to_json())
    assert again == report  # the model is not part of the comparison
    data = report.to_dict()
    assert data["totals"]["layers_converted"] == 2 and data["config"]["nblocks"] == 4
    assert data["totals"]["max_projection_error"] == max(e.projection_error for e in report.layers)


def test_table_lists_layers_skips_and_totals():
    text = str(_report())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "group", "in→out"]
    assert any(line.startswith("0 ") and "256→512" in line for line in lines)
    assert "skipped 3 (256→8): smaller than min_features=64" in text
    assert "converted 2 layers" in text and text.splitlines()[-1].startswith("model: ")
    random_text = _report(init="random").table()
    assert "—" in random_text and "relative projection error" not in random_text


def test_plot_is_a_png_and_needs_projection_errors():
    pytest.importorskip("matplotlib")
    png = plot_projection_errors(_report())
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    with pytest.raises(ValueError, match="no projection errors"):
        plot_projection_errors(_report(init="random"))
