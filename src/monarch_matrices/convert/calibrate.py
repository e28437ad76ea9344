"""Calibrated conversion: fit each Monarch layer to the inputs it sees, layer by layer.

A projected layer is the nearest Monarch matrix to the weight, but what a
model needs is the nearest *function* on its real activations.  This module
runs calibration batches through the model with forward pre-hooks that sum
each target layer's input Gram matrix ``Σ x xᵀ`` (and ``Σ x``, the token count)
in float64 — memory independent of the number of tokens — and hands it to
:func:`~monarch_matrices.ops.project_calibrated`.

Sequential mode (the default) converts the layers in forward order, in groups
of layers that read the same tensor (q, k and v; Llama's gate and up), and
collects each group's statistics from the *partially converted* model, so
each layer also compensates for the errors of the layers before it instead of
letting them compound.  Each pass stops as soon as the group's last layer has
run, so early layers cost less.

A layer whose output is added to a residual stream handed to its parent module
(the BERT family's ``LayerNorm(dense(x) + residual)`` output modules) fits the
dense model's *sum* instead: ``‖(h_t + W x_t) − (h + M x)‖`` with ``h`` the
residual the converted model carries and ``h_t`` the dense model's, so the layer
also cancels what the residual stream has drifted (as far as its input predicts
it).  The solver takes these targets as ``Y Xᵀ`` and ``‖Y‖²`` directly.

A layer with a bias also absorbs the mean of its error into the bias: the
solve uses the centred Gram matrix ``Σ (x − μ)(x − μ)ᵀ`` and the new bias is
``b + (W − M) μ``, which is optimal for the pair (weight, bias).

Batches are whatever the model takes: a dict (``model(**batch)``), a tuple or
list (``model(*batch)``) or a tensor (``model(batch)``).  When a dict batch has
an ``attention_mask`` of shape ``(B, T)``, padding tokens are left out of the
statistics of every layer whose input is ``(B, T, features)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..nn import MonarchLinear, MonarchLowRankLinear
from ..ops import fit_lowrank, project_calibrated
from .config import ConversionError
from .match import dense_features, dense_weight, is_dense_layer
from .replace import monarchify_layer

__all__ = [
    "CalibrationResult",
    "InputStats",
    "calibrate_layers",
    "collect_input_stats",
    "residual_parents",
    "sample_texts",
    "text_batches",
]


@dataclass
class InputStats:
    """Sums over the calibration tokens a layer saw: ``Σ x xᵀ``, ``Σ x`` and how many.

    When the targets come from the dense model (sequential mode), also the sums
    with the dense model's input ``x_t`` to the same layer for the same token:
    ``Σ x_t xᵀ`` (``cross``), ``Σ x_t x_tᵀ`` and ``Σ x_t``.  When the targets are
    given as outputs ``y`` (a residual layer's ``W x_t + h_t − h``), the sums
    ``Σ y xᵀ`` (``out_cross``), ``Σ y``, ``Σ ‖y‖²`` and ``Σ ‖W x_t‖²`` (what the
    reported errors are relative to) replace the three.
    """

    gram: torch.Tensor  # (in, in) float64
    total: torch.Tensor  # (in,) float64
    count: int = 0
    cross: torch.Tensor | None = None
    target_gram: torch.Tensor | None = None
    target_total: torch.Tensor | None = None
    out_cross: torch.Tensor | None = None  # (out, in)
    out_total: torch.Tensor | None = None  # (out,)
    out_sq: torch.Tensor | None = None  # 0-d
    dense_sq: torch.Tensor | None = None  # 0-d

    @classmethod
    def zeros(
        cls, in_features: int, device: torch.device | str | None = None, targets: bool = False
    ) -> InputStats:
        kw = {"dtype": torch.float64, "device": device}
        n = in_features
        extra = (torch.zeros(n, n, **kw), torch.zeros(n, n, **kw), torch.zeros(n, **kw))
        return cls(torch.zeros(n, n, **kw), torch.zeros(n, **kw), 0,
                   *(extra if targets else (None, None, None)))

    def add(self, x: torch.Tensor, x_t: torch.Tensor | None = None) -> None:
        """Add a ``(tokens, in)`` float64 block of inputs (and the dense model's, if kept)."""
        self.gram += x.T @ x
        self.total += x.sum(0)
        self.count += x.shape[0]
        if self.cross is not None:
            x_t = x if x_t is None else x_t
            self.cross += x_t.T @ x
            self.target_gram += x_t.T @ x_t
            self.target_total += x_t.sum(0)

    def add_outputs(self, y: torch.Tensor, x: torch.Tensor, dense_out: torch.Tensor) -> None:
        """Add ``(tokens, out)`` targets ``y`` for inputs ``x`` (already added), and
        the dense layer's own outputs ``dense_out`` (the scale of its errors)."""
        if self.out_cross is None:
            kw = {"dtype": torch.float64, "device": y.device}
            self.out_cross = torch.zeros(y.shape[1], x.shape[1], **kw)
            self.out_total = torch.zeros(y.shape[1], **kw)
            self.out_sq = torch.zeros((), **kw)
            self.dense_sq = torch.zeros((), **kw)
        self.out_cross += y.T @ x
        self.out_total += y.sum(0)
        self.out_sq += (y * y).sum()
        self.dense_sq += (dense_out * dense_out).sum()

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def centered(self) -> InputStats:
        """The same sums about the means: what a layer with a free bias should fit.

        A feature that is constant over the calibration tokens has exactly zero
        variance, but ``Σ x² − (Σ x)²/n`` leaves rounding there (possibly
        negative); such features (centred diagonal at most ``1e-9`` of the raw
        one) get exact zero rows and columns, so the sums stay a Gram matrix.
        """
        n = max(self.count, 1)

        def center(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return g - torch.outer(a, b) / n

        def center_gram(raw: torch.Tensor, total: torch.Tensor):
            """The symmetric centred Gram with constant features zeroed, and those features."""
            g = center(raw, total, total)
            g = 0.5 * (g + g.T)
            flat = g.diagonal() <= 1e-9 * raw.diagonal()
            g[flat, :] = 0
            g[:, flat] = 0
            return g, flat

        gram, flat = center_gram(self.gram, self.total)
        zero = torch.zeros_like(self.total)
        if self.out_cross is not None:
            out_cross = center(self.out_cross, self.out_total, self.total)
            out_cross[:, flat] = 0
            out_sq = (self.out_sq - self.out_total @ self.out_total / n).clamp(min=0)
            return InputStats(gram, zero, self.count, out_cross=out_cross,
                              out_total=torch.zeros_like(self.out_total), out_sq=out_sq,
                              dense_sq=self.dense_sq)
        if self.cross is None:
            return InputStats(gram, zero, self.count)
        target, flat_t = center_gram(self.target_gram, self.target_total)
        cross = center(self.cross, self.target_total, self.total)
        cross[flat_t, :] = 0
        cross[:, flat] = 0
        return InputStats(gram, zero, self.count, cross, target, zero)

    def centered_gram(self) -> torch.Tensor:
        """``Σ (x − μ)(x − μ)ᵀ``."""
        return self.centered().gram


@dataclass(frozen=True)
class CalibrationResult:
    """One calibrated layer: relative output errors ``‖y_dense − y‖ / ‖W x_dense‖``."""

    name: str
    error_before: float  # the Frobenius projection, original bias
    error_after: float  # the calibrated weight and bias
    tokens: int
    residual: bool = False  # fitted to the residual sum (then the errors include its drift)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the layers of interest have run."""


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _call(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _token_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask.bool()
    return None


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def _capture(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batch: Any,
    stop_after: str | None,
    residuals: Mapping[str, nn.Module] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward pass: each layer's input as a ``(tokens, in)`` float64 matrix.

    Padding tokens are dropped; layers reading the same tensor share one copy; a
    layer called more than once per pass gets its calls stacked.  ``residuals``
    (``{layer name: parent}``) also captures the residual each such parent is
    handed (its second positional argument), the same way; it is the second dict.
    """
    mask = _token_mask(batch)
    # Keyed by storage address and version (an in-place change makes it another
    # input); each entry also holds the tensor itself, so its memory cannot be
    # freed and reused by a later tensor of the same shape during the pass
    # (which would hand that tensor a stale copy).
    memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    added: dict[str, list[torch.Tensor]] = {name: [] for name in residuals or {}}

    def rows(x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x._version)
        if key not in memo:
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                flat = x[mask]
            else:
                flat = x.reshape(-1, x.shape[-1])
            memo[key] = (x, flat.detach().to(torch.float64))
        return memo[key][1]

    def hook(name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            seen[name].append(rows(args[0]))
            if name == stop_after:
                raise _Stop

        return pre_hook

    def residual_hook(name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            added[name].append(rows(args[1]))

        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    handles += [p.register_forward_pre_hook(residual_hook(name))
                for name, p in (residuals or {}).items()]
    try:
        _call(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()

    def stack(found: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {n: (v[0] if len(v) == 1 else torch.cat(v)) for n, v in found.items() if v}

    return stack(seen), stack(added)


@torch.no_grad()
def residual_parents(
    model: nn.Module, layers: Mapping[str, nn.Module], batch: Any
) -> dict[str, nn.Module]:
    """The layers whose output is added to a residual stream their parent is handed.

    That is the BERT family's output modules, ``parent(x, residual)`` computing
    ``LayerNorm(dense(x) + residual)``.  A layer qualifies when, on ``batch``:

    - it is its parent's only dense child (not an attention module's q/k/v);
    - every call of the parent passes a second positional tensor shaped like the
      layer's output and then calls the layer, once, on its first argument;
    - the parent's output depends on the two only through their sum: moving a
      random ``δ`` from the residual to the layer's output leaves it unchanged
      (ViT-style ``SelfOutput(x, input_tensor)`` modules that ignore
      ``input_tensor`` fail this).

    Returns ``{layer name: parent}``; pre-LN models (Llama), whose residual adds
    are not module calls, have none.  The model should be in eval mode (dropout
    makes the last check fail, which only means no layer qualifies).
    """
    parents = {}
    for name in layers:
        parent_name, _, _ = name.rpartition(".")
        if parent_name:
            parent = model.get_submodule(parent_name)
            if sum(is_dense_layer(c) for c in parent.children()) == 1:
                parents[name] = parent
    if not parents:
        return {}
    pending: dict[str, tuple[tuple[Any, ...], dict[str, Any]] | None] = {}
    verdicts: dict[str, list[bool]] = {n: [] for n in parents}  # one per call
    first_call: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}

    def parent_hook(name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ok = len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2])
            pending[name] = (args, kwargs) if ok else None
            verdicts[name].append(False)  # until the layer's own call confirms it

        return pre_hook

    def layer_hook(name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            call, x = pending.pop(name, None), args[0]
            if call is None:  # called without a fresh parent call (or a second time)
                verdicts[name].append(False)
                return
            first, residual = call[0][:2]
            out_features = dense_features(module)[1]
            verdicts[name][-1] = (first.data_ptr() == x.data_ptr() and first.shape == x.shape
                                  and tuple(residual.shape) == (*x.shape[:-1], out_features))
            first_call.setdefault(name, call)

        return pre_hook

    handles = [parent.register_forward_pre_hook(parent_hook(name), with_kwargs=True)
               for name, parent in parents.items()]
    handles += [layers[name].register_forward_pre_hook(layer_hook(name)) for name in parents]
    try:
        _call(model, _to_device(batch, _model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return {name: parents[name] for name, v in verdicts.items()
            if v and all(v) and _adds_to_residual(parents[name], layers[name], *first_call[name])}


def _adds_to_residual(
    parent: nn.Module, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> bool:
    """Whether ``parent(*args)`` reads ``layer``'s output and ``args[1]`` only through
    their sum: moving a random ``δ`` from one to the other must not change its output."""

    def first_tensor(out: Any) -> torch.Tensor | None:
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        return out if isinstance(out, torch.Tensor) else None

    residual = args[1]
    gen = torch.Generator(device=residual.device).manual_seed(0)
    scale = float(residual.float().std()) if residual.numel() > 1 else 1.0
    delta = torch.randn(residual.shape, generator=gen, device=residual.device,
                        dtype=residual.dtype) * max(scale, 1e-3)
    base = first_tensor(parent(*args, **kwargs))
    hook = layer.register_forward_hook(lambda module, a, out: out + delta)
    try:
        moved = first_tensor(parent(args[0], residual - delta, *args[2:], **kwargs))
    finally:
        hook.remove()
    if base is None or moved is None or base.shape != moved.shape:
        return False
    size = float(base.abs().max()) if base.numel() else 0.0
    return bool(((base - moved).abs().max() <= 1e-2 * max(size, 1e-12)).item())


def collect_input_stats(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    stop_after: str | None = None,
    reference: Mapping[str, tuple[nn.Module, nn.Module]] | None = None,
    residuals: Mapping[str, nn.Module] | None = None,
) -> dict[str, InputStats]:
    """Run ``batches`` through ``model`` and sum each layer's input statistics in float64.

    Layers that read the same tensor share one Gram computation.  With
    ``stop_after``, each forward pass ends right after that layer has run (the
    caller must know it runs last, once, among ``layers``).  With ``reference``
    (``{name: (dense, converted)}`` for the layers converted so far), every batch
    also runs with the dense layers swapped back in, and the statistics include
    the dense model's inputs (``cross``, ``target_gram``).  With ``residuals`` too
    (:func:`residual_parents`), those layers' targets are the dense model's
    residual sums instead, given as outputs (``out_cross``, ...).  The model is
    left as it was, hooks removed and layers in place, even if a batch fails.
    """
    if not layers:
        return {}
    device = _model_device(model)
    targets = reference is not None
    residuals = {n: p for n, p in (residuals or {}).items() if n in layers} if targets else {}
    stats = {name: InputStats.zeros(dense_features(m)[0], device, targets and name not in residuals)
             for name, m in layers.items()}

    def swap(which: int) -> None:
        for name, pair in (reference or {}).items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, pair[which])

    weights = {n: dense_weight(layers[n]).detach().to(torch.float64) for n in residuals}
    for batch in batches:
        batch = _to_device(batch, device)
        ref = ref_added = None
        if reference:
            swap(0)
            try:
                ref, ref_added = _capture(model, layers, batch, stop_after, residuals)
            finally:
                swap(1)
        cur, added = _capture(model, layers, batch, stop_after, residuals)
        grams: dict[tuple[int, int], tuple] = {}  # shared inputs: one product for q, k, v
        for name, x in cur.items():
            x_t = None if ref is None else ref.get(name)
            if x_t is not None and x_t.shape != x.shape:
                raise ConversionError(
                    f"layer {name} saw {x_t.shape[0]} tokens in the dense model but "
                    f"{x.shape[0]} in the converted one; the forward pass is not deterministic"
                )
            if name in residuals:
                h, x_t = added.get(name), x if x_t is None else x_t
                h_t = h if ref_added is None else ref_added.get(name)
                if h is None or h_t is None or h.shape != h_t.shape or h.shape[0] != x.shape[0]:
                    raise ConversionError(
                        f"layer {name}: the residual its parent is handed was not seen once "
                        "per call of the layer; pass match_residual=False for this model"
                    )
                dense_out = x_t @ weights[name].T
                s = stats[name]
                s.add(x)
                s.add_outputs(dense_out + (h_t - h), x, dense_out)
                continue
            key = (id(x), id(x_t))
            if key not in grams:
                part = InputStats.zeros(x.shape[1], device, targets)
                part.add(x, x_t)
                grams[key] = part
            part = grams[key]
            s = stats[name]
            s.gram += part.gram
            s.total += part.total
            s.count += part.count
            if targets:
                s.cross += part.cross
                s.target_gram += part.target_gram
                s.target_total += part.target_total
    return stats


@torch.no_grad()
def _forward_order(
    model: nn.Module, layers: Mapping[str, nn.Module], batch: Any
) -> tuple[list[list[str]], bool]:
    """Groups of layers in the order they first run (a group reads one tensor), and
    whether every layer runs exactly once per forward (so passes may stop early)."""
    calls: list[tuple[str, tuple]] = []
    held: list[torch.Tensor] = []  # no input's memory may be reused by a later one

    def hook(name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            held.append(x)
            calls.append((name, (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x._version)))

        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        _call(model, _to_device(batch, _model_device(model)))
    finally:
        for h in handles:
            h.remove()
    once = len(calls) == len(layers) and len({n for n, _ in calls}) == len(layers)
    groups: list[list[str]] = []
    last_key, seen = None, set()
    for name, key in calls:
        if name in seen:
            continue
        seen.add(name)
        if groups and key == last_key:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_key = key
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ConversionError(
            f"layer {missing[0]} did not run on the calibration batch, so it cannot be "
            "calibrated; check the batches match the model's forward, or exclude the layer"
        )
    return groups, once


def _output_error(
    weight: torch.Tensor, dense: torch.Tensor, shift: torch.Tensor, stats: InputStats
) -> float:
    """``‖(W x_t + b) − (M x + b')‖ / ‖W x_t‖`` summed over tokens, from the sums.

    ``shift = b' − b``; ``x_t = x`` unless the stats hold the dense model's inputs.
    With targets given as outputs ``y``, ``‖(y + b) − (M x + b')‖ / ‖W x_t‖``.
    """
    w, m = weight.double(), dense.double()
    if stats.out_cross is not None:  # targets given as outputs y
        sq = (stats.out_sq - 2 * (stats.out_cross * m).sum() + ((m @ stats.gram) * m).sum()
              - 2 * shift @ (stats.out_total - m @ stats.total) + stats.count * (shift @ shift))
        ref = stats.dense_sq
        return float(sq.clamp(min=0).sqrt() / ref.sqrt()) if ref > 0 else 0.0
    if stats.cross is None:
        t_gram, cross, t_total = stats.gram, stats.gram, stats.total
    else:
        t_gram, cross, t_total = stats.target_gram, stats.cross, stats.target_total
    sq = (((w @ t_gram) * w).sum() - 2 * ((w @ cross) * m).sum() + ((m @ stats.gram) * m).sum()
          - 2 * shift @ (w @ t_total - m @ stats.total) + stats.count * (shift @ shift))
    ref = ((w @ t_gram) * w).sum()
    return float(sq.clamp(min=0).sqrt() / ref.sqrt()) if ref > 0 else 0.0


@torch.no_grad()
def calibrate_layer(
    layer: nn.Module,
    projected: MonarchLinear,
    stats: InputStats,
    *,
    steps: int,
    damping: float,
    name: str = "",
) -> CalibrationResult:
    """Refit ``projected`` (the projection of the dense ``layer``) on ``stats``, in place.

    A layer with a bias fits the centred statistics and then moves its bias so
    the mean output matches too: ``b' = b + W μ_t − M μ``.  A
    :class:`~monarch_matrices.nn.MonarchLowRankLinear` then gets the rank-``r``
    term that best completes the fitted Monarch part on the same statistics.
    """
    weight = dense_weight(layer).detach()
    bias = layer.bias
    if stats.count == 0:
        raise ConversionError(f"layer {name} saw no calibration tokens")
    fit = stats if bias is None else stats.centered()
    zero = torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
    before = _output_error(weight, projected.to_dense().detach(), zero, stats)
    outputs = fit.out_cross is not None
    targets = ({"target_cross": fit.out_cross, "target_sq": fit.out_sq} if outputs
               else {"cross": fit.cross, "target_gram": fit.target_gram})
    res = project_calibrated(
        weight.to(torch.float64), fit.gram, projected.nblocks, projected.rank,
        steps=steps, damping=damping, **targets,
    )
    projected.w1.copy_(res.w1)
    projected.w2.copy_(res.w2)
    if isinstance(projected, MonarchLowRankLinear):  # then the best B A given the new M
        term = fit_lowrank(weight.to(torch.float64), projected.monarch_dense().double(),
                           projected.lowrank, fit.gram, cross=fit.cross,
                           target_cross=fit.out_cross, damping=damping)
        projected.lowrank_a.copy_(term.a)
        projected.lowrank_b.copy_(term.b)
    dense = projected.to_dense().detach()
    shift = zero
    if bias is not None:  # the mean target minus the mean output
        if outputs:
            mean_y = stats.out_total / stats.count
        elif stats.cross is not None:
            mean_y = weight.double() @ (stats.target_total / stats.count)
        else:
            mean_y = weight.double() @ stats.mean
        shift = mean_y - dense.double() @ stats.mean
        projected.bias.copy_(bias.detach().double() + shift)
    after = _output_error(weight, dense, shift, stats)
    if after > before:  # cannot happen in exact arithmetic; never return a worse layer
        fallback = monarchify_layer(layer, nblocks=projected.nblocks, rank=projected.rank,
                                    lowrank=getattr(projected, "lowrank", 0))
        projected.load_state_dict(fallback.state_dict())
        after = before
    return CalibrationResult(name, before, after, stats.count, residual=outputs)


def calibrate_layers(
    model: nn.Module,
    built: Sequence[tuple[str, nn.Module, MonarchLinear]],
    batches: Sequence[Any],
    *,
    steps: int,
    damping: float,
    sequential: bool = True,
    match_dense: bool = True,
    match_residual: bool = True,
    progress: bool = False,
) -> dict[str, CalibrationResult]:
    """Calibrate the projected layers of ``built`` ((name, dense, projected) rows).

    Sequential mode swaps each group of layers into ``model`` as soon as it is
    fitted (the later groups then see its outputs); with ``match_dense`` their
    targets are the dense model's outputs, so each layer also undoes the drift
    of the layers before it, and with ``match_residual`` too the layers that write
    into a residual stream (:func:`residual_parents`) fit the dense model's
    residual sum.  The caller restores the dense layers if anything fails.
    Otherwise all statistics come from one pass over the dense model.
    The model runs in eval mode throughout (dropout would make passes disagree).
    """
    dense_of = {name: old for name, old, _ in built}
    new_of = {name: new for name, _, new in built}
    results: dict[str, CalibrationResult] = {}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    bar = tqdm(total=len(built), desc="calibrate", unit="layer", disable=not progress)
    try:
        groups, once = _forward_order(model, dense_of, batches[0])
        residuals = {}
        if sequential and match_dense and match_residual:
            residuals = residual_parents(model, dense_of, batches[0])
        if not sequential:
            stats = collect_input_stats(model, dense_of, batches)
        done: dict[str, tuple[nn.Module, nn.Module]] = {}
        for group in groups:
            if sequential:
                members = {n: dense_of[n] for n in group}
                stats = collect_input_stats(
                    model, members, batches, stop_after=group[-1] if once else None,
                    reference=dict(done) if match_dense else None,
                    residuals={n: residuals[n] for n in group if n in residuals},
                )
            for name in group:
                results[name] = calibrate_layer(
                    dense_of[name], new_of[name], stats[name],
                    steps=steps, damping=damping, name=name,
                )
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new_of[name])
                done[name] = (dense_of[name], new_of[name])
                bar.update(1)
    finally:
        bar.close()
        for m, training in modes.items():
            m.train(training)
    return results


def text_batches(
    tokenizer: Any, texts: Sequence[str], batch_size: int = 32, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of ``texts``, similar lengths together (less padding to run).

    A tokenizer without a pad token (GPT-2's) gets one sequence per batch.
    """
    if not texts:
        raise ValueError("no calibration texts")
    if getattr(tokenizer, "pad_token", None) is None:
        batch_size = 1
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out = []
    for i in range(0, len(order), batch_size):
        chunk = [texts[j] for j in order[i : i + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append(dict(enc))
    return out


def sample_texts(texts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``texts`` (all of them if fewer), a seeded random choice in their order."""
    items = [t.strip() for t in texts if t.strip()]
    if n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]
