"""Fixtures of the recipe tests (helpers are in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """Recipes set torch's thread count; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _digits_only(monkeypatch, tmp_path):
    """Vision tests use scikit-learn's digits whether or not Fashion-MNIST is installed."""
    from monarch_matrices.recipes import data

    monkeypatch.setattr(data, "FASHION_MNIST", tmp_path / "no-fashion-mnist")


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small text file with structure a tiny model can learn in a few steps."""
    path = tmp_path / "corpus.txt"
    lines = [f"the {w} sat on the mat and the {w} was glad." for w in
             ("cat", "dog", "bird", "fox", "hen", "cow", "pig", "ram")]
    path.write_text("\n".join(lines * 60))
    return path
