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
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    CHECKPOINT,
    METRICS,
    PLOT,
    Dist,
    History,
    RunError,
    Timer,
    add_common_arguments,
    autocast,
    command_line,
    count_params,
    epoch_batch,
    fraction,
    guarded,
    load_checkpoint,
    make_optimizer,
    plain_args,
    plot_curves,
    positive_int,
    prepare_out_dir,
    save_checkpoint,
    seed_everything,
    set_learning_rate,
    setup_distributed,
    teardown_distributed,
    wrap_ddp,
    write_json,
)
from .layers import LAYER_KINDS, densify_training, make_linear, switch_to_dense

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
    m.add_argument("--layers", choices=LAYER_KINDS, default="monarch",
                   help="weight matrices in the blocks (default monarch)")
    m.add_argument("--nblocks", type=positive_int, default=4,
                   help="Monarch blocks per factor (default 4)")
    m.add_argument("--lowrank", type=int, default=0, metavar="R",
                   help="add a rank-R term to every Monarch layer (S2D; default 0: none)")
    m.add_argument("--densify-at", type=fraction, default=None, metavar="F",
                   help="S2D: after fraction F of the steps, multiply the Monarch layers "
                   "out into dense ones and finish dense (needs --layers monarch)")
    m.add_argument("--rewarm", type=int, default=20, metavar="N",
                   help="S2D: steps over which the new dense weights' learning rate "
                   "ramps back up (default 20)")
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
    if args.densify_at is not None and args.layers != "monarch":
        raise RunError("--densify-at needs --layers monarch (it densifies Monarch layers)")
    if args.lowrank and args.layers != "monarch":
        raise RunError("--lowrank adds to Monarch layers; it needs --layers monarch")
    if args.lowrank < 0:
        raise RunError(f"--lowrank={args.lowrank} must be >= 0")
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
    from tqdm import tqdm

    from .data import load_images

    check_arguments(args)
    dist = setup_distributed(args.batch_size)
    try:
        out = prepare_out_dir(args.out, force=args.force, resume=args.resume, dist=dist)
        if args.threads:
            torch.set_num_threads(args.threads)
        start_time = time.perf_counter()
        data = load_images(args.data)

        seed_everything(args.seed)
        model = build_model(args, data.image_size, data.num_classes).to(dist.device)
        params_start = count_params(model)
        switch = None if args.densify_at is None else round(args.densify_at * args.steps)

        def new_optimizer(m: nn.Module, fresh: set[int] = frozenset()):
            return make_optimizer(m, args.lr, args.weight_decay, fresh)

        optimizer = new_optimizer(model)
        step, history, train_s, switch_info = 0, History(), 0.0, None
        pending = [0.0, 0]  # train loss summed since the last logged point, and count
        if args.resume:
            ckpt = load_checkpoint(out / CHECKPOINT, args)
            pending = ckpt["pending_loss"]
            if ckpt["phase"] == "dense" and args.layers == "monarch":
                model, optimizer, _ = densify_training(model, optimizer, new_optimizer)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, train_s = ckpt["step"], ckpt["train_s"]
            history, switch_info = History.from_dict(ckpt["history"]), ckpt["switch"]

        def trainable(m: nn.Module) -> nn.Module:
            m = wrap_ddp(m, dist)
            return torch.compile(m) if args.compile else m

        def get_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            rows = epoch_batch(step, args.batch_size, len(data.train_y), args.seed)
            rows = torch.tensor(rows[dist.shard(args.batch_size)])
            return data.train_x[rows].to(dist.device), data.train_y[rows].to(dist.device)

        train_model = trainable(model)
        timer = Timer()
        stop = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
        name = f"{args.model} {args.layers}"
        bar = tqdm(total=args.steps, initial=step, desc=name, unit="step",
                   disable=args.no_progress or not dist.main, dynamic_ncols=True)
        ckpt_every = args.checkpoint_every or args.eval_every
        loss_sum, loss_n = pending if dist.main else (0.0, 0)
        eval_x, eval_y = data.test_x[: args.eval_samples], data.test_y[: args.eval_samples]

        def checkpoint() -> None:
            pending = dist.sum(loss_sum, loss_n)  # a partial train-loss bucket, all processes
            if dist.main:
                save_checkpoint(out / CHECKPOINT, {
                    "pending_loss": pending,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "train_s": train_s + timer.train_s,
                    "history": history.to_dict(), "switch": switch_info,
                    "phase": "dense" if switch_info else args.layers, "args": plain_args(args)})
            dist.barrier()

        while step < stop:
            if step == switch and switch_info is None:  # S2D: dense layers from here on
                probe = get_batch(step)[0]
                model, optimizer, switch_info = switch_to_dense(
                    model, optimizer, new_optimizer, lambda m, x=probe: m(x), step)
                train_model = trainable(model)
                if dist.main:
                    bar.write(f"step {step}: densified {switch_info['layers']} Monarch layers "
                              f"(max logit change {switch_info['max_abs_output_change']:.1e})")
            set_learning_rate(optimizer, step, args, switch_info)

            x, y = get_batch(step)
            with timer.step():
                with autocast(args.bf16, dist.device):
                    loss = F.cross_entropy(train_model(x).float(), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.update(1)

            if step % 10 == 0 or step == args.steps:
                total, n = dist.sum(loss_sum, loss_n)
                history.add("train loss", step, total / n)
                loss_sum, loss_n = 0.0, 0
                bar.set_postfix(loss=f"{total / n:.3f}")
            if step % args.eval_every == 0 and step < args.steps:
                test_loss, acc = evaluate(model, eval_x, eval_y, args, dist)
                history.add("test loss", step, test_loss)
                history.add("test accuracy", step, acc)
                bar.set_postfix(loss=f"{history.last('train loss'):.3f}", acc=f"{acc:.1f}")
            if step == args.steps:  # the final figure: the whole test split
                test_loss, acc = evaluate(model, data.test_x, data.test_y, args, dist)
                history.add("test loss", step, test_loss)
                history.add("test accuracy", step, acc)
            if step % ckpt_every == 0 or step == stop:
                checkpoint()
        bar.close()

        finished = step >= args.steps
        train_s += timer.train_s
        if dist.main:
            label = f"{name}" + (f" → dense at {args.densify_at:g}" if switch else "")
            acc = history.last("test accuracy") if finished else None
            loss = history.last("test loss") if finished else None
            samples_per_s = args.batch_size * len(timer.step_times) / max(timer.train_s, 1e-9)
            metrics = {
                "recipe": "vision",
                "finished": finished,
                "command": command_line("vision", args, add_arguments),
                "options": plain_args(args),
                "model": args.model,
                "layers": args.layers,
                "nblocks": args.nblocks if args.layers == "monarch" else None,
                "lowrank": args.lowrank or None,
                "densify_at": args.densify_at,
                "densified": switch_info,
                "config": asdict(model.cfg),
                "data": {"source": data.source, "train": len(data.train_y),
                         "test": len(data.test_y), "classes": data.num_classes},
                "steps": step,
                "final": {"test_accuracy": acc, "test_loss": loss},
                "wall_time_s": time.perf_counter() - start_time,
                "train_time_s": train_s,
                "samples_per_s": samples_per_s,
                "step_time_median_s": timer.median_step_s(),
                "params": params_start,
                "params_final": count_params(model),
                "processes": dist.world,
                "threads": torch.get_num_threads(),
                "bf16": args.bf16,
                "compile": args.compile,
                "seed": args.seed,
                "history": history.to_dict(),
            }
            write_json(out / METRICS, metrics)
            marks = {"densify": switch_info["step"]} if switch_info else None
            plot_curves(history, out / PLOT, title=f"vision ({label}): {data.source}",
                        panels=[["train loss", "test loss"], ["test accuracy"]],
                        ylabels=["cross-entropy", "accuracy (%)"], marks=marks)
            if finished:
                print(f"vision {label}: test accuracy {acc:.2f}% (loss {loss:.4f}) after "
                      f"{step} steps; {samples_per_s:.0f} images/s; wrote {out}/", flush=True)
            else:
                print(f"vision {label}: stopped at step {step}; --resume to continue", flush=True)
        return 0
    finally:
        teardown_distributed(dist)
