"""Pieces every training recipe shares: options, seeding, processes, files, schedule, plots.

The training loop itself is in :mod:`.loop`.  Nothing here imports matplotlib
or transformers at module load.

Files a run writes into ``--out DIR`` (each one atomically: a temporary file in
DIR renamed over the old one, so a crash never leaves a half-written file):

- ``checkpoint.pt``: model, optimizer, step, learning curves, elapsed time
  (``--resume`` continues from it);
- ``metrics.json``: the figures of the run and the command line that made it;
- ``curves.png``: the learning curves.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CHECKPOINT",
    "METRICS",
    "PLOT",
    "Dist",
    "History",
    "RunError",
    "add_common_arguments",
    "atomic_write",
    "autocast",
    "command_line",
    "count_params",
    "epoch_batch",
    "guarded",
    "learning_rate",
    "load_checkpoint",
    "make_optimizer",
    "plain_args",
    "plot_curves",
    "prepare_out_dir",
    "save_checkpoint",
    "seed_everything",
    "set_learning_rate",
    "setup_distributed",
    "wrap_ddp",
]

CHECKPOINT, METRICS, PLOT = "checkpoint.pt", "metrics.json", "curves.png"
# What a previous run leaves in DIR; --force replaces only a folder made of these.
_RUN_FILES = {CHECKPOINT, METRICS, PLOT}


class RunError(Exception):
    """A run that cannot start as asked: a one-line message and an exit code (2: usage)."""

    code = 2


def guarded(recipe: str, body: Callable[[], int]) -> int:
    """Run ``body``; a :class:`RunError` becomes its message on stderr and its exit code."""
    try:
        return body()
    except RunError as e:
        print(f"monarch-matrices train {recipe}: error: {e}", file=sys.stderr, flush=True)
        return e.code


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options as plain values (what a checkpoint and metrics.json can hold)."""
    return {k: v for k, v in vars(args).items()
            if v is None or isinstance(v, (bool, int, float, str, list, tuple))}


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1, with a message that says which rule failed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction strictly between 0 and 1, got {text}")
    return value


