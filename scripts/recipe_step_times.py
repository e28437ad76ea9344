"""Dense vs Monarch training-step time of a recipe's model, measured side by side.

The recipes' metrics.json hold each run's own median step time, but two runs
made at different moments on a shared machine are not comparable.  This
script builds the recipe's dense and Monarch models from the same options,
then times full training steps (forward, backward, clipping, AdamW) of the two
*interleaved*, on the same batch, and reports the median of the per-repeat
ratios (DESIGN §5: only paired ratios count)::

    python scripts/recipe_step_times.py lm                      # the recipe's defaults
    python scripts/recipe_step_times.py lm --n-embd 512 --n-head 8
    python scripts/recipe_step_times.py vision --model mixer
    python scripts/recipe_step_times.py finetune --repeats 10
    python scripts/recipe_step_times.py lm --compile            # both models torch.compile'd

Options after the recipe name are the recipe's own (``--out`` is not needed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from monarch_matrices.ops import memory
from monarch_matrices.recipes import load_recipe
from monarch_matrices.recipes.common import make_optimizer


def recipe_args(recipe: str, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"recipe_step_times.py {recipe}")
    load_recipe(recipe).add_arguments(parser)
    return parser.parse_args(["--out", os.devnull, *argv])


def lm_case(args):
    from monarch_matrices.recipes.data import CharTokenizer, load_text
    from monarch_matrices.recipes.lm import build_model, get_batch

    text, _ = load_text(args.data)
    tok = CharTokenizer.from_text(text)
    x, y = get_batch(tok.encode(text[:200_000]), args.batch_size, args.block_size,
                     torch.Generator().manual_seed(0))
    models = {kind: build_model(args, tok.vocab_size, kind) for kind in ("dense", "monarch")}
    return models, lambda m: m(x, y), f"{args.batch_size}x{args.block_size} tokens"


def vision_case(args):
    from monarch_matrices.recipes.data import load_images
    from monarch_matrices.recipes.vision import build_model, check_arguments

    check_arguments(args)
    data = load_images(args.data)
    x, y = data.train_x[: args.batch_size], data.train_y[: args.batch_size]
    models = {}
    for kind in ("dense", "monarch"):
        args.layers = kind
        models[kind] = build_model(args, data.image_size, data.num_classes)
    return models, lambda m: F.cross_entropy(m(x), y), f"{args.batch_size} images"


def finetune_case(args):
    from monarch_matrices.recipes.data import load_labelled_text
    from monarch_matrices.recipes.finetune import build_model, check_arguments, collate, tokenize

    check_arguments(args)  # fills in the Monarch defaults (--lowrank) before both builds
    labels = tuple(args.labels.split(","))
    data = load_labelled_text(args.data, text_column=args.text_column,
                              label_column=args.label_column, labels=labels)
    models, tokenizer = {}, None
    for kind in ("dense", "monarch"):
        args.layers = kind
        models[kind], _, tokenizer, _ = build_model(args, len(labels))
    ids, mask = collate(tokenize(tokenizer, data.train_texts[: args.batch_size], args.max_length),
                        tokenizer.pad_token_id)
    y = data.train_labels[: args.batch_size]
    return (models, lambda m: F.cross_entropy(m(ids, mask), y),
            f"{args.batch_size} texts, {ids.shape[1]} tokens")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("lm", "vision", "finetune"):
        print(__doc__)
        return 2
    recipe, rest = sys.argv[1], sys.argv[2:]
    repeats = 7
    if "--repeats" in rest:
        i = rest.index("--repeats")
        repeats = int(rest[i + 1])
        del rest[i : i + 2]
    args = recipe_args(recipe, rest)
    memory.retain_freed_memory_unless_switched_off()  # as the CLI (docs/speed.md, item 10)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models, loss_fn, batch = {"lm": lm_case, "vision": vision_case,
                              "finetune": finetune_case}[recipe](args)
    optimizers = {k: make_optimizer(m, args.lr, args.weight_decay) for k, m in models.items()}
    if args.compile:  # the warm-up steps below compile (not timed)
        models = {k: torch.compile(m) for k, m in models.items()}

    def step(kind: str) -> float:
        model, opt = models[kind], optimizers[kind]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_fn(model)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for kind in models:  # warm-up: allocator, optimizer state
        step(kind)
        step(kind)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for kind in models:
            times[kind].append(step(kind))
    ratios = [d / m for d, m in zip(times["dense"], times["monarch"])]
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{recipe} ({batch}; bf16={args.bf16}; compile={args.compile}; "
          f"{torch.get_num_threads()} threads; "
          f"freed memory {'retained' if memory.freed_memory_retained() else 'returned'}; "
          f"load {load:.2f}; {repeats} paired repeats)")
    for kind in models:
        print(f"  {kind:8s} params {params[kind] / 1e6:7.2f}M  step median "
              f"{statistics.median(times[kind]) * 1e3:8.1f} ms")
    print(f"  dense/monarch step-time ratio: median {statistics.median(ratios):.2f}x "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
