"""The layer choice the recipes pass into their models, and the S2D switch.

``make_linear(kind, ...)`` returns the constructor the models call for every
weight matrix they own (timm style: the model takes ``linear=``, so a Monarch
layer drops in without editing the model).  :func:`densify_training` is the
reverse-sparsification step of the paper: multiply the Monarch (+ low-rank)
factors out into dense layers in the middle of training, and carry the
optimizer over.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..convert import densify
from ..nn import MonarchLinear, MonarchLowRankLinear
from ..nn._common import StructuredLinear
from .common import RunError, fraction, positive_int

__all__ = [
    "LAYER_KINDS",
    "add_layer_arguments",
    "check_layer_arguments",
    "densify_training",
    "layer_fields",
    "make_linear",
    "switch_to_dense",
]

LAYER_KINDS = ("dense", "monarch")
LinearFactory = Callable[..., nn.Module]


def add_layer_arguments(group: argparse._ArgumentGroup, where: str) -> None:
    """The layer choice and S2D options of a recipe that trains from scratch."""
    group.add_argument("--layers", choices=LAYER_KINDS, default="monarch",
                       help=f"weight matrices in {where} (default monarch)")
    group.add_argument("--nblocks", type=positive_int, default=4,
                       help="Monarch blocks per factor (default 4)")
    group.add_argument("--lowrank", type=int, default=0, metavar="R",
                       help="add a rank-R term to every Monarch layer (S2D; default 0: none)")
    group.add_argument("--densify-at", type=fraction, default=None, metavar="F",
                       help="S2D: after fraction F of the steps, multiply the Monarch layers "
                       "out into dense ones and finish dense (needs --layers monarch)")
    group.add_argument("--rewarm", type=int, default=20, metavar="N",
                       help="S2D: steps over which the new dense weights' learning rate "
                       "ramps back up (default 20)")


def layer_fields(args: argparse.Namespace, switch: dict | None) -> dict:
    """The ``metrics.json`` fields of the options :func:`add_layer_arguments` adds."""
    return {"layers": args.layers,
            "nblocks": args.nblocks if args.layers == "monarch" else None,
            "lowrank": args.lowrank or None,
            "densify_at": args.densify_at,
            "densified": switch}


def check_layer_arguments(args: argparse.Namespace) -> None:
    """Refuse S2D options that contradict the layer choice."""
    if args.densify_at is not None and args.layers != "monarch":
        raise RunError("--densify-at needs --layers monarch (it densifies Monarch layers)")
    if args.lowrank and args.layers != "monarch":
        raise RunError("--lowrank adds to Monarch layers; it needs --layers monarch")
    if args.lowrank < 0:
        raise RunError(f"--lowrank={args.lowrank} must be >= 0")


def make_linear(kind: str, nblocks: int = 4, lowrank: int = 0) -> LinearFactory:
    """A constructor ``(in_features, out_features, bias=True) -> module`` for ``kind``."""
    if kind == "dense":
        return nn.Linear
    if kind != "monarch":
        raise ValueError(f"layers={kind!r} is not one of {', '.join(LAYER_KINDS)}")
    if lowrank:
        return partial(MonarchLowRankLinear, nblocks=nblocks, lowrank=lowrank)
    return partial(MonarchLinear, nblocks=nblocks)


def densify_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    make_optimizer: Callable[[nn.Module, set[int]], torch.optim.Optimizer],
) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """Replace every Monarch layer of ``model`` by its exact dense equivalent, mid-training.

    The model computes the same function after the call (the dense weights are
    formed in float64, then cast).  The optimizer is rebuilt by
    ``make_optimizer(model, fresh_ids)``: every parameter that survives the
    switch (embeddings, norms, the dense layers that were already there) keeps
    its AdamW state, and so does each bias (copied into the dense layer); only
    the new dense weight matrices start over.  Their moments cannot be derived
    from the factors' moments (the gradient of ``M`` is not a function of the
    gradients of ``w1`` and ``w2``), and a zero state with the step count kept
    would blow the first update up; so they get a fresh state (Adam's bias
    correction then makes the first update about ``lr`` per entry) and a group
    of their own, which the recipes re-warm over a few steps.  Returns ``(model, optimizer,
    number of layers densified)``.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, StructuredLinear)}
    before = {id(p) for p in model.parameters()}
    densify(model)
    # a dense layer's bias is a copy of the Monarch layer's: it keeps that bias's state
    same_as = {id(model.get_submodule(name).bias): layer.bias
               for name, layer in layers.items() if layer.bias is not None}
    fresh = {id(p) for p in model.parameters()} - before - set(same_as)
    new_optimizer = make_optimizer(model, fresh)
    for group in new_optimizer.param_groups:
        for p in group["params"]:
            old = same_as.get(id(p), p)
            if old in optimizer.state:
                new_optimizer.state[p] = optimizer.state[old]
    return model, new_optimizer, len(layers)


def switch_to_dense(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    make_optimizer: Callable[[nn.Module, set[int]], torch.optim.Optimizer],
    probe: Callable[[nn.Module], torch.Tensor],
    step: int,
) -> tuple[nn.Module, torch.optim.Optimizer, dict]:
    """:func:`densify_training` at ``step``, checking that ``probe(model)`` (say, the
    logits of one batch) does not change; returns the record metrics.json keeps."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = probe(model)
        model, optimizer, n = densify_training(model, optimizer, make_optimizer)
        change = (probe(model) - before).abs().max().item()
    model.train(was_training)
    info = {"step": step, "layers": n, "max_abs_output_change": change,
            "params_after": sum(p.numel() for p in model.parameters())}
    return model, optimizer, info
