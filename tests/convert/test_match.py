"""Target selection: presets per family, names and suffixes, regexes, predicates, errors."""

from __future__ import annotations

import pytest
from tests.convert.models import FAMILIES, names
from torch import nn

from monarch_matrices.convert import ConversionError, find_targets
from monarch_matrices.convert.match import classify, supported_types


def selected(model: nn.Module, targets, exclude=()) -> set[str]:
    return {name for name, _ in find_targets(model, targets, exclude)}


PRESET_GROUPS = {
    "mlp": ("mlp",),
    "qkv": ("qkv",),
    "attention": ("qkv", "attention_output"),
    "all": ("mlp", "qkv", "attention_output", "extra"),
}


@pytest.mark.parametrize("preset", sorted(PRESET_GROUPS))
def test_presets_select_the_paper_layers_in_every_family(family, preset):
    model = family.build()
    assert selected(model, preset) == names(family, *PRESET_GROUPS[preset])


def test_presets_combine_and_groups_are_named(family):
    model = family.build()
    assert selected(model, ["mlp", "qkv"]) == names(family, "mlp", "qkv")
    for name in names(family, "mlp"):
        assert classify(name) == "mlp"
    for name in names(family, "qkv"):
        assert classify(name) == "qkv"
    for name in names(family, "attention_output"):
        assert classify(name) == "attention_output"


def test_all_leaves_the_output_layer_dense(family):
    model = family.build()
    if family.head is not None:
        assert family.head not in selected(model, "all")
        assert family.head in selected(model, [family.head])  # still selectable by name


def test_list_entries_match_exact_names_and_dotted_suffixes():
    model = FAMILIES["gpt2"].build()
    assert selected(model, ["c_fc"]) == {"transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"}
    assert selected(model, ["h.1.mlp.c_fc"]) == {"transformer.h.1.mlp.c_fc"}
    assert selected(model, ["transformer.h.0.attn.c_attn"]) == {"transformer.h.0.attn.c_attn"}
    with pytest.raises(ConversionError, match="'fc' matched no layer"):
        selected(model, ["fc"])  # a suffix must start at a dot


def test_a_string_is_a_full_name_regex():
    model = FAMILIES["gpt2"].build()
    assert selected(model, r"transformer\.h\.0\.mlp\..*") == {
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    }
    with pytest.raises(ConversionError, match="no layer matched"):
        selected(model, "c_fc")  # not a full name
    with pytest.raises(ValueError, match="not a valid regex"):
        selected(model, "mlp.(")


def test_predicate_and_exclude():
    model = FAMILIES["bert"].build()
    wide = selected(model, lambda name, m: isinstance(m, nn.Linear) and m.out_features > 64)
    assert wide == {"encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"}
    kept = selected(model, "mlp", exclude=("layer.0.output.dense",))
    assert kept == names(FAMILIES["bert"], "mlp") - {"encoder.layer.0.output.dense"}


def test_explicit_unsupported_layer_is_an_error_listing_supported_types():
    model = FAMILIES["gpt2"].build()
    with pytest.raises(TypeError, match=r"LayerNorm.*supported layer types: Linear, Conv1D"):
        selected(model, ["ln_1"])


def test_unmatched_entry_and_no_match_are_errors_naming_a_real_layer():
    model = FAMILIES["bert"].build()
    with pytest.raises(ConversionError, match=r"'nope' matched no layer.*encoder\.layer\.0"):
        selected(model, ["mlp", "nope"])
    with pytest.raises(ConversionError, match="no layer matched"):
        selected(nn.Sequential(nn.ReLU()), "all")


def test_plain_pytorch_models_and_no_transformers_needed():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert selected(model, "all") == {"0", "2"}
    assert selected(model, ["2"]) == {"2"}
    assert nn.Linear in supported_types()


def test_timm_models_when_timm_imports():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    mlp = {f"blocks.{i}.mlp.{f}" for i in range(12) for f in ("fc1", "fc2")}
    assert selected(vit, "mlp") == mlp
    assert selected(vit, "attention") == {
        f"blocks.{i}.attn.{f}" for i in range(12) for f in ("qkv", "proj")
    }
    assert "head" not in selected(vit, "all")
    mixer = timm.create_model("mixer_s16_224", pretrained=False, num_classes=10)
    assert len(selected(mixer, "mlp")) == 8 * 4
