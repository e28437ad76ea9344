"""The training loop the recipes share: steps, the S2D switch, evaluation, checkpoints, resume.

A recipe describes its work as a :class:`Task` (the batch of step ``s``, the
loss, the evaluation) and :func:`train` runs it; the data, the model and the
figures a recipe reports stay in the recipe's own file.  One loop means one
place where resume, DDP and the dense switch have to be right.

Every step reseeds the global generator from ``(seed, step, rank)``, so
anything drawing from it (dropout) draws the same numbers in a resumed run as
in an uninterrupted one.  Batches come from explicit generators
(:func:`~monarch_matrices.recipes.common.epoch_batch` or a recipe's own), so
the whole run is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import (
    CHECKPOINT,
    Dist,
    History,
    Timer,
    autocast,
    command_line,
    load_checkpoint,
    make_optimizer,
    plain_args,
    prepare_out_dir,
    save_checkpoint,
    set_learning_rate,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
)
from .layers import densify_training, switch_to_dense

__all__ = ["Outcome", "Task", "run_metrics", "session", "train"]

Batch = tuple[torch.Tensor, ...]

# Train loss is averaged over buckets of this many steps for the curves.
LOG_EVERY = 10


@dataclass
class Task:
    """What a recipe plugs into :func:`train`.

    ``batch(step)`` returns this process's share of the global batch of
    ``step``, on the run's device.  ``loss(model, batch)`` runs under autocast.
    ``evaluate(model, final)`` returns ``{series: value}`` to add to the curves
    (``final`` is True at the last step, where a recipe may use its whole test
    split).  ``show`` names the series to put on the progress bar (series →
    short key).  ``probe(model, batch)`` is the output compared before and
    after an S2D switch (default: ``model(batch[0])``).  ``count(batch)`` is
    summed over the steps into :attr:`Outcome.counted` (e.g. real tokens).
    """

    name: str
    batch: Callable[[int], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module, bool], dict[str, float]]
    show: Mapping[str, str] = field(default_factory=dict)
    probe: Callable[[nn.Module, Batch], torch.Tensor] | None = None
    count: Callable[[Batch], int] | None = None


@dataclass
class Outcome:
    """Where a call to :func:`train` stopped."""

    model: nn.Module  # dense after an S2D switch
    history: History
    step: int
    finished: bool  # reached --steps (False after --stop-after)
    train_s: float  # training time of the whole run, earlier invocations included
    timer: Timer  # this invocation's steps
    switch: dict[str, Any] | None  # what the S2D switch did, if it happened
    counted: int = 0  # sum of Task.count over this invocation's steps, this process

    def per_second(self, per_step: float) -> float:
        """A rate over this invocation's training time, ``per_step`` items per step."""
        return per_step * len(self.timer.step_times) / max(self.timer.train_s, 1e-9)


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[tuple[Dist, Path, float]]:
    """Join the process group, prepare ``--out``, set threads; yields (dist, out, start)."""
    dist = setup_distributed(args.batch_size)
    try:
        out = prepare_out_dir(args.out, force=args.force, resume=args.resume, dist=dist)
        if args.threads:
            torch.set_num_threads(args.threads)
        yield dist, out, time.perf_counter()
    finally:
        teardown_distributed(dist)


