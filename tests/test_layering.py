"""The package's layers import downward only, and the top-level API is complete."""

from __future__ import annotations

import subprocess
import sys

import monarch_matrices


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m for m in out.stdout.split() if m.startswith("monarch_matrices")}


def test_ops_loads_no_higher_layer():
    loaded = _modules_after_import("monarch_matrices.ops")
    higher = {"nn", "convert", "recipes", "cli", "transforms"}
    assert not {m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in higher}


def test_nn_loads_nothing_above_it():
    loaded = _modules_after_import("monarch_matrices.nn")
    assert not {m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in {"convert", "cli"}}


def test_top_level_import_is_lazy_and_all_names_resolve():
    assert _modules_after_import("monarch_matrices") == {"monarch_matrices"}
    for name in monarch_matrices.__all__:
        assert getattr(monarch_matrices, name) is not None
