"""What a conversion did, per layer and for the whole model: table, dict and JSON.

FLOPs are counted per token (one input row) for the weight multiply alone,
two per multiply-add: ``2·in·out`` for a dense layer and ``2·(|w1| + |w2|)``
for a Monarch layer (padding included); biases, attention scores and
embeddings are left out, so the totals describe the linear layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

__all__ = ["LayerReport", "MonarchReport", "SkippedLayer", "format_count", "plot_projection_errors"]


def format_count(n: float) -> str:
    """``22713216 -> '22.71M'``: short human-readable counts for tables.

    >>> format_count(22713216), format_count(147456), format_count(12)
    ('22.71M', '147.5k', '12')
    """
    for bound, suffix, digits in ((1e9, "G", 2), (1e6, "M", 2), (1e3, "k", 1)):
        if abs(n) >= bound:
            return f"{n / bound:.{digits}f}{suffix}"
    return f"{n:g}"


@dataclass(frozen=True)
class LayerReport:
    """One replaced layer."""

    name: str
    group: str  # preset group: "mlp", "qkv", "attention_output" or "other"
    replaced: str  # the dense type it replaced: "Linear" or "Conv1D"
    in_features: int
    out_features: int
    nblocks: int
    rank: int | None
    params_before: int  # weight + bias
    params_after: int
    flops_before: int  # per token, weight multiply only
    flops_after: int
    projection_error: float | None  # ‖W - M‖_F / ‖W‖_F; None when init="random"
    # calibrated conversions only: ‖y_dense − y‖ / ‖W x‖ over the calibration tokens,
    # for the plain projection (before) and the calibrated layer (after)
    output_error_before: float | None = None
    output_error_after: float | None = None

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before


@dataclass(frozen=True)
class SkippedLayer:
    """A selected layer left as it was, and why."""

    name: str
    in_features: int | None
    out_features: int | None
    reason: str


@dataclass
class MonarchReport:
    """The result of :func:`~monarch_matrices.convert.monarchify`.

    ``model`` is the converted model (the one passed in, or its copy when
    ``inplace=False``); it is not part of the dict or JSON forms.
    """

    layers: list[LayerReport]
    skipped: list[SkippedLayer]
    params_before: int  # whole model, each shared parameter counted once
    params_after: int
    linear_flops_before: int  # per token, summed over every linear layer of the model
    linear_flops_after: int
    config: dict[str, Any]
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def param_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else math.nan

    @property
    def max_projection_error(self) -> float | None:
        errors = [e.projection_error for e in self.layers if e.projection_error is not None]
        return max(errors) if errors else None

    @property
    def mean_projection_error(self) -> float | None:
        errors = [e.projection_error for e in self.layers if e.projection_error is not None]
        return sum(errors) / len(errors) if errors else None

    @property
    def calibrated(self) -> bool:
        return any(e.output_error_after is not None for e in self.layers)

    def mean_output_error(self, which: str = "after") -> float | None:
        """Mean relative output error over calibrated layers (``"before"`` or ``"after"``)."""
        errors = [getattr(e, f"output_error_{which}") for e in self.layers]
        errors = [x for x in errors if x is not None]
        return sum(errors) / len(errors) if errors else None

    def to_dict(self) -> dict[str, Any]:
        totals = {}
        if self.calibrated:
            totals = {"mean_output_error_before": self.mean_output_error("before"),
                      "mean_output_error_after": self.mean_output_error("after")}
        return {
            "config": dict(self.config),
            "totals": {
                "layers_converted": len(self.layers),
                "layers_skipped": len(self.skipped),
                "params_before": self.params_before,
                "params_after": self.params_after,
                "param_ratio": self.param_ratio,
                "layer_params_before": sum(e.params_before for e in self.layers),
                "layer_params_after": sum(e.params_after for e in self.layers),
                "linear_flops_per_token_before": self.linear_flops_before,
                "linear_flops_per_token_after": self.linear_flops_after,
                "mean_projection_error": self.mean_projection_error,
                "max_projection_error": self.max_projection_error,
                **totals,
            },
            "layers": [asdict(e) for e in self.layers],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonarchReport:
        totals = data["totals"]
        return cls(
            layers=[LayerReport(**e) for e in data["layers"]],
            skipped=[SkippedLayer(**s) for s in data["skipped"]],
            params_before=totals["params_before"],
            params_after=totals["params_after"],
            linear_flops_before=totals["linear_flops_per_token_before"],
            linear_flops_after=totals["linear_flops_per_token_after"],
            config=dict(data["config"]),
        )

    @classmethod
    def from_json(cls, text: str) -> MonarchReport:
        return cls.from_dict(json.loads(text))

    def table(self) -> str:
        """A plain-text table: one row per replaced layer, then skips and totals."""
        header = ("layer", "group", "in→out", "nblocks", "params", "FLOPs/token", "rel. error")
        rows = [
            (
                e.name,
                e.group,
                f"{e.in_features}→{e.out_features}",
                str(e.nblocks),
                f"{format_count(e.params_before)} → {format_count(e.params_after)}",
                f"{format_count(e.flops_before)} → {format_count(e.flops_after)}",
                "—" if e.projection_error is None else f"{e.projection_error:.4f}",
            )
            for e in self.layers
        ]
        if self.calibrated:  # output error on the calibration data: projection → calibrated
            header = (*header, "output error")
            rows = [
                (*row, "—" if e.output_error_after is None
                 else f"{e.output_error_before:.4f} → {e.output_error_after:.4f}")
                for row, e in zip(rows, self.layers)
            ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        right = {2, 3, 6, 7}  # numeric columns

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        out = [line(header), line(tuple("-" * w for w in widths))]
        out += [line(r) for r in rows]
        before = sum(e.params_before for e in self.layers)
        after = sum(e.params_after for e in self.layers)
        out.append("")
        out.append(
            f"converted {len(self.layers)} layers: {format_count(before)} → "
            f"{format_count(after)} parameters ({after / before:.3f}×)"
            if self.layers
            else "converted no layers"
        )
        if self.mean_projection_error is not None:
            out.append(
                f"relative projection error: mean {self.mean_projection_error:.4f}, "
                f"max {self.max_projection_error:.4f}"
            )
        if self.calibrated:
            out.append(
                f"relative output error on the calibration data: mean "
                f"{self.mean_output_error('before'):.4f} (projection) → "
                f"{self.mean_output_error('after'):.4f} (calibrated)"
            )
            residual = self.config.get("calibration", {}).get("residual_targets", [])
            if residual:
                out.append(
                    f"{len(residual)} layers write into a residual stream: fitted to the dense "
                    "model's residual sum, so their output errors include its drift"
                )
        for s in self.skipped:
            shape = "" if s.in_features is None else f" ({s.in_features}→{s.out_features})"
            out.append(f"skipped {s.name}{shape}: {s.reason}")
        out.append(
            f"model: {format_count(self.params_before)} → {format_count(self.params_after)} "
            f"parameters ({self.param_ratio:.3f}×); linear FLOPs/token "
            f"{format_count(self.linear_flops_before)} → {format_count(self.linear_flops_after)}"
        )
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


_GROUP_COLORS = {
    "mlp": "#1f77b4", "qkv": "#ff7f0e", "attention_output": "#2ca02c", "other": "#7f7f7f"
}


def plot_projection_errors(report: MonarchReport, title: str | None = None) -> bytes:
    """A PNG bar chart of each layer's relative projection error, coloured by group.

    Needs matplotlib (the ``plot`` extra); imported here only, with a
    non-interactive backend so it works without a display.
    """
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    layers = [e for e in report.layers if e.projection_error is not None]
    if not layers:
        raise ValueError("no projection errors to plot (the layers were initialized randomly)")
    names = [e.name for e in layers]
    prefix = _common_prefix(names)
    height = max(3.0, 0.22 * len(layers) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height), layout="constrained")
    ypos = range(len(layers))
    ax.barh(
        ypos,
        [e.projection_error for e in layers],
        color=[_GROUP_COLORS.get(e.group, "#7f7f7f") for e in layers],
    )
    ax.set_yticks(list(ypos), [n[len(prefix):] for n in names], fontsize=7)
    ax.invert_yaxis()  # model order, top to bottom
    ax.set_xlabel("relative projection error ‖W − M‖_F / ‖W‖_F")
    ax.set_xlim(0, max(1.0, max(e.projection_error for e in layers) * 1.05))
    seen = sorted({e.group for e in layers}, key=list(_GROUP_COLORS).index)
    handles = [plt.Rectangle((0, 0), 1, 1, color=_GROUP_COLORS[g]) for g in seen]
    ax.legend(handles, seen, loc="lower right", fontsize=8)
    nblocks = report.config.get("nblocks")
    ax.set_title(title or f"Monarch projection error per layer (nblocks={nblocks})", fontsize=10)
    if prefix:
        ax.set_ylabel(f"{prefix}…", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _common_prefix(names: list[str]) -> str:
    """The shared leading dotted components (``"encoder.layer."``), for shorter labels."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for group in zip(*parts):
        if len(set(group)) != 1:
            break
        common.append(group[0])
    if len(common) >= min(len(p) for p in parts):
        common = common[:-1]
    return ".".join(common) + "." if common else ""
