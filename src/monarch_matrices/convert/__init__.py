"""Model surgery: turn a model's dense layers into Monarch layers and back, save and reload.

::

    from monarch_matrices.convert import monarchify, densify, save_monarch, load_monarch

    report = monarchify(model, nblocks=4, targets=["mlp", "attention"])
    print(report.table())
    save_monarch(model, "out/model")
    same = load_monarch("out/model")        # transformers models rebuild from the folder

Files: ``config`` (settings, validated), ``match`` (which layers), ``replace``
(the walker and the per-layer step), ``calibrate`` (fitting layers to their
activations: ``monarchify(..., calibration=batches)``), ``report`` (what
changed), ``io`` (save / load), ``measure`` (latency and fidelity of a
converted model).
transformers is never imported here; a model that comes from it brings it along.
"""

from .calibrate import InputStats, collect_input_stats, text_batches
from .calibration_text import CALIBRATION_SENTENCES, calibration_texts
from .config import ConversionError, MonarchifyConfig
from .io import atomic_directory, load_monarch, read_manifest, save_monarch
from .match import PRESET_NAMES, PRESETS, classify, find_targets
from .replace import densify, monarchify, monarchify_layer
from .report import LayerReport, MonarchReport, SkippedLayer

__all__ = [
    "CALIBRATION_SENTENCES",
    "PRESETS",
    "PRESET_NAMES",
    "ConversionError",
    "InputStats",
    "LayerReport",
    "MonarchReport",
    "MonarchifyConfig",
    "SkippedLayer",
    "atomic_directory",
    "calibration_texts",
    "classify",
    "collect_input_stats",
    "densify",
    "find_targets",
    "load_monarch",
    "monarchify",
    "monarchify_layer",
    "read_manifest",
    "save_monarch",
    "text_batches",
]
