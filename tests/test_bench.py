"""The benchmark program runs, reports consistent figures and writes its files safely.

No timing is asserted here: speed is measured by the program, not by tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from monarch_matrices.bench import CASES, BenchCase, format_table, main, run_case, summarize


def test_run_case_reports_consistent_ratios():
    case = BenchCase("tiny", 64, 48, 40, 4)
    for train in (False, True):
        result = run_case(case, torch.float32, train=train, repeats=2)
        assert result.mode == ("train" if train else "forward")
        assert result.speedup > 0 and result.speedup_reference > 0 and result.over_reference > 0
        assert result.ideal == pytest.approx(48 * 40 / (4 * 10 * 12 + 4 * 10 * 10))
        assert result.fraction_of_ideal == pytest.approx(result.speedup / result.ideal)
    assert "tiny" in format_table([result])


def test_summary_groups_large_and_small_cases():
    results = [
        run_case(CASES["small1-fc1"], torch.float32, train=False, repeats=1),
        run_case(BenchCase("big", 4096, 64, 64, 4), torch.float32, train=False, repeats=1),
    ]
    summary = summarize(results)
    assert set(summary) == {
        "float32/forward/large_geomean_fraction_of_ideal",
        "float32/forward/large_min_fraction_of_ideal",
        "float32/geomean_over_reference",
        "float32/small_min_speedup",
    }
    assert summary["float32/small_min_speedup"] == results[0].speedup


def test_cli_writes_json_and_plot_and_refuses_to_overwrite(tmp_path, capsys):
    args = ["--cases", "small1-fc1", "--dtype", "float32", "--mode", "forward", "--repeats", "1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["results"][0]["case"] == "small1-fc1"
    assert payload["machine"]["threads"] >= 1
    assert (tmp_path / "bench.png").stat().st_size > 5000
    assert "small1-fc1" in capsys.readouterr().out
    before = (tmp_path / "bench.json").read_bytes()
    with pytest.raises(SystemExit, match="--force"):
        main([*args, "--out", str(tmp_path)])
    assert (tmp_path / "bench.json").read_bytes() == before
    assert main([*args, "--out", str(tmp_path), "--force"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--threads", "0"]])
def test_bad_arguments(bad):
    with pytest.raises(SystemExit, match="must be >= 1"):
        main(["--cases", "small1-fc1", *bad])
