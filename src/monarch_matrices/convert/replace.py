"""Model surgery: dense layers to Monarch (:func:`monarchify`) and back (:func:`densify`).

The walker plans every replacement and builds every new layer before it
touches the model, so an error leaves the model exactly as it was.  The
per-layer step, :func:`monarchify_layer`, is separate so other ways of
fitting a layer (data-aware ones, for instance) can slot in without changing
the walker.
"""

from __future__ import annotations

import copy
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..nn import MonarchLinear, MonarchLowRankLinear
from ..nn._common import StructuredLinear
from ..ops import monarch_shape
from .config import ConversionError, Init, MonarchifyConfig, Targets
from .match import classify, dense_features, dense_weight, find_targets, is_dense_layer
from .report import LayerReport, MonarchReport, SkippedLayer

__all__ = ["densify", "monarchify", "monarchify_layer"]

#: Attribute a converted layer carries: the dense type it replaced, so that
#: :func:`densify` can give back the same type (GPT-2's Conv1D stays Conv1D).
REPLACED_ATTR = "replaced_type"


def monarchify_layer(
    layer: nn.Module,
    *,
    nblocks: int = 4,
    rank: int | None = None,
    init: Init = "project",
    lowrank: int = 0,
) -> MonarchLinear:
    """A :class:`~monarch_matrices.nn.MonarchLinear` standing in for one dense layer.

    ``init="project"`` takes the nearest Monarch matrix to the layer's weight
    (closed form, Frobenius norm) and keeps its bias; ``init="random"`` starts
    fresh, for training from scratch.  The new layer lives on the old one's
    device and dtype and keeps its training mode and ``requires_grad``; the
    layer passed in is not modified.  ``lowrank=r > 0`` builds a
    :class:`~monarch_matrices.nn.MonarchLowRankLinear` instead, its rank-``r``
    term the truncated SVD of what the projection misses (zero at random init).
    """
    if not is_dense_layer(layer):
        raise TypeError(f"expected nn.Linear or transformers' Conv1D, got {type(layer).__name__}")
    in_f, out_f = dense_features(layer)
    weight, bias = dense_weight(layer), layer.bias
    cls = MonarchLowRankLinear if lowrank else MonarchLinear
    extra = {"lowrank": lowrank} if lowrank else {}
    if init == "project":
        if weight.is_meta:
            raise ConversionError(
                "cannot project a weight on the meta device (it has no values); "
                "use init='random' to count shapes and parameters"
            )
        with torch.no_grad():
            new = cls.from_dense(
                weight.detach(),
                None if bias is None else bias.detach(),
                nblocks=nblocks,
                rank=rank,
                **extra,
            )
    elif init == "random":
        new = cls(
            in_f,
            out_f,
            bias=bias is not None,
            nblocks=nblocks,
            rank=rank,
            device=weight.device,
            dtype=weight.dtype,
            **extra,
        )
        new.projection_error = None
    else:
        raise ValueError(f"init={init!r} is not one of 'project', 'random'")
    for name, p in new.named_parameters():
        if name != "bias":
            p.requires_grad_(weight.requires_grad)
    if bias is not None:
        new.bias.requires_grad_(bias.requires_grad)
    setattr(new, REPLACED_ATTR, type(layer).__name__)
    return new.train(layer.training)


