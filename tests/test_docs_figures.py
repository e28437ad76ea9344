"""The docs figure script runs end to end, writes real PNGs, and fails loudly."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "make_docs_figures.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_docs_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_main_writes_the_figures(script, tmp_path, capsys):
    out = tmp_path / "nested" / "figures"  # created on demand
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matplotlib or torch warning is a failure here
        assert script.main(["--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([script.STRUCTURE_PNG, script.SLICE_PNG])  # no temp files left
    for name in names:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~script._umask()  # not 0600
        assert len(data) > 8_000, f"{name} is only {len(data)} bytes"
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)


def test_output_is_reproducible(script, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    script.main(["--out", str(first)])
    script.main(["--out", str(second)])
    for name in (script.STRUCTURE_PNG, script.SLICE_PNG):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_out_that_is_a_file_is_refused(script, tmp_path, capsys):
    target = tmp_path / "not_a_folder.png"
    target.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exc:
        script.main(["--out", str(target)])
    assert exc.value.code != 0
    assert "not a folder" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"


def test_the_drawn_pieces_multiply_back_to_the_library(script):
    # The script measures the two permutations from monarch_to_dense; check that what it
    # draws is consistent for every example, including the padded one with empty slices.
    for _, in_f, out_f, b, rank in script.EXAMPLES:
        an = script.anatomy(in_f, out_f, b, rank, seed=1)
        script._check_slices(an)
        product = an.p_out @ an.b2 @ an.p_mid @ an.b1
        assert (product - an.dense).abs().max() < 1e-12


def test_a_broken_convention_stops_the_script(script, monkeypatch, tmp_path):
    # If the dense form disagreed with the factors, the script must raise, not draw.
    real = script.monarch_to_dense

    def wrong_on_random_factors(w1, w2):
        dense = real(w1, w2)
        probe = bool(((w1 == 0) | (w1 == 1)).all())  # the permutation probes use 0/1 blocks
        return dense if probe else dense.flip(0)

    monkeypatch.setattr(script, "monarch_to_dense", wrong_on_random_factors)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        script.make_figures(tmp_path)
    assert not any(tmp_path.iterdir())
