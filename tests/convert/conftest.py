"""Fixtures for the converter tests: one tiny model per architecture family."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach a hub


@pytest.fixture(params=["bert", "gpt2", "vit", "llama"])
def family(request: pytest.FixtureRequest):
    from tests.convert.models import FAMILIES

    return FAMILIES[request.param]
