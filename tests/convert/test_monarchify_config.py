"""MonarchifyConfig validates every field before any model is touched."""

from __future__ import annotations

import pytest

from monarch_matrices.convert import MonarchifyConfig


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nblocks": 0}, ValueError, "nblocks=0 must be >= 1"),
        ({"nblocks": 2.0}, TypeError, "nblocks must be an int"),
        ({"nblocks": True}, TypeError, "nblocks must be an int"),
        ({"rank": 0}, ValueError, "rank=0"),
        ({"min_features": -1}, ValueError, "min_features=-1"),
        ({"lowrank": -1}, ValueError, "lowrank=-1"),
        ({"init": "svd"}, ValueError, "init='svd' is not one of 'project', 'random'"),
        ({"targets": ""}, ValueError, "matches nothing"),
        ({"targets": []}, ValueError, "matches nothing"),
        ({"targets": [1]}, TypeError, "non-empty strings"),
        ({"targets": 3}, TypeError, "targets must be a list"),
        ({"exclude": "fc"}, TypeError, "exclude must be a list"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        MonarchifyConfig(**kwargs)


def test_to_dict_is_json_ready():
    def wide(name, module):
        return True

    assert MonarchifyConfig(targets=["mlp", "c_attn"]).to_dict() == {
        "nblocks": 4,
        "targets": ["mlp", "c_attn"],
        "rank": None,
        "init": "project",
        "lowrank": 0,
        "min_features": 128,
        "exclude": [],
    }
    assert MonarchifyConfig(targets=wide).to_dict()["targets"].startswith("<predicate ")
    assert MonarchifyConfig(targets=("mlp",)).targets == ("mlp",)  # lists become tuples


def test_a_config_object_drives_monarchify_through_its_fields():
    import dataclasses

    from torch import nn

    from monarch_matrices.convert import monarchify

    config = MonarchifyConfig(nblocks=2, targets=["1"], min_features=1)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16))
    report = monarchify(model, **dataclasses.asdict(config))
    assert [e.name for e in report.layers] == ["1"] and report.config == config.to_dict()
