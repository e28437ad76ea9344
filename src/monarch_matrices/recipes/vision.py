"""``train vision``: ViT and MLP-Mixer on Fashion-MNIST, dense vs Monarch (E2E and S2D).

Two small image classifiers over non-overlapping patches, each readable in a
screen:

- ViT (``--model vit``): patch embedding + learned positions, ``depth`` pre-norm
  blocks (self-attention, 4x MLP), mean pooling, a linear head;
- MLP-Mixer (``--model mixer``): the same patches, ``depth`` blocks that mix
  across patches (an MLP over the patch axis) then across channels (a 4x MLP).

``--layers monarch`` makes the blocks' weight matrices Monarch: in ViT the
q/k/v and output projections and the MLP; in the Mixer the channel MLP (the
patch MLP mixes only 16 patches, too small a matrix for structure to pay; it
stays dense, as do the patch embedding and the head).  ``--densify-at F`` runs
the paper's S2D schedule, as in ``train lm``.

Data: Fashion-MNIST (Debian package ``dataset-fashion-mnist``), any folder of
MNIST-style IDX files (``--data``), or scikit-learn's digits when neither is
there.  The reported accuracy is on the dataset's test split (all of it at the
end; the first ``--eval-samples`` of it for the curve along the way).
"""

from __future__ import annotations

import argparse
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
    epoch_batch,
    guarded,
    plot_curves,
    positive_int,
    seed_everything,
    write_json,
)
from .layers import add_layer_arguments, check_layer_arguments, layer_fields, make_linear
from .loop import Task, run_metrics, session, train

MODELS = ("vit", "mixer")
# Peak learning rates, one per architecture, chosen for the dense baseline
# (ViT at 2e-3 lost 2 points to its own Monarch version; docs/results.md).
DEFAULT_LR = {"vit": 1e-3, "mixer": 2e-3}

# ---------------------------------------------------------------- the models


@dataclass
class VisionConfig:
    image_size: int
    num_classes: int
    channels: int = 1
    patch_size: int = 7  # 28x28 images -> 16 patches
    dim: int = 256  # width of the patch embeddings
    depth: int = 4  # blocks
    heads: int = 4  # ViT: head size dim / heads = 64
    token_dim: int = 64  # Mixer: hidden width of the MLP over patches

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches, flattened and projected to ``dim``."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.p = cfg.patch_size
        self.proj = nn.Linear(cfg.channels * self.p**2, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(x, self.p, stride=self.p)  # (B, C·p·p, N)
        return self.proj(patches.transpose(1, 2))  # (B, N, dim)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, linear) -> None:
        super().__init__()
        self.fc1 = linear(dim, hidden)
        self.fc2 = linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig, linear) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = linear(cfg.dim, 3 * cfg.dim)
        self.proj = linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, C/heads)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class ViTBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, linear) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg, linear)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, 4 * cfg.dim, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MixerBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, linear) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.mlp_tokens = MLP(cfg.num_patches, cfg.token_dim, nn.Linear)  # mixes patches
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp_channels = MLP(cfg.dim, 4 * cfg.dim, linear)  # mixes channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim)
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class Classifier(nn.Module):
    """Patches -> blocks -> mean over patches -> class logits (ViT or Mixer)."""

    def __init__(self, kind: str, cfg: VisionConfig, linear=nn.Linear) -> None:
        super().__init__()
        self.kind, self.cfg = kind, cfg
        self.patch_embed = PatchEmbed(cfg)
        if kind == "vit":
            self.pos = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.dim))
            nn.init.normal_(self.pos, std=0.02)
        else:
            self.register_parameter("pos", None)  # the patch MLP knows where each patch is
        block = ViTBlock if kind == "vit" else MixerBlock
        self.blocks = nn.ModuleList(block(cfg, linear) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # (B, N, dim)
        if self.pos is not None:
            x = x + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))  # (B, classes)


