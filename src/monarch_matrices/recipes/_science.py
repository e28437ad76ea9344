"""The run machinery the science recipes (``pde``, ``mri``) share: options, out dir, stages.

A run trains a few models one after another (*stages*: "burgers/fno",
"burgers/monarch", ...).  Everything about a run lives in ``--out DIR``:

- ``checkpoint.pt``: per stage its step, model, optimizer, loss curve and, once
  finished, its results; written atomically every ``--checkpoint-every`` steps
  and at the end of each stage, so ``--resume`` continues where a run stopped
  and ends with exactly the numbers an uninterrupted run gives (batches are a
  pure function of the step, see :func:`epoch_batch`, and nothing
  else draws random numbers while training);
- the recipe's cached data set, ``metrics.json`` and PNGs, each written
  atomically.

The pieces every recipe shares (errors, atomic files, the schedule, batch
order) come from :mod:`.common`; what is here is the stage machinery.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common import (
    CHECKPOINT,
    RunError,
    atomic_write,
    learning_rate,
    positive_int,
    save_checkpoint,
)

__all__ = [
    "Run",
    "add_run_arguments",
    "load_checkpoint",
    "prepare_run",
    "write_png",
]

# Options that may differ between a run and its --resume without changing any number.
_COSMETIC = {"out", "force", "resume", "no_progress", "threads", "checkpoint_every",
             "stop_after", "func", "command", "recipe"}


def add_run_arguments(
    parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float
) -> None:
    """The options every science recipe has (``--out``, ``--steps``, ...), with its defaults."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="folder for checkpoint, data, metrics.json and PNGs (refused if it "
                   "holds files, unless --force or --resume)")
    g.add_argument("--force", action="store_true", help="replace a previous run in DIR")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in DIR (same options)")
    g.add_argument("--steps", type=positive_int, default=steps,
                   help=f"optimizer steps per trained model: the equal budget (default {steps})")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"training batch (default {batch_size})")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    g.add_argument("--seed", type=int, default=0, help="seed for data, init and batch order")
    g.add_argument("--checkpoint-every", type=positive_int, default=200, metavar="N",
                   help="steps between checkpoints (default 200; also at the end of each model)")
    g.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop after N training steps of this invocation, leaving a checkpoint "
                   "to --resume from")
    g.add_argument("--threads", type=positive_int, default=1,
                   help="torch threads (default 1: these tensors are small, and extra threads "
                   "on a busy shared machine slow everything down)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def load_checkpoint(path: Path) -> dict[str, Any]:
    # plain containers and tensors only, so the safe loader suffices
    return torch.load(path, map_location="cpu", weights_only=True)


def command_line() -> str:
    """The command as typed, for metrics.json."""
    prog = os.path.basename(sys.argv[0]) if sys.argv else "python"
    if prog in ("cli.py", "__main__.py", "pytest", "-c"):
        prog = "monarch-matrices"
    return " ".join([prog, *map(shlex.quote, sys.argv[1:])])


def write_png(path: Path, fig: Any) -> None:
    """Save a matplotlib figure atomically (and close it)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def environment() -> dict[str, Any]:
    """What the figures were measured on (the load average matters on a shared machine)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_average_1_5_15": list(load)}


class StopRequested(Exception):
    """``--stop-after`` ran out: the checkpoint is saved, the run can be resumed."""


@dataclass
class Run:
    """One invocation: its folder, checkpoint state and step budget."""

    path: Path
    args: argparse.Namespace
    files: frozenset[str]
    state: dict[str, Any] = field(default_factory=dict)
    steps_left: int | None = None
    started: float = field(default_factory=time.perf_counter)

    def save(self) -> None:
        save_checkpoint(self.path / CHECKPOINT, self.state)

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.state["stages"].get(name)

    def train(
        self, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
        loss_at: Callable[[int], torch.Tensor], evaluate: Callable[[], dict[str, Any]],
        peak_lr: float | None = None,
    ) -> dict[str, Any]:
        """Train ``model`` for ``--steps`` steps (resuming if the checkpoint has this stage).

        ``loss_at(step)`` returns the loss of that step's batch; ``evaluate()`` the
        stage's results, computed once at the end and stored in the checkpoint,
        so a resumed run reports them without recomputing.  The learning rate
        warms up to ``peak_lr`` (default ``--lr``; a group may scale it by its
        ``lr_scale``) and decays by a cosine.  Returns the stage record:
        ``losses``, ``train_s``, ``result``.
        """
        args = self.args
        peak = args.lr if peak_lr is None else peak_lr
        record = self.stage(name)
        if record is not None:
            model.load_state_dict(record["model"])
            if record["done"]:
                return record
            optimizer.load_state_dict(record["optimizer"])
        else:
            record = {"step": 0, "done": False, "losses": [], "train_s": 0.0, "result": None}
            self.state["stages"][name] = record
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=record["step"], desc=name, unit="step",
                   disable=args.no_progress, dynamic_ncols=True, leave=False)
        model.train()
        try:
            while record["step"] < args.steps:
                if self.steps_left is not None and self.steps_left <= 0:
                    self._checkpoint(name, record, model, optimizer)
                    raise StopRequested(name)
                step = record["step"]
                lr = learning_rate(step, args.steps, peak, warmup=max(1, args.steps // 20))
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                start = time.perf_counter()
                loss = loss_at(step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                record["train_s"] += time.perf_counter() - start
                record["losses"].append(loss.item())
                record["step"] = step + 1
                if self.steps_left is not None:
                    self.steps_left -= 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['losses'][-1]:.4g}", refresh=False)
                if record["step"] % args.checkpoint_every == 0 and record["step"] < args.steps:
                    self._checkpoint(name, record, model, optimizer)
        finally:
            bar.close()
        model.eval()
        with torch.no_grad():
            record["result"] = evaluate()
        record["done"] = True
        self._checkpoint(name, record, model, optimizer)
        return record

    def _checkpoint(
        self, name: str, record: dict[str, Any], model: nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        record["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        record["optimizer"] = {} if record["done"] else optimizer.state_dict()
        self.state["stages"][name] = record
        self.save()


def prepare_run(args: argparse.Namespace, recipe: str, files: Iterable[str]) -> Run:
    """Check ``--out`` against ``--force``/``--resume``, set threads, load the checkpoint.

    ``files`` are the names this recipe writes: ``--force`` deletes those and
    refuses a folder holding anything else, so a mistyped ``--out`` never
    costs someone's files.
    """
    torch.set_num_threads(args.threads)
    known = frozenset(files) | {CHECKPOINT}
    path = Path(args.out)
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} exists and is not a folder")
    contents = {p.name for p in path.iterdir() if not p.name.startswith(".")} if path.is_dir() \
        else set()
    args_now = {k: v for k, v in vars(args).items()
                if k not in _COSMETIC and (v is None or isinstance(v, (bool, int, float, str)))}
    state: dict[str, Any] = {"recipe": recipe, "args": args_now, "stages": {}}
    if args.resume:
        if CHECKPOINT not in contents:
            raise RunError(f"--resume: {path / CHECKPOINT} does not exist")
        state = load_checkpoint(path / CHECKPOINT)
        if state.get("recipe") != recipe:
            raise RunError(f"--resume: {path} holds a {state.get('recipe')!r} run, not {recipe!r}")
        changed = {k for k in set(args_now) | set(state["args"])
                   if args_now.get(k) != state["args"].get(k)}
        if changed:
            diffs = ", ".join(f"--{k.replace('_', '-')} {state['args'].get(k)!r} → "
                              f"{args_now.get(k)!r}" for k in sorted(changed))
            raise RunError(f"--resume needs the options of the run it continues; changed: {diffs}")
    elif contents and not args.force:
        raise RunError(f"--out {path} is not empty; pass --force to replace it, "
                       "or --resume to continue it")
    elif contents - known:
        other = sorted(contents - known)[0]
        raise RunError(f"--force: {path} holds {other!r}, which this recipe does not write; "
                       "refusing to delete it (choose another --out)")
    elif contents:
        for name in contents:
            (path / name).unlink()
    path.mkdir(parents=True, exist_ok=True)
    state.setdefault("command", command_line())
    return Run(path, args, known, state, steps_left=args.stop_after)


def stop_message(recipe: str, run: Run) -> str:
    return (f"monarch-matrices train {recipe}: stopped after --stop-after {run.args.stop_after} "
            f"steps; continue with the same command plus --resume")