def _linear_flops(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        if is_dense_layer(module):
            in_f, out_f = dense_features(module)
            total += 2 * in_f * out_f
        elif isinstance(module, StructuredLinear):
            total += 2 * module.num_structured_params
    return total


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters once


def _layer_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _plan(
    model: nn.Module, selected: list[tuple[str, nn.Module]], config: MonarchifyConfig
) -> tuple[list[tuple[str, nn.Module]], list[SkippedLayer]]:
    """Split the selected layers into those to replace and those to skip (with why)."""
    module_names: dict[int, list[str]] = defaultdict(list)
    param_owners: dict[int, list[str]] = defaultdict(list)
    for mname, module in model.named_modules(remove_duplicate=False):
        module_names[id(module)].append(mname)
        for pname, p in module.named_parameters(recurse=False):
            param_owners[id(p)].append(f"{mname}.{pname}" if mname else pname)
    parents = {id(c): m for m in model.modules() for c in m.children()}

    plan: list[tuple[str, nn.Module]] = []
    skipped: list[SkippedLayer] = []
    for name, module in selected:
        if isinstance(module, StructuredLinear):
            skip = SkippedLayer(
                name, module.in_features, module.out_features,
                f"already a {type(module).__name__}",
            )
            skipped.append(skip)
            continue
        in_f, out_f = dense_features(module)

        def skip(reason: str, name: str = name, in_f: int = in_f, out_f: int = out_f) -> None:
            skipped.append(SkippedLayer(name, in_f, out_f, reason))

        others = [n for n in module_names[id(module)] if n != name]
        tied = [
            o
            for p in module.parameters(recurse=False)
            for o in param_owners[id(p)]
            if not o.startswith(name + ".")
        ]
        if others:
            skip(f"shared module (also at {others[0]})")
        elif tied:
            skip(f"weight tied to {tied[0]}")
        elif isinstance(parents.get(id(module)), nn.MultiheadAttention):
            skip("inside nn.MultiheadAttention, which reads the dense weight directly")
        else:
            try:
                shape = monarch_shape(in_f, out_f, config.nblocks, config.rank)
            except ValueError as e:
                skip(str(e).split(";")[0])
                continue
            if min(in_f, out_f) < config.min_features:
                skip(f"smaller than min_features={config.min_features}")
            elif config.lowrank > min(in_f, out_f):
                skip(f"lowrank={config.lowrank} exceeds min(in, out)={min(in_f, out_f)}")
            elif (n := shape.num_params + config.lowrank * (in_f + out_f)) >= in_f * out_f:
                skip(f"Monarch would not save parameters ({n} >= {in_f * out_f})")
            else:
                plan.append((name, module))
    return plan, skipped


def _nothing_to_replace(skipped: list[SkippedLayer], config: MonarchifyConfig) -> str:
    if all("does not fit" in s.reason for s in skipped):
        widest = max(min(s.in_features or 0, s.out_features or 0) for s in skipped)
        what = "nblocks" if config.rank is None else "nblocks/rank"
        return (
            f"{what}={config.nblocks}" + ("" if config.rank is None else f"/{config.rank}")
            + f" fits no selected layer: the widest has min(in, out)={widest}; "
            f"use 1 <= nblocks <= {widest}"
        )
    reasons = Counter(s.reason for s in skipped)
    summary = "; ".join(f"{n} × {r}" for r, n in reasons.most_common())
    return f"all {len(skipped)} selected layers were skipped: {summary}"


def monarchify(
    model: nn.Module,
    nblocks: int = 4,
    *,
    targets: Targets = ("mlp", "attention"),
    rank: int | None = None,
    init: Init = "project",
    lowrank: int = 0,
    min_features: int = 128,
    exclude: Sequence[str] = (),
    inplace: bool = True,
    progress: bool = False,
    calibration: Iterable[Any] | None = None,
    calibration_steps: int = 10,
    calibration_damping: float = 0.01,
    sequential: bool = True,
    match_dense: bool = True,
    match_residual: bool = True,
) -> MonarchReport:
    """Replace the selected dense layers of ``model`` by Monarch layers.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` and transformers ``Conv1D``
            layers can be replaced.
        nblocks: blocks per factor (4 in the paper's transformer experiments).
        targets: presets ``"mlp"``, ``"qkv"``, ``"attention"`` (q/k/v and output
            projections), ``"all"``; a full-name regex; a list of presets, names
            or dotted suffixes; or a predicate ``(name, module) -> bool``.  See
            :mod:`monarch_matrices.convert.match`.
        rank: channels per slice (:func:`~monarch_matrices.ops.monarch_shape`).
        init: ``"project"`` (nearest Monarch matrix: dense-to-sparse fine-tuning)
            or ``"random"`` (fresh layers: training from scratch; works on the
            meta device, so architectures can be sized without memory).
        lowrank: add a rank-``lowrank`` term to every layer
            (:class:`~monarch_matrices.nn.MonarchLowRankLinear`), fitted to what
            the Monarch part misses: in Frobenius norm, or with ``calibration``
            on the layer's activations (:func:`~monarch_matrices.ops.fit_lowrank`).
            Never worse than the Monarch part alone; how much it buys depends on
            how concentrated the Monarch error is (docs/convert.md).
        min_features: layers with ``min(in, out)`` below this stay dense (too
            small for the structure to pay off); they are listed as skipped.
        exclude: names or dotted suffixes that stay dense.
        inplace: modify ``model``; ``False`` converts a deep copy.
        progress: show a progress bar over the layers.
        calibration: batches of model inputs (an iterable or a ``DataLoader``; each
            a dict, tuple or tensor as the model takes it).  When given, every
            layer is fitted to the activations it sees on these batches
            (:func:`~monarch_matrices.ops.project_calibrated`) instead of to its
            weight alone, which keeps the model's function far better; the
            report then has each layer's output error before and after.  Needs
            ``init="project"``.  See :mod:`monarch_matrices.convert.calibrate`.
        calibration_steps: alternating rounds of the calibrated solver per layer.
        calibration_damping: ridge relative to the mean of the Gram matrix's
            diagonal (handles rank-deficient activations).
        sequential: collect each layer's activations from the partially
            converted model, in forward order (errors do not compound); ``False``
            collects them all in one pass over the dense model (faster, worse).
        match_dense: in sequential mode, fit each layer to the *dense* model's
            outputs (``‖W x_dense − M x‖``), so it also corrects the drift of the
            layers converted before it; ``False`` fits ``‖(W − M) x‖`` on its own
            inputs.  Costs a second forward pass per batch.
        match_residual: with ``match_dense``, a layer whose output its parent adds
            to a residual stream it is handed (the BERT family's
            ``LayerNorm(dense(x) + residual)`` output modules) fits the dense
            model's residual *sum*, ``‖(h_dense + W x_dense) − (h + M x)‖``, so it
            also cancels the residual stream's drift where its input predicts it
            (:func:`~monarch_matrices.convert.calibrate.residual_parents`; other
            models are unaffected).  The report's output errors for those layers
            are then of the sum, still relative to ``‖W x_dense‖``.

    Returns:
        A :class:`~monarch_matrices.convert.MonarchReport`; its ``model`` is the
        converted model.  Layers whose weight is tied to another module (a
        language model's output embedding), shared modules and layers
        ``nblocks`` does not fit are skipped and reported.

    Raises:
        ConversionError: nothing matched, or every match had to be skipped;
            the model is unchanged.
    """
    config = MonarchifyConfig(
        nblocks=nblocks, targets=targets, rank=rank, init=init, lowrank=lowrank,
        min_features=min_features, exclude=tuple(exclude),
    )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if is_dense_layer(model):
        raise TypeError(
            f"model is itself a {type(model).__name__}; use monarchify_layer for a single layer"
        )
    batches: list[Any] | None = None
    if calibration is not None:
        if config.init != "project":
            raise ValueError(f"calibration needs init='project', got init={config.init!r}")
        if isinstance(calibration, (str, bytes, torch.Tensor)):
            raise TypeError(
                "calibration must be an iterable of batches (a list or DataLoader), got "
                f"{type(calibration).__name__}; wrap a single batch in a list"
            )
        batches = list(calibration)  # a generator is read once; passes need it again
        if not batches:
            raise ConversionError("calibration yielded no batches; give at least one batch")
        for name, value in (("calibration_steps", calibration_steps),):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0")
        if not (0 <= calibration_damping < float("inf")):
            raise ValueError(f"calibration_damping={calibration_damping!r} must be >= 0")
    if not inplace:
        model = copy.deepcopy(model)
    selected = find_targets(model, config.targets, config.exclude)
    plan, skipped = _plan(model, selected, config)
    if not plan:
        raise ConversionError(_nothing_to_replace(skipped, config))
    if config.init == "project":
        meta = [name for name, m in plan if dense_weight(m).is_meta]
        if meta:
            raise ConversionError(
                f"cannot project {meta[0]}: its weight is on the meta device (no values); "
                "use init='random' to count shapes and parameters"
            )

    params_before, flops_before = _num_params(model), _linear_flops(model)
    built: list[tuple[str, nn.Module, MonarchLinear]] = []
    for name, module in tqdm(plan, desc="monarchify", unit="layer", disable=not progress):
        new = monarchify_layer(module, nblocks=config.nblocks, rank=config.rank, init=config.init,
                               lowrank=config.lowrank)
        built.append((name, module, new))

    calibrated: dict[str, Any] = {}
    if batches is not None:
        from .calibrate import calibrate_layers

        try:
            calibrated = calibrate_layers(
                model, built, batches, steps=calibration_steps,
                damping=calibration_damping, sequential=sequential, match_dense=match_dense,
                match_residual=match_residual, progress=progress,
            )
        except BaseException:
            for name, old, _ in built:  # sequential mode swapped some in: put them back
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, old)
            raise

    layers: list[LayerReport] = []
    for name, old, new in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        in_f, out_f = dense_features(old)
        layers.append(
            LayerReport(
                name=name,
                group=classify(name),
                replaced=type(old).__name__,
                in_features=in_f,
                out_features=out_f,
                nblocks=config.nblocks,
                rank=config.rank,
                params_before=_layer_params(old),
                params_after=_layer_params(new),
                flops_before=2 * in_f * out_f,
                flops_after=2 * new.num_structured_params,
                projection_error=new.projection_error,
                output_error_before=calibrated[name].error_before if name in calibrated else None,
                output_error_after=calibrated[name].error_after if name in calibrated else None,
            )
        )
    report_config = config.to_dict()
    if batches is not None:
        report_config["calibration"] = {
            "batches": len(batches),
            "tokens": max((r.tokens for r in calibrated.values()), default=0),
            "steps": calibration_steps,
            "damping": calibration_damping,
            "sequential": sequential,
            "match_dense": sequential and match_dense,
            "residual_targets": [n for n, r in calibrated.items() if r.residual],
        }
    return MonarchReport(
        layers=layers,
        skipped=skipped,
        params_before=params_before,
        params_after=_num_params(model),
        linear_flops_before=flops_before,
        linear_flops_after=_linear_flops(model),
        config=report_config,
        model=model,
    )