def train(task: Task, model: nn.Module, args: argparse.Namespace, dist: Dist,
          out: Path) -> Outcome:
    """Train ``model`` for ``args.steps`` (or ``--stop-after``) steps, resuming if asked.

    Uses from ``args``: steps, lr, weight_decay, seed, bf16, compile,
    eval_every, checkpoint_every, stop_after, resume, no_progress, layers and
    (S2D) densify_at and rewarm.
    """
    from tqdm import tqdm

    densify_at = getattr(args, "densify_at", None)
    switch_step = None if densify_at is None else round(densify_at * args.steps)

    def new_optimizer(m: nn.Module, fresh: set[int] = frozenset()) -> torch.optim.Optimizer:
        return make_optimizer(m, args.lr, args.weight_decay, fresh)

    def trainable(m: nn.Module) -> nn.Module:
        m = wrap_ddp(m, dist)
        return torch.compile(m) if args.compile else m

    optimizer = new_optimizer(model)
    step, history, train_s, switch = 0, History(), 0.0, None
    loss_sum, loss_n = 0.0, 0  # train loss since the last logged point (all processes)
    if args.resume:
        ckpt = load_checkpoint(out / CHECKPOINT, args)
        if ckpt.get("phase") == "dense" and args.layers == "monarch":
            model, optimizer, _ = densify_training(model, optimizer, new_optimizer)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, train_s = ckpt["step"], ckpt["train_s"]
        history, switch = History.from_dict(ckpt["history"]), ckpt.get("switch")
        if dist.main:  # the pending bucket was summed over processes: rank 0 carries it
            loss_sum, loss_n = ckpt["pending_loss"]

    model.train()  # from_pretrained models arrive in eval mode: dropout on from step 0
    train_model = trainable(model)
    timer, counted = Timer(), 0
    stop = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    ckpt_every = args.checkpoint_every or args.eval_every
    probe = task.probe or (lambda m, b: m(b[0]))
    bar = tqdm(total=args.steps, initial=step, desc=task.name, unit="step",
               disable=args.no_progress or not dist.main, dynamic_ncols=True)

    def postfix() -> None:
        shown = {"loss": history.last("train loss")} if "train loss" in history.series else {}
        shown |= {key: history.last(s) for s, key in task.show.items() if s in history.series}
        bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})

    def checkpoint() -> None:
        pending = dist.sum(loss_sum, loss_n)
        if dist.main:
            save_checkpoint(out / CHECKPOINT, {
                "pending_loss": pending,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "train_s": train_s + timer.train_s,
                "history": history.to_dict(), "switch": switch,
                "phase": "dense" if switch else args.layers, "args": plain_args(args)})
        dist.barrier()

    while step < stop:
        if step == switch_step and switch is None:  # S2D: dense layers from here on
            batch = task.batch(step)
            model, optimizer, switch = switch_to_dense(
                model, optimizer, new_optimizer, lambda m, b=batch: probe(m, b), step)
            train_model = trainable(model)
            if dist.main:
                bar.write(f"step {step}: densified {switch['layers']} Monarch layers "
                          f"(max output change {switch['max_abs_output_change']:.1e})")
        set_learning_rate(optimizer, step, args, switch)
        batch = task.batch(step)
        torch.manual_seed((args.seed * 1_000_003 + step) * dist.world + dist.rank)
        with timer.step():
            with autocast(args.bf16, dist.device):
                loss = task.loss(train_model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if task.count is not None:
            counted += task.count(batch)
        step += 1
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(1)

        if step % LOG_EVERY == 0 or step == args.steps:
            total, n = dist.sum(loss_sum, loss_n)
            history.add("train loss", step, total / n)
            loss_sum, loss_n = 0.0, 0
            postfix()
        if step % args.eval_every == 0 or step == args.steps:
            for series, value in task.evaluate(model, step == args.steps).items():
                history.add(series, step, value)
            postfix()
        if step % ckpt_every == 0 or step == stop:
            checkpoint()
    bar.close()
    return Outcome(model, history, step, step >= args.steps, train_s + timer.train_s, timer,
                   switch, counted)


def run_metrics(recipe: str, args: argparse.Namespace, add_arguments: Callable, outcome: Outcome,
                dist: Dist, start: float, **fields: Any) -> dict[str, Any]:
    """``metrics.json`` of a run: what every recipe reports around the recipe's ``fields``."""
    return {
        "recipe": recipe,
        "finished": outcome.finished,
        "command": command_line(recipe, args, add_arguments),
        "options": plain_args(args),
        **fields,
        "steps": outcome.step,
        "wall_time_s": time.perf_counter() - start,
        "train_time_s": outcome.train_s,
        "step_time_median_s": outcome.timer.median_step_s(),
        "processes": dist.world,
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "compile": args.compile,
        "seed": args.seed,
        "history": outcome.history.to_dict(),
    }
