"""Training and evaluation programs for the paper's settings (``monarch-matrices train``).

Each recipe is one readable module exposing ``add_arguments(parser)`` (its
command-line options; keep module import light, import heavy packages inside
``run``) and ``run(args) -> int`` (the exit code).  :data:`RECIPES` maps the
name used on the command line to ``(module, one-line help)``; the CLI builds
``monarch-matrices train NAME`` from it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["RECIPES", "load_recipe"]

RECIPES: dict[str, tuple[str, str]] = {}


def load_recipe(name: str) -> ModuleType:
    """Import the module of recipe ``name``."""
    if name not in RECIPES:
        known = ", ".join(sorted(RECIPES)) or "none yet"
        raise ValueError(f"unknown recipe {name!r}; known recipes: {known}")
    return importlib.import_module(RECIPES[name][0])


RECIPES["lm"] = (
    "monarch_matrices.recipes.lm",
    "GPT-style character model on Shakespeare: dense vs Monarch, E2E and S2D (--densify-at)",
)
RECIPES["vision"] = (
    "monarch_matrices.recipes.vision",
    "ViT or MLP-Mixer on Fashion-MNIST (digits fallback): dense vs Monarch, E2E and S2D",
)
RECIPES["finetune"] = (
    "monarch_matrices.recipes.finetune",
    "D2S: fit Monarch layers to all-MiniLM-L6-v2 and fine-tune on tweet sentiment vs dense",
)
RECIPES["pde"] = (
    "monarch_matrices.recipes.pde",
    "FNO vs Monarch neural operator (learnable DFTs) on Burgers and Navier–Stokes data",
)
RECIPES["mri"] = (
    "monarch_matrices.recipes.mri",
    "SENSE vs mSENSE (learnable Monarch DFT) on simulated multi-coil MRI, 2x-4x",
)