def _conv1d(in_f: int, out_f: int, device: torch.device) -> nn.Module:
    from transformers.pytorch_utils import Conv1D  # only reached for layers that were Conv1D

    with torch.device(device):
        return Conv1D(out_f, in_f)


@torch.no_grad()
def _dense_layer(layer: StructuredLinear) -> nn.Module:
    """The dense layer computing ``layer``'s map, its weight formed in float64."""
    dtype = next(layer.parameters()).dtype
    wide = torch.complex128 if dtype.is_complex else torch.float64
    weight = copy.deepcopy(layer).to(wide).to_dense()
    if not weight.is_meta and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{type(layer).__name__} has NaN/inf entries; cannot densify it")
    weight = weight.to(dtype)
    in_f, out_f, has_bias = layer.in_features, layer.out_features, layer.bias is not None
    if getattr(layer, REPLACED_ATTR, "Linear") == "Conv1D":
        dense = _conv1d(in_f, out_f, weight.device).to(dtype)
        dense.weight.copy_(weight.T)
        if not has_bias:  # Conv1D always has a bias; a zero one keeps the map
            dense.bias.zero_()
    else:
        dense = nn.Linear(in_f, out_f, bias=has_bias, device=weight.device, dtype=dtype)
        dense.weight.copy_(weight)
    if has_bias:
        dense.bias.copy_(layer.bias)
        dense.bias.requires_grad_(layer.bias.requires_grad)
    dense.weight.requires_grad_(any(p.requires_grad for n, p in layer.named_parameters()
                                    if n != "bias"))
    return dense.train(layer.training)


def densify(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Multiply every structured layer of ``model`` back into a dense one (exactly).

    The paper's reverse-sparsification step.  Each Monarch (or block-diagonal)
    layer becomes an ``nn.Linear`` whose weight is its dense matrix, formed in
    float64 and cast to the layer's dtype; layers that replaced a GPT-2
    ``Conv1D`` become a ``Conv1D`` again, so the result is an ordinary
    checkpoint of the original architecture.  Returns the model (a converted
    deep copy when ``inplace=False``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, StructuredLinear):
        return _dense_layer(model)
    found = [
        (n, m) for n, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, StructuredLinear)
    ]
    dense_of: dict[int, nn.Module] = {}
    for _, layer in found:  # build every dense layer before any swap; shared ones once
        if id(layer) not in dense_of:
            dense_of[id(layer)] = _dense_layer(layer)
    for name, layer in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense_of[id(layer)])
    return model