def add_common_arguments(
    parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float | str,
    eval_every: int,
) -> None:
    """The options every recipe has (each recipe picks its own defaults).

    ``lr`` may be a description (a str) when the recipe picks the default itself.
    """
    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="folder for checkpoint, "
                   "metrics.json and curves.png (refused if it holds files, unless --force "
                   "or --resume)")
    g.add_argument("--force", action="store_true", help="replace DIR if it holds a previous run")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in DIR (same options)")
    g.add_argument("--steps", type=positive_int, default=steps,
                   help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"global batch, split over processes (default {batch_size})")
    g.add_argument("--lr", type=float, default=None if isinstance(lr, str) else lr,
                   help=f"peak learning rate (default {lr if isinstance(lr, str) else f'{lr:g}'})")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay "
                   "(default 0.1; biases and norms are never decayed)")
    g.add_argument("--seed", type=int, default=0, help="seed for init and data order (default 0)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward/backward")
    g.add_argument("--eval-every", type=positive_int, default=eval_every,
                   help=f"steps between evaluations (default {eval_every})")
    g.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N",
                   help="steps between checkpoints (default: at each evaluation)")
    g.add_argument("--stop-after", type=positive_int, default=None, metavar="N",
                   help="stop after N steps of this invocation, with a checkpoint to --resume "
                   "from (for time-limited jobs)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads per process (default: torch's choice)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (the recipes draw data from their own)."""
    random.seed(seed)
    torch.manual_seed(seed)


def command_line(recipe: str, args: argparse.Namespace, add_arguments: Callable) -> str:
    """The command that made this run, for metrics.json.

    The command as typed when the process is ``monarch-matrices train RECIPE``
    (directly or under torchrun); otherwise (the recipe called from Python) an
    equivalent one: the options that differ from their defaults.
    """
    import shlex

    argv = sys.argv[1:]
    if argv[:2] == ["train", recipe]:
        return " ".join(["monarch-matrices", *map(shlex.quote, argv)])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["monarch-matrices", "train", recipe]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        words.append(action.option_strings[0])
        if action.nargs != 0:
            words.append(shlex.quote(str(value)))
    return " ".join(words)


# ---------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over processes (identity for one process)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def shard(self, global_batch: int) -> slice:
        """This process's rows of a global batch (the batch must split evenly)."""
        per = global_batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def setup_distributed(batch_size: int) -> Dist:
    """Join the ``torchrun`` job described by the environment, if any.

    gloo on CPU, NCCL on CUDA (one GPU per local rank).  The global batch
    must split evenly over the processes, so a 2-process run sees exactly the
    data of a 1-process run.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    if batch_size % world:
        raise RunError(f"--batch-size={batch_size} does not split over {world} processes; "
                       f"use a multiple of {world}")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(rank, world, device)


def teardown_distributed(dist: Dist) -> None:
    if dist.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_ddp(model: nn.Module, dist: Dist) -> nn.Module:
    """``model`` under DistributedDataParallel in a multi-process job, else itself."""
    if not dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


# ---------------------------------------------------------------- files


def prepare_out_dir(out: str | os.PathLike[str], *, force: bool, resume: bool, dist: Dist) -> Path:
    """Check ``--out`` (every process) and create it (the main process).

    A fresh run needs DIR missing or empty; ``--force`` replaces a folder that
    holds only a previous run's files (never anything else); ``--resume``
    needs DIR's checkpoint.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} exists and is not a folder")
    contents = {p.name for p in path.iterdir()} if path.is_dir() else set()
    if resume:
        if CHECKPOINT not in contents:
            raise RunError(f"--resume: {path / CHECKPOINT} does not exist")
    elif contents and not force:
        raise RunError(f"--out {path} is not empty; pass --force to replace it, "
                       "or --resume to continue it")
    elif contents - _RUN_FILES and not all(n.startswith(".") for n in contents - _RUN_FILES):
        other = sorted(contents - _RUN_FILES)[0]
        raise RunError(f"--force: {path} holds {other!r}, which no run writes; "
                       "refusing to delete it (choose another --out)")
    dist.barrier()  # every process has looked before the main one changes anything
    if dist.main:
        if contents and not resume:
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


# Options a resumed run may change: where and how it runs, not what it computes.
_RESUMABLE_CHANGES = {"out", "force", "resume", "stop_after", "threads", "no_progress",
                      "checkpoint_every", "compile", "func", "command", "recipe"}


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint in ``path``, refused if it was made with options that change the run."""
    # our own file, but it holds plain containers and tensors only: load it safely
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    now = plain_args(args)
    for key, saved in ckpt.get("args", {}).items():
        if key not in _RESUMABLE_CHANGES and key in now and now[key] != saved:
            raise RunError(f"--resume: {path} was made with {key}={saved!r}, not {now[key]!r}; "
                           "resume with the same options")
    return ckpt


# ---------------------------------------------------------------- optimization


def learning_rate(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``floor · peak``.

    >>> learning_rate(0, 100, 1.0, 10), learning_rate(10, 100, 1.0, 10)
    (0.1, 1.0)
    >>> round(learning_rate(100, 100, 1.0, 10), 3)
    0.1
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(
    optimizer: torch.optim.Optimizer, step: int, args: argparse.Namespace,
    switch: dict | None = None,
) -> float:
    """Set every group's learning rate for ``step`` (see :func:`learning_rate`); returns it.

    After an S2D switch the ``fresh`` group (the new dense weights) ramps up
    linearly over ``args.rewarm`` steps.
    """
    lr = learning_rate(step, args.steps, args.lr, warmup=max(1, args.steps // 20))
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group.get("name") == "fresh" and switch is not None:
            group["lr"] = lr * min(1.0, (step - switch["step"] + 1) / max(1, args.rewarm))
    return lr


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, fresh: set[int] = frozenset()
) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only.

    nanoGPT decays every parameter with ``p.dim() >= 2``; we decide by role
    instead, so the rule is stated rather than implied by shapes: biases and
    normalization parameters are not decayed; every weight is, *including the
    3-D Monarch factors* ``w1``/``w2`` (together they are the layer's weight
    matrix; leaving them undecayed would regularize Monarch layers less than
    the dense layers they are compared with) and the low-rank factors.
    Parameters whose ids are in ``fresh`` (dense weights made by densifying
    mid-run) get a group of their own so their learning rate can re-warm.
    """
    norms = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.RMSNorm)
    no_decay = {
        id(p)
        for m in model.modules()
        for name, p in m.named_parameters(recurse=False)
        if isinstance(m, norms) or name == "bias" or name.endswith("_bias")
    }
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "fresh": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = "fresh" if id(p) in fresh else "no_decay" if id(p) in no_decay else "decay"
        groups[key].append(p)
    param_groups = [
        {"params": groups["decay"], "weight_decay": weight_decay, "name": "decay"},
        {"params": groups["no_decay"], "weight_decay": 0.0, "name": "no_decay"},
        {"params": groups["fresh"], "weight_decay": weight_decay, "name": "fresh"},
    ]
    # foreach is the fast path on CPU too; fused is not available for every dtype there
    return torch.optim.AdamW(param_groups, lr=lr, betas=(0.9, 0.99), foreach=True)


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bfloat16 autocast when ``enabled`` (a no-op context otherwise)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def epoch_batch(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Rows of the global batch of ``step``: epoch after epoch through a seeded permutation.

    A pure function of its arguments, so a resumed run sees exactly the data an
    uninterrupted one would.

    >>> epoch_batch(0, 3, 4, seed=0) + epoch_batch(1, 3, 4, seed=0)  # 1.5 epochs of 4 rows
    [0, 1, 3, 2, 1, 3]
    """
    start, rows = step * batch, []
    while len(rows) < batch:
        epoch, offset = divmod(start + len(rows), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        rows.extend(perm[offset : offset + batch - len(rows)].tolist())
    return rows


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- curves


@dataclass
class History:
    """Learning curves: ``(step, value)`` pairs per named series."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    def add(self, name: str, step: int, value: float) -> None:
        self.series.setdefault(name, []).append((step, float(value)))

    def last(self, name: str) -> float:
        return self.series[name][-1][1]

    def to_dict(self) -> dict[str, list[list[float]]]:
        return {k: [[s, v] for s, v in pts] for k, pts in self.series.items()}

    @classmethod
    def from_dict(cls, d: dict[str, list[list[float]]]) -> History:
        return cls({k: [(int(s), float(v)) for s, v in pts] for k, pts in d.items()})


def plot_curves(
    history: History, path: Path, *, title: str, panels: list[list[str]], ylabels: list[str],
    marks: dict[str, int] | None = None,
) -> bool:
    """Draw ``panels`` (lists of series names) side by side into ``path``.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, names, ylabel in zip(axes[0], panels, ylabels):
        for name in names:
            pts = history.series.get(name)
            if pts:
                steps, values = zip(*pts)
                ax.plot(steps, values, label=name, marker="o" if len(pts) < 30 else None, ms=3)
        for label, step in (marks or {}).items():
            ax.axvline(step, color="grey", ls="--", lw=1)
            ax.annotate(label, (step, 0.98), xycoords=("data", "axes fraction"), ha="right",
                        va="top", rotation=90, fontsize=8, color="grey")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if any(history.series.get(name) for name in names):
            ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return True


class Timer:
    """Wall time of the training steps alone (evaluation and checkpoints excluded)."""

    def __init__(self) -> None:
        self.train_s = 0.0
        self.step_times: list[float] = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.train_s += elapsed
        self.step_times.append(elapsed)

    def median_step_s(self, skip: int = 2) -> float:
        times = sorted(self.step_times[skip:] or self.step_times)
        return times[len(times) // 2] if times else float("nan")
