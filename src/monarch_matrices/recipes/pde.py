"""``monarch-matrices train pde``: FNO vs the Monarch neural operator on Burgers and Navier–Stokes.

The paper's science claim: inside a Fourier neural operator, replacing the
fixed FFTs by learnable Monarch matrices initialized to the DFT lowers the
error (up to 40% on Navier–Stokes).  This recipe checks it on data it makes
itself (:mod:`.pde_data`):

1. solve ``--train-samples + --test-samples`` problems from random initial
   conditions (cached in DIR, so ``--resume`` does not solve them again);
2. for each problem train the FNO (:class:`.operators.NeuralOperator` with
   ``transform="fft"``) and the Monarch operator (``"monarch"``), both from
   the same initial weights, on the same batches, for ``--steps`` steps;
3. report the relative L2 test error and the parameters of each
   (``metrics.json``) and draw predictions against the truth (one PNG per
   problem).

Training is Adam (the FNO papers' optimizer) on the per-sample relative L2
loss with warm-up and cosine decay; weight decay 1e-4 on the network's
weights but none on the Monarch factors, which stand in for a transform the
FNO does not learn at all: decaying them would pull the DFT towards zero.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ._science import (
    Run,
    StopRequested,
    add_run_arguments,
    environment,
    load_checkpoint,
    prepare_run,
    stop_message,
    write_png,
)
from .common import (
    RunError,
    epoch_batch,
    guarded,
    save_checkpoint,
    write_json,
)

PROBLEMS = ("burgers", "ns")
MODELS = ("fno", "monarch")
TRANSFORM_OF = {"fno": "fft", "monarch": "monarch"}
FILES = ("metrics.json", "data_burgers.pt", "data_ns.pt", "burgers.png", "navier_stokes.png")
WEIGHT_DECAY = 1e-4
TITLES = {"burgers": "1-D Burgers", "ns": "2-D Navier–Stokes"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, steps=500, batch_size=20, lr=1e-3)
    g = parser.add_argument_group("problems")
    g.add_argument("--problem", choices=(*PROBLEMS, "both"), default="both",
                   help="which PDE (default both)")
    g.add_argument("--train-samples", type=int, default=1000, help="training pairs (default 1000)")
    g.add_argument("--test-samples", type=int, default=200, help="test pairs (default 200)")
    g.add_argument("--burgers-n", type=int, default=128, help="Burgers grid (default 128)")
    g.add_argument("--burgers-nu", type=float, default=0.01,
                   help="Burgers viscosity (default 0.01; the FNO's 0.1 decays u to 2%% by T=1)")
    g.add_argument("--burgers-time", type=float, default=1.0, help="Burgers final time (default 1)")
    g.add_argument("--ns-n", type=int, default=32,
                   help="Navier–Stokes grid of the data (default 32; solved on a 2x finer grid)")
    g.add_argument("--ns-nu", type=float, default=1e-3, help="NS viscosity (default 1e-3)")
    g.add_argument("--ns-time", type=float, default=1.0, help="NS final time (default 1)")
    m = parser.add_argument_group("models")
    m.add_argument("--width", type=int, default=None,
                   help="channels (default 32 for Burgers, 20 for Navier–Stokes)")
    m.add_argument("--modes", type=int, default=None,
                   help="Fourier modes per axis (default 16 for Burgers, 8 for Navier–Stokes)")
    m.add_argument("--layers", type=int, default=4, help="Fourier layers (default 4)")
    m.add_argument("--models", default="fno,monarch", metavar="LIST",
                   help="which networks to train, comma-separated (default fno,monarch); e.g. "
                   "--models fno --steps 2500 gives the FNO the Monarch network's wall time")
    m.add_argument("--monarch-lr-scale", type=float, default=1.0,
                   help="learning rate of the Monarch factors relative to --lr (default 1)")


def run(args: argparse.Namespace) -> int:
    return guarded("pde", lambda: _main(args))


# --------------------------------------------------------------------------- setup


def _setups(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per problem: data options (their cache key) and model options."""
    for name in ("train_samples", "test_samples", "burgers_n", "ns_n", "layers"):
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("burgers_nu", "ns_nu", "burgers_time", "ns_time", "lr", "monarch_lr_scale"):
        if not getattr(args, name) >= 0:
            raise RunError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 0")
    setups = {
        "burgers": {"data": {"n": args.burgers_n, "nu": args.burgers_nu,
                             "t_final": args.burgers_time, "oversample": 2},
                    "width": args.width or 32, "modes": args.modes or 16, "dims": 1},
        "ns": {"data": {"n": args.ns_n, "nu": args.ns_nu, "t_final": args.ns_time,
                        "oversample": 2},
               "width": args.width or 20, "modes": args.modes or 8, "dims": 2},
    }
    chosen = PROBLEMS if args.problem == "both" else (args.problem,)
    if not _models(args):
        raise RunError(f"--models {args.models!r}: use fno, monarch or both (comma-separated)")
    for name in chosen:
        s = setups[name]
        n = s["data"]["n"]
        if n < 4 or n % 2:
            raise RunError(f"--{name}-n={n}: use an even grid of at least 4 points")
        limit = n // 2
        if not 1 <= s["modes"] <= limit:
            raise RunError(f"--modes={s['modes']} does not fit the {name} grid of {n}; "
                           f"use 1 <= modes <= {limit}")
        for key in ("train", "test"):
            s["data"][key] = getattr(args, f"{key}_samples")
        s["data"]["seed"] = args.seed
    return {name: setups[name] for name in chosen}


