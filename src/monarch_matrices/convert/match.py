"""Which layers of a model to convert: presets, name patterns and predicates.

Rules, as in huggingface/peft:

- a string is a preset name (``"mlp"``, ``"qkv"``, ``"attention"``, ``"all"``) or
  else a regex that must match a module's *full* name;
- a list holds preset names and module names, each matching the exact name or a
  dotted suffix (``"c_fc"`` matches ``"transformer.h.0.mlp.c_fc"``);
- a callable ``(name, module) -> bool`` decides for itself.

Presets are written per architecture family (:data:`PRESETS`) and apply as a
union, so a model from a family not listed still matches when it reuses one of
the common layer names.  Only dense layers can be converted: ``nn.Linear`` and
Hugging Face's ``Conv1D`` (GPT-2), whose weight is stored transposed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..nn._common import StructuredLinear
from .config import ConversionError, Targets

__all__ = [
    "GROUPS",
    "PRESETS",
    "PRESET_NAMES",
    "classify",
    "dense_features",
    "dense_weight",
    "find_targets",
    "is_dense_layer",
    "supported_types",
]

#: Layer groups a preset can select; ``"attention"`` is ``qkv`` + ``attention_output``.
GROUPS: tuple[str, ...] = ("mlp", "qkv", "attention_output")

#: Per family, the full-name regexes (matched as a dotted suffix) of each group.
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # BERT, RoBERTa, ELECTRA, MiniLM; ViT/DeiT as written by transformers 4.x
    "bert": {
        "mlp": (r"layer\.\d+\.intermediate\.dense", r"layer\.\d+\.output\.dense"),
        "qkv": (r"attention\.(self|attention)\.(query|key|value)",),
        "attention_output": (r"attention\.output\.dense",),
    },
    # GPT-2 (Conv1D layers; c_attn is the fused q/k/v projection)
    "gpt2": {
        "mlp": (r"mlp\.(c_fc|c_proj)",),
        "qkv": (r"(attn|crossattention)\.(c_attn|q_attn)",),
        "attention_output": (r"(attn|crossattention)\.c_proj",),
    },
    # Llama, Mistral, Qwen2, Gemma and other *_proj models; ViT in transformers 5
    "llama": {
        "mlp": (r"mlp\.(gate_proj|up_proj|down_proj)",),
        "qkv": (r"(q_proj|k_proj|v_proj|qkv_proj)",),
        "attention_output": (r"(o_proj|out_proj)",),
    },
    # ViT in transformers 5, timm's ViT and MLP-Mixer, CLIP
    "vit": {
        "mlp": (r"mlp\.(fc1|fc2)", r"mlp_(tokens|channels)\.(fc1|fc2)"),
        "qkv": (r"attn\.(qkv|q|k|v|kv)",),
        "attention_output": (r"attn\.proj",),
    },
}

PRESET_NAMES: tuple[str, ...] = ("mlp", "qkv", "attention", "all")
_PRESET_GROUPS = {"mlp": ("mlp",), "qkv": ("qkv",), "attention": ("qkv", "attention_output")}
# Top-level children that hold a model's output layer; "all" leaves them dense
# (as peft's "all-linear" does): they map to a vocabulary or to labels.
_HEAD_NAMES = ("lm_head", "classifier", "head", "score", "cls", "qa_outputs")


def _group_regex(group: str) -> re.Pattern[str]:
    alternatives = [p for family in PRESETS.values() for p in family[group]]
    return re.compile(r"(?:.*\.)?(?:" + "|".join(alternatives) + ")")


_GROUP_RES = {group: _group_regex(group) for group in GROUPS}


def classify(name: str) -> str:
    """The preset group a layer name belongs to, or ``"other"``.

    >>> classify("transformer.h.3.mlp.c_fc"), classify("encoder.layer.0.attention.output.dense")
    ('mlp', 'attention_output')
    """
    for group, regex in _GROUP_RES.items():
        if regex.fullmatch(name):
            return group
    return "other"


def _conv1d_type() -> type | None:
    # Only a model built by transformers can hold its Conv1D, and building one
    # imports this module; looking it up here keeps transformers out of our imports.
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def supported_types() -> tuple[type, ...]:
    """Dense layer types :func:`~monarch_matrices.convert.monarchify` can replace."""
    conv1d = _conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def is_dense_layer(module: nn.Module) -> bool:
    return isinstance(module, supported_types())


def dense_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a supported dense layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape  # Conv1D stores (in, out)
    return int(in_f), int(out_f)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out, in)``, whichever way it is stored (a view)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


@dataclass(frozen=True)
class _Rule:
    label: str  # how the user spelled it, for messages
    explicit: bool  # names the user chose (not a preset): unmatched or unsupported is an error
    test: Callable[[str, nn.Module], bool]


def _suffix_match(key: str) -> Callable[[str, nn.Module], bool]:
    return lambda name, _module: name == key or name.endswith("." + key)


def _group_match(groups: tuple[str, ...]) -> Callable[[str, nn.Module], bool]:
    return lambda name, _module: any(_GROUP_RES[g].fullmatch(name) for g in groups)


def _output_layer_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_children() if n in _HEAD_NAMES}
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (NotImplementedError, AttributeError):  # some base classes do not say
            out = None
        if isinstance(out, nn.Module):
            names |= {n for n, m in model.named_modules() if m is out}
    return names


def _rules(model: nn.Module, targets: Targets) -> list[_Rule]:
    def preset(key: str) -> _Rule:
        if key == "all":
            heads = _output_layer_names(model)

            def not_head(name: str, _module: nn.Module) -> bool:
                return not any(name == h or name.startswith(h + ".") for h in heads)

            return _Rule(key, False, not_head)
        return _Rule(key, False, _group_match(_PRESET_GROUPS[key]))

    if isinstance(targets, str):
        if targets in PRESET_NAMES:
            return [preset(targets)]
        try:
            regex = re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets={targets!r} is not a valid regex: {e}") from None
        return [_Rule(targets, True, lambda name, _module: regex.fullmatch(name) is not None)]
    if callable(targets):
        label = getattr(targets, "__qualname__", "predicate")
        return [_Rule(label, True, lambda name, module: bool(targets(name, module)))]
    return [preset(t) if t in PRESET_NAMES else _Rule(t, True, _suffix_match(t)) for t in targets]


def _iter_leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()):
            yield name, module


def find_targets(
    model: nn.Module, targets: Targets, exclude: tuple[str, ...] = ()
) -> list[tuple[str, nn.Module]]:
    """The layers ``targets`` selects, in model order: dense ones and Monarch ones.

    Already structured layers are returned too, so the caller can report them.
    Raises ``TypeError`` when a name the user gave (not a preset) selects a
    layer type that cannot be converted, and :class:`ConversionError` when an
    explicit name matches nothing or no layer at all matches.
    """
    rules = _rules(model, targets)
    used = [False] * len(rules)
    excluded = [_suffix_match(e) for e in exclude]
    found: list[tuple[str, nn.Module]] = []
    for name, module in _iter_leaves(model):
        hits = [i for i, rule in enumerate(rules) if rule.test(name, module)]
        for i in hits:
            used[i] = True
        if not hits or any(ex(name, module) for ex in excluded):
            continue
        if is_dense_layer(module) or isinstance(module, StructuredLinear):
            found.append((name, module))
        elif any(rules[i].explicit for i in hits) and any(
            True for _ in module.parameters(recurse=False)
        ):
            supported = ", ".join(t.__name__ for t in supported_types())
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}, which cannot be converted; "
                f"supported layer types: {supported}"
            )
    example = next((n for n, m in model.named_modules() if is_dense_layer(m)), None)
    hint = f" (a dense layer here is named {example!r})" if example else ""
    for rule, hit in zip(rules, used):
        if rule.explicit and not hit and not isinstance(targets, str) and not callable(targets):
            raise ConversionError(f"target {rule.label!r} matched no layer{hint}")
    if not found:
        shown = targets if isinstance(targets, str) or callable(targets) else list(targets)
        raise ConversionError(f"no layer matched targets={shown!r}{hint}")
    return found
