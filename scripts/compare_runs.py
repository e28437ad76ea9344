"""Overlay the learning curves of several recipe runs and print their figures side by side.

Each argument is a run folder (``--out`` of ``monarch-matrices train``) holding
``metrics.json``; a label can be given as ``LABEL=DIR``::

    python scripts/compare_runs.py dense=out/lm-dense monarch=out/lm-monarch \\
        s2d=out/lm-s2d --series "val loss" --png docs/figures/recipes-lm.png --force
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]DIR")
    parser.add_argument("--series", default=None,
                        help="curve to overlay (default: 'val loss' or 'test accuracy')")
    parser.add_argument("--png", type=Path, help="write the overlay here")
    parser.add_argument("--title", default=None)
    parser.add_argument("--force", action="store_true", help="replace an existing --png file")
    args = parser.parse_args()
    if args.png and args.png.exists() and not args.force:
        parser.error(f"{args.png} exists; pass --force to replace it")

    runs = []
    for spec in args.runs:
        label, _, folder = spec.rpartition("=")
        path = Path(folder) / "metrics.json"
        if not path.is_file():
            parser.error(f"{path} does not exist: give the --out folder of a finished run")
        runs.append((label or Path(folder).name, json.loads(path.read_text())))

    w = max(len(label) for label, _ in runs)
    print(f"{'run':{w}s} {'final':>16s} {'steps':>6s} {'wall s':>7s} {'train s':>8s} "
          f"{'step s':>7s} {'per s':>9s} {'params':>10s}")
    for label, m in runs:
        final = m["final"]
        figure = (f"loss {final['val_loss']:.4f}" if "val_loss" in final
                  else f"acc {final['test_accuracy']:.2f}%")
        rate = m.get("tokens_per_s") if m["recipe"] == "lm" else m.get("samples_per_s")
        print(f"{label:{w}s} {figure:>16s} {m['steps']:6d} {m['wall_time_s']:7.0f} "
              f"{m['train_time_s']:8.0f} {m['step_time_median_s']:7.3f} {rate:9.1f} "
              f"{m['params']:10d}")

    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = args.series or ("val loss" if runs[0][1]["recipe"] == "lm" else "test accuracy")
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, m in runs:
            pts = m["history"].get(series, [])
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=label)
            if m.get("densified"):
                ax.axvline(m["densified"]["step"], color="grey", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(series)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(args.title or series)
        fig.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.png.with_name(f".{args.png.name}.tmp")
        fig.savefig(tmp, dpi=110, format="png")
        tmp.replace(args.png)  # atomic: a crash never leaves half a figure
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