def _models(args: argparse.Namespace) -> tuple[str, ...]:
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(m not in MODELS for m in names):
        return ()
    return tuple(m for m in MODELS if m in names)


def _dataset(run: Run, problem: str, config: dict[str, Any]) -> dict[str, Any]:
    """The cached data set of ``problem`` in DIR, made (and cached) if missing or different."""
    from .pde_data import burgers_dataset, navier_stokes_dataset

    path = run.path / f"data_{problem}.pt"
    if path.exists():
        cached = load_checkpoint(path)
        if cached["config"] == config:
            return cached
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(1_000_003 * config["seed"] + PROBLEMS.index(problem))
    make = burgers_dataset if problem == "burgers" else navier_stokes_dataset
    total = config["train"] + config["test"]
    x, y = make(total, config["n"], gen, nu=config["nu"], t_final=config["t_final"],
                oversample=config["oversample"])
    cut = config["train"]
    data = {"config": config, "train_x": x[:cut], "train_y": y[:cut], "test_x": x[cut:],
            "test_y": y[cut:], "seconds": time.perf_counter() - start}
    save_checkpoint(path, data)
    return data


def _optimizer(model: Any, args: argparse.Namespace) -> torch.optim.Optimizer:
    monarch = {id(p) for p in model.monarch_parameters()}
    weights = [p for p in model.parameters() if id(p) not in monarch]
    groups = [{"params": weights, "weight_decay": WEIGHT_DECAY}]
    if monarch:
        groups.append({"params": model.monarch_parameters(), "weight_decay": 0.0,
                       "lr_scale": args.monarch_lr_scale})
    return torch.optim.AdamW(groups, lr=args.lr)


# --------------------------------------------------------------------------- main


def _main(args: argparse.Namespace) -> int:
    from .operators import NeuralOperator, count_parameters, relative_l2

    setups = _setups(args)
    run = prepare_run(args, "pde", FILES)
    print(f"monarch-matrices train pde: {', '.join(TITLES[p] for p in setups)}; "
          f"{args.steps} steps per model, out {run.path}", flush=True)
    results: dict[str, Any] = {}
    try:
        for problem, setup in setups.items():
            data = _dataset(run, problem, setup["data"])
            dims, n = setup["dims"], setup["data"]["n"]
            results[problem] = {"setup": {**setup["data"], "width": setup["width"],
                                          "modes": setup["modes"], "layers": args.layers},
                                "data_seconds": data["seconds"], "models": {}}
            init = None
            predictions = {}
            for kind in _models(args):
                torch.manual_seed(args.seed)
                model = NeuralOperator(dims, n, width=setup["width"], modes=setup["modes"],
                                       layers=args.layers, transform=TRANSFORM_OF[kind])
                if init is None:
                    init = {k: v.clone() for k, v in model.state_dict().items()}
                else:  # the same starting network: only the transforms differ
                    model.load_state_dict(init, strict=False)
                dft_init = _transform_matrices(model)
                optimizer = _optimizer(model, args)
                train_x, train_y = data["train_x"], data["train_y"]

                def loss_at(step: int, model=model, tx=train_x, ty=train_y) -> torch.Tensor:
                    rows = epoch_batch(step, args.batch_size, len(tx), args.seed)
                    return relative_l2(model(tx[rows]), ty[rows]).mean()

                def evaluate(model=model, data=data, dft_init=dft_init) -> dict[str, Any]:
                    test = _errors(model, data["test_x"], data["test_y"])
                    train = _errors(model, data["train_x"][:200], data["train_y"][:200])
                    out = {"test_rel_l2": float(test.mean()), "test_rel_l2_median":
                           float(test.median()), "train_rel_l2": float(train.mean())}
                    if dft_init:
                        out["transform_change"] = _transform_change(model, dft_init)
                    return out

                record = run.train(f"{problem}/{kind}", model, optimizer, loss_at, evaluate)
                steps_timed = max(1, len(record["losses"]))
                results[problem]["models"][kind] = {
                    "params": count_parameters(model),
                    **record["result"],
                    "train_seconds": record["train_s"],
                    "seconds_per_step": record["train_s"] / steps_timed,
                    "final_train_loss": sum(record["losses"][-20:]) / len(record["losses"][-20:]),
                }
                with torch.no_grad():
                    predictions[kind] = model(data["test_x"][:4])
                _say_model(problem, kind, results[problem]["models"][kind])
            if len(predictions) == 2:
                fno, mon = (results[problem]["models"][k]["test_rel_l2"] for k in MODELS)
                results[problem]["monarch_vs_fno"] = {
                    "error_ratio": mon / fno, "relative_change_percent": 100 * (mon - fno) / fno,
                    "verdict": "Monarch lower" if mon < fno else "FNO lower"}
            _plot(run, problem, data, predictions, results[problem])
    except StopRequested:
        print(stop_message("pde", run), flush=True)
        return 0
    metrics = {"recipe": "pde", "command": run.state["command"], "args": run.state["args"],
               "problems": results, "wall_seconds_this_invocation":
               time.perf_counter() - run.started, "environment": environment(),
               "notes": "rel_l2 = mean over test samples of ||pred - truth|| / ||truth||; params "
               "count a complex entry as two; equal budget = same steps, batches, schedule"}
    write_json(run.path / "metrics.json", metrics)
    print(f"wrote {run.path}/metrics.json", flush=True)
    return 0


