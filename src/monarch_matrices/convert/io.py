"""Save and reload converted models: safetensors weights plus a JSON manifest.

A folder written by :func:`save_monarch` holds

- ``model.safetensors``: the state dict (a tied weight stored once), names as
  the model's own ``state_dict`` spells them;
- ``monarch.json``: the manifest, which layers are Monarch (or block-diagonal)
  and with what shapes, plus the model class and the base model it came from;
- for a transformers model, ``config.json`` (and the tokenizer when given), so
  the folder is laid out like ``save_pretrained`` output and rebuilds offline.

:func:`load_monarch` rebuilds the layers from the manifest and loads the
weights as stored: no projection runs again and outputs match bit for bit.
Writes go to a temporary folder beside the target that is renamed into place
at the end, so a crash or an error never leaves a half-written folder.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .. import __version__
from ..nn import BlockdiagLinear, MonarchLinear, MonarchLowRankLinear
from ..nn._common import StructuredLinear
from .match import dense_features, is_dense_layer
from .replace import REPLACED_ATTR

__all__ = [
    "MANIFEST_NAME",
    "WEIGHTS_NAME",
    "atomic_directory",
    "check_writable",
    "load_monarch",
    "read_manifest",
    "save_monarch",
]

MANIFEST_NAME = "monarch.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "monarch-matrices"
FORMAT_VERSION = 1
_LAYER_TYPES: dict[str, type[StructuredLinear]] = {
    "MonarchLinear": MonarchLinear,
    "MonarchLowRankLinear": MonarchLowRankLinear,
    "BlockdiagLinear": BlockdiagLinear,
}


def check_writable(path: str | os.PathLike[str], force: bool = False) -> None:
    """Raise ``FileExistsError`` unless ``path`` can become a new folder (see ``force``)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FileExistsError(f"{path} exists and is not a folder; choose another path")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise FileExistsError(f"{path} exists and is not empty; pass force=True to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``path`` when the block succeeds.

    The folder is made beside ``path`` (same file system, so the final rename
    is atomic) and removed if the block raises.  An existing non-empty
    ``path`` is refused unless ``force``, in which case it is replaced only
    after everything new has been written.
    """
    path = Path(path)
    check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result should not be
    try:
        yield tmp
        check_writable(path, force)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _layer_spec(layer: StructuredLinear) -> dict[str, Any]:
    kind = type(layer).__name__
    if _LAYER_TYPES.get(kind) is not type(layer):
        raise ValueError(
            f"cannot save a {kind} layer; the manifest knows {', '.join(_LAYER_TYPES)}"
        )
    spec: dict[str, Any] = {
        "type": kind,
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "nblocks": layer.nblocks,
        "bias": layer.bias is not None,
        "dtype": str(next(layer.parameters()).dtype).removeprefix("torch."),
        "replaced": getattr(layer, REPLACED_ATTR, "Linear"),
    }
    if isinstance(layer, MonarchLinear):
        spec["rank"] = layer.rank
    if isinstance(layer, MonarchLowRankLinear):
        spec["lowrank"] = layer.lowrank
    return spec


def _model_dtype(model: nn.Module) -> str | None:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def _is_transformers_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return type(model).__module__.startswith("transformers.") and hasattr(config, "to_json_file")


def _manifest(model: nn.Module, base_model: str | None) -> dict[str, Any]:
    layers = {
        name: _layer_spec(m) for name, m in model.named_modules() if isinstance(m, StructuredLinear)
    }
    hf = _is_transformers_model(model)
    if base_model is None and hf:
        base_model = getattr(model.config, "name_or_path", None) or None
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "library": "transformers" if hf else "torch",
        "model_class": type(model).__name__,
        "model_module": type(model).__module__,
        "base_model": base_model,
        "dtype": _model_dtype(model),
        "weights": WEIGHTS_NAME,
        "layers": layers,
    }
    if hf:
        import transformers  # already imported: the model came from it

        manifest["transformers_version"] = transformers.__version__
        manifest["model_type"] = getattr(model.config, "model_type", None)
    return manifest


def save_monarch(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    force: bool = False,
    base_model: str | None = None,
    tokenizer: Any = None,
    extra_files: Mapping[str, bytes | str] | None = None,
) -> Path:
    """Write ``model`` to the folder ``path`` (weights, manifest, config), atomically.

    Args:
        model: a model with Monarch layers (dense-only models are saved too).
        path: the folder to create; refused if it exists and is not empty,
            unless ``force`` (then replaced once the new one is complete).
        base_model: where the dense model came from (hub id or path), for the
            manifest; defaults to a transformers model's ``name_or_path``.
        tokenizer: saved alongside (``save_pretrained``) so the folder is self-contained.
        extra_files: more files to write in the same atomic step (name → content).

    Returns:
        ``Path(path)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("cannot save a model on the meta device: it holds no values")
    manifest = _manifest(model, base_model)  # fails on unsupported layers before any write
    for name in extra_files or {}:
        if Path(name).name != name or name in (MANIFEST_NAME, WEIGHTS_NAME):
            raise ValueError(f"extra file name {name!r} must be a plain file name of its own")
    with atomic_directory(path, force=force) as tmp:
        weights = tmp / WEIGHTS_NAME
        save_model(model, str(weights), metadata={"format": "pt"}, force_contiguous=True)
        weights.chmod(0o666 & ~_umask())  # the writer makes it private; other files are not
        if manifest["library"] == "transformers":
            model.config.to_json_file(str(tmp / "config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            target = tmp / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
    return Path(path)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a saved folder, checked for format and version."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder written by save_monarch")
    file = path / MANIFEST_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{path} has no {MANIFEST_NAME}; it was not written by save_monarch"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version={manifest.get('format_version')!r}; "
            f"this version of the library reads {FORMAT_VERSION}"
        )
    return manifest


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    # Building a model only to overwrite every weight: skip transformers' init
    # (seconds for GPT-2 sized models).  It moved between major versions.
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            factory = getattr(importlib.import_module(module), "no_init_weights", None)
        except ImportError:
            continue
        if factory is not None:
            return factory()
    return contextlib.nullcontext()


def _build_transformers_model(path: Path, manifest: dict[str, Any]) -> nn.Module:
    if manifest["library"] != "transformers":
        raise ValueError(
            f"{path} holds a plain PyTorch model ({manifest['model_class']}); "
            "pass model= an instance of its dense architecture to load into"
        )
    try:
        import transformers
    except ImportError:
        raise ImportError(
            f"{path} holds a transformers model; install transformers to load it"
        ) from None
    cls = getattr(transformers, manifest["model_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(
            f"transformers {transformers.__version__} has no model class "
            f"{manifest['model_class']!r} (saved with {manifest.get('transformers_version')})"
        )
    config = cls.config_class.from_pretrained(str(path))  # a local folder: nothing downloads
    with _no_init_weights():
        model = cls(config)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # newer transformers tie inside the init that was skipped
    if manifest.get("dtype"):
        model.to(getattr(torch, manifest["dtype"]))
    return model.eval()


def load_monarch(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_monarch`, with exactly its weights.

    Args:
        path: the saved folder.
        model: the dense architecture to load into (modified in place).  May
            be left out for transformers models, which are rebuilt from the
            folder's ``config.json`` offline (and returned in eval mode).
        device: where to put the model; default: where ``model`` is, else CPU.

    Returns:
        The model with its Monarch layers in place and every weight loaded
        (the Monarch factors are read, not projected again).
    """
    path = Path(path)
    manifest = read_manifest(path)
    given = model is not None
    if model is None:
        model = _build_transformers_model(path, manifest)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")

    replacements: list[tuple[str, nn.Module, nn.Module]] = []
    for name, spec in manifest["layers"].items():  # check and build all before swapping
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{path}: layer {name!r} is not in the given {type(model).__name__}"
            ) from None
        if is_dense_layer(old):
            in_f, out_f = dense_features(old)
        elif isinstance(old, StructuredLinear):
            in_f, out_f = old.in_features, old.out_features
        else:
            raise ValueError(f"{path}: layer {name!r} is a {type(old).__name__}, not a dense layer")
        if (in_f, out_f) != (spec["in_features"], spec["out_features"]):
            raise ValueError(
                f"{path}: layer {name!r} is {in_f}→{out_f} here but "
                f"{spec['in_features']}→{spec['out_features']} in the manifest"
            )
        cls = _LAYER_TYPES.get(spec["type"])
        if cls is None:
            raise ValueError(f"{path}: unknown layer type {spec['type']!r} for {name!r}")
        kwargs: dict[str, Any] = {"bias": spec["bias"], "nblocks": spec["nblocks"]}
        if issubclass(cls, MonarchLinear):
            kwargs["rank"] = spec.get("rank")
        if cls is MonarchLowRankLinear:
            lowrank = spec.get("lowrank")
            if isinstance(lowrank, bool) or not isinstance(lowrank, int) or lowrank < 1:
                raise ValueError(f"{path}: layer {name!r} needs an int lowrank >= 1 in the "
                                 f"manifest, got {lowrank!r}")
            kwargs["lowrank"] = lowrank
        some = next(old.parameters(), None)
        new = cls(
            in_f,
            out_f,
            **kwargs,
            device=None if some is None else some.device,
            dtype=getattr(torch, spec["dtype"]),
        )
        setattr(new, REPLACED_ATTR, spec.get("replaced", "Linear"))
        replacements.append((name, old, new.train(old.training)))

    def swap(use_new: bool) -> None:
        for name, old, new in replacements:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new if use_new else old)

    weights = path / manifest.get("weights", WEIGHTS_NAME)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()} if given else None
    swap(True)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not fit the rebuilt {type(model).__name__}: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
    except BaseException:
        if snapshot is not None:  # leave the caller's model as it was
            swap(False)
            model.load_state_dict(snapshot)
        raise
    return model if device is None else model.to(device)