# ---------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model and data")
    m.add_argument("--model", choices=MODELS, default="vit", help="architecture (default vit)")
    add_layer_arguments(m, "the blocks")
    m.add_argument("--dim", type=positive_int, default=VisionConfig.dim)
    m.add_argument("--depth", type=positive_int, default=VisionConfig.depth)
    m.add_argument("--heads", type=positive_int, default=VisionConfig.heads)
    m.add_argument("--patch-size", type=positive_int, default=None,
                   help="patch side in pixels (default: a quarter of the image side, "
                   "half for images under 16 pixels)")
    m.add_argument("--data", metavar="DIR", help="folder of MNIST-style IDX files "
                   "(default: Fashion-MNIST if installed, else scikit-learn's digits)")
    m.add_argument("--eval-samples", type=positive_int, default=2000,
                   help="test images per evaluation along the way (default 2000; "
                   "the final evaluation uses all)")
    add_common_arguments(parser, steps=800, batch_size=128, eval_every=100,
                         lr=", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse contradictory options; fill in the per-model learning rate."""
    if args.lr is None:
        args.lr = DEFAULT_LR[args.model]
    check_layer_arguments(args)
    if args.model == "vit" and args.dim % args.heads:
        raise RunError(f"--dim={args.dim} must be a multiple of --heads={args.heads}")


# ---------------------------------------------------------------- data


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
             dist: Dist) -> tuple[float, float]:
    """(loss, accuracy in %) over ``x``, the batches shared out between processes."""
    model.eval()
    loss = correct = count = 0.0
    batch = max(args.batch_size, 256)
    for i, start in enumerate(range(0, len(y), batch)):
        if i % dist.world != dist.rank:
            continue
        xb, yb = x[start : start + batch].to(dist.device), y[start : start + batch].to(dist.device)
        with autocast(args.bf16, dist.device):
            logits = model(xb).float()
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
        count += len(yb)
    model.train()
    loss, correct, count = dist.sum(loss, correct, count)
    return loss / count, 100 * correct / count


# ---------------------------------------------------------------- the run


def build_model(args: argparse.Namespace, image_size: int, num_classes: int) -> Classifier:
    # a 4x4 grid of patches; small images (8x8 digits) get 2x2 so a patch has 16 pixels
    patch = args.patch_size or max(1, image_size // 4 if image_size >= 16 else image_size // 2)
    if image_size % patch:
        raise RunError(f"--patch-size={patch} does not divide the image side {image_size}")
    cfg = VisionConfig(image_size, num_classes, 1, patch, args.dim, args.depth, args.heads)
    return Classifier(args.model, cfg, make_linear(args.layers, args.nblocks, args.lowrank))


def run(args: argparse.Namespace) -> int:
    return guarded("vision", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from .data import load_images

    check_arguments(args)
    with session(args) as (dist, out, start):
        data = load_images(args.data)
        seed_everything(args.seed)
        model = build_model(args, data.image_size, data.num_classes).to(dist.device)
        params_start = count_params(model)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = epoch_batch(step, args.batch_size, len(data.train_y), args.seed)
            rows = torch.tensor(rows[dist.shard(args.batch_size)])
            return data.train_x[rows].to(dist.device), data.train_y[rows].to(dist.device)

        def test(m: nn.Module, final: bool) -> dict[str, float]:
            n = len(data.test_y) if final else args.eval_samples  # the final figure: all of it
            loss, acc = evaluate(m, data.test_x[:n], data.test_y[:n], args, dist)
            return {"test loss": loss, "test accuracy": acc}

        name = f"{args.model} {args.layers}"
        task = Task(name=name, batch=batch, evaluate=test, show={"test accuracy": "acc"},
                    loss=lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]))
        done = train(task, model, args, dist, out)

        if dist.main:
            label = name + (f" → dense at {args.densify_at:g}" if done.switch else "")
            acc = done.history.last("test accuracy") if done.finished else None
            loss = done.history.last("test loss") if done.finished else None
            metrics = run_metrics(
                "vision", args, add_arguments, done, dist, start,
                model=args.model,
                **layer_fields(args, done.switch),
                config=asdict(done.model.cfg),
                data={"source": data.source, "train": len(data.train_y),
                      "test": len(data.test_y), "classes": data.num_classes},
                final={"test_accuracy": acc, "test_loss": loss},
                samples_per_s=done.per_second(args.batch_size),
                params=params_start,
                params_final=count_params(done.model),
            )
            write_json(out / METRICS, metrics)
            marks = {"densify": done.switch["step"]} if done.switch else None
            plot_curves(done.history, out / PLOT, title=f"vision ({label}): {data.source}",
                        panels=[["train loss", "test loss"], ["test accuracy"]],
                        ylabels=["cross-entropy", "accuracy (%)"], marks=marks)
            if done.finished:
                print(f"vision {label}: test accuracy {acc:.2f}% (loss {loss:.4f}) after "
                      f"{done.step} steps; {metrics['samples_per_s']:.0f} images/s; "
                      f"wrote {out}/", flush=True)
            else:
                print(f"vision {label}: stopped at step {done.step}; --resume to continue",
                      flush=True)
    return 0