def _errors(model: Any, x: torch.Tensor, y: torch.Tensor, chunk: int = 50) -> torch.Tensor:
    from .operators import relative_l2

    return torch.cat([relative_l2(model(a), b) for a, b in zip(x.split(chunk), y.split(chunk))])


def _transform_matrices(model: Any) -> list[torch.Tensor]:
    from ..nn.product import MonarchProduct

    return [m.to_dense().detach().clone() for m in model.modules()
            if isinstance(m, MonarchProduct)]


def _transform_change(model: Any, initial: list[torch.Tensor]) -> float:
    """Mean relative Frobenius distance of the trained transforms from the exact DFTs."""
    now = _transform_matrices(model)
    changes = [float((a - b).norm() / b.norm()) for a, b in zip(now, initial)]
    return sum(changes) / len(changes)


def _say_model(problem: str, kind: str, r: dict[str, Any]) -> None:
    extra = f", transforms moved {r['transform_change']:.3f} from the DFT" \
        if "transform_change" in r else ""
    print(f"  {TITLES[problem]:18s} {kind:8s} test rel. L2 {r['test_rel_l2']:.4f}  "
          f"params {r['params']:,}  train {r['train_seconds']:.0f} s{extra}", flush=True)


# --------------------------------------------------------------------------- plots


def _plot(run: Run, problem: str, data: dict[str, Any], predictions: dict[str, torch.Tensor],
          result: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no PNG: matplotlib is not installed)", flush=True)
        return
    kinds = list(predictions)
    name = {"fno": "FNO", "monarch": "Monarch"}
    label = {k: f"{name[k]} (test rel. L2 {result['models'][k]['test_rel_l2']:.4f})"
             for k in kinds}
    style = {"fno": ("--", "C0"), "monarch": (":", "C3")}
    x0, truth = data["test_x"][:4].numpy(), data["test_y"][:4].numpy()
    pred = {k: v.numpy() for k, v in predictions.items()}
    setup = f"ν={result['setup']['nu']}, T={result['setup']['t_final']}"
    if problem == "burgers":
        grid = (torch.arange(truth.shape[-1]) / truth.shape[-1]).numpy()
        fig, axes = plt.subplots(2, 3, figsize=(14, 6), sharex=True,
                                 gridspec_kw={"height_ratios": [2, 1]})
        for i in range(3):
            ax, err = axes[0, i], axes[1, i]
            ax.plot(grid, x0[i], color="0.7", lw=1, label="u(0)")
            ax.plot(grid, truth[i], color="k", lw=2, label="u(T) truth")
            for k in kinds:
                ax.plot(grid, pred[k][i], style[k][0], color=style[k][1], lw=2, label=label[k])
                err.plot(grid, pred[k][i] - truth[i], color=style[k][1], lw=1, label=name[k])
            ax.set_title(f"test sample {i}")
            err.axhline(0, color="k", lw=0.5)
            err.set_xlabel("x")
        axes[0, 0].legend(fontsize=7)
        axes[1, 0].legend(fontsize=7)
        axes[1, 0].set_ylabel("prediction − truth")
        fig.suptitle(f"Burgers {setup}: prediction vs truth")
        fig.tight_layout()
        write_png(run.path / "burgers.png", fig)
        return
    cols = [("ω(0)", x0, "field"), ("ω(T) truth", truth, "field")]
    cols += [(name[k], pred[k], "field") for k in kinds]
    cols += [(f"|{name[k]} − truth|", abs(pred[k] - truth), "error") for k in kinds]
    fig, axes = plt.subplots(2, len(cols), figsize=(2.6 * len(cols), 5.4), squeeze=False)
    for row in range(2):
        lim = float(abs(truth[row]).max())
        elim = max(float(f[row].max()) for _, f, kind in cols if kind == "error")
        for c, (title, field, kind) in enumerate(cols):
            ax = axes[row, c]
            if kind == "field":
                ax.imshow(field[row], cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                ax.imshow(field[row], cmap="magma", vmin=0, vmax=elim)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.suptitle(f"Navier–Stokes {setup}: " + ", ".join(label[k] for k in kinds), fontsize=9)
    fig.tight_layout()
    write_png(run.path / "navier_stokes.png", fig)
