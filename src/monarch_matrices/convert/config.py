"""The settings of one conversion, validated once so the walker can trust them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

__all__ = ["INITS", "ConversionError", "Init", "MonarchifyConfig", "Predicate", "Targets"]

Init = Literal["project", "random"]
INITS: tuple[str, ...] = ("project", "random")
Predicate = Callable[[str, nn.Module], bool]
#: A preset name or full-name regex (str), preset names / exact names / dotted
#: suffixes (sequence), or a predicate ``(name, module) -> bool``.
Targets = str | Sequence[str] | Predicate


class ConversionError(ValueError):
    """A conversion that cannot be done as asked; the model was left unchanged."""


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def _check_names(name: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(value).__name__}")
    items = tuple(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise TypeError(f"{name} must hold non-empty strings, got {item!r}")
    return items


@dataclass(frozen=True)
class MonarchifyConfig:
    """What :func:`~monarch_matrices.convert.monarchify` replaces, and how.

    Kept apart from the walker (as peft does) so a conversion can be stored in
    a manifest, compared and re-run.  Every field is checked here, before any
    model is touched.
    """

    nblocks: int = 4  # blocks per factor; 4 is the paper's choice for transformer layers
    targets: Targets = ("mlp", "attention")  # see monarch_matrices.convert.match
    rank: int | None = None  # channels per slice; None = the paper's middle width
    init: Init = "project"  # "project": nearest Monarch to the dense weight; "random": fresh
    lowrank: int = 0  # rank of a term added to every Monarch layer; 0 = pure Monarch
    min_features: int = 128  # skip layers with min(in, out) below this: too small to gain
    exclude: tuple[str, ...] = field(default=())  # exact names or dotted suffixes to keep dense

    def __post_init__(self) -> None:
        _check_int("nblocks", self.nblocks, 1)
        if self.rank is not None:
            _check_int("rank", self.rank, 1)
        _check_int("lowrank", self.lowrank, 0)
        _check_int("min_features", self.min_features, 0)
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not one of {', '.join(map(repr, INITS))}")
        targets = self.targets
        if isinstance(targets, str):
            if not targets:
                raise ValueError("targets='' matches nothing; give a preset, regex or names")
        elif callable(targets):
            pass
        else:
            targets = _check_names("targets", targets)
            if not targets:
                raise ValueError("targets=[] matches nothing; give a preset, regex or names")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "exclude", _check_names("exclude", self.exclude))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; a predicate is recorded by name (it cannot be stored)."""
        targets = self.targets
        if callable(targets) and not isinstance(targets, str):
            targets = f"<predicate {getattr(targets, '__qualname__', repr(targets))}>"
        elif not isinstance(targets, str):
            targets = list(targets)
        return {
            "nblocks": self.nblocks,
            "targets": targets,
            "rank": self.rank,
            "init": self.init,
            "lowrank": self.lowrank,
            "min_features": self.min_features,
            "exclude": list(self.exclude),
        }
