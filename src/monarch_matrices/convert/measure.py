"""What a user wants to know after converting: size, speed and fidelity, side by side.

Only ratios measured in the same run mean anything on a shared machine, so
latency alternates dense and Monarch runs and compares medians.  Fidelity for
a sentence encoder compares mean-pooled embeddings of a fixed set of sentences
(:data:`SENTENCES`, eight topics of six): how close each embedding stays, and
whether each sentence keeps its nearest neighbour.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

__all__ = [
    "SENTENCES",
    "Fidelity",
    "Latency",
    "example_inputs",
    "measure_latency",
    "neighbour_similarities",
    "output_error",
    "sentence_embeddings",
    "sentence_fidelity",
    "text_inputs",
    "weights_file_size",
]

#: Eight topics, six sentences each: close neighbours exist within a topic,
#: so nearest-neighbour agreement says whether the geometry survived.
SENTENCES: tuple[str, ...] = (
    # cooking
    "Simmer the tomato sauce slowly so the garlic does not burn.",
    "Knead the bread dough for ten minutes until it turns elastic.",
    "A pinch of salt brings out the sweetness in caramel.",
    "Roast the vegetables in a hot oven until their edges brown.",
    "Whisk the eggs and sugar together before folding in the flour.",
    "Fresh basil should be added to the pasta right before serving.",
    # weather
    "Heavy rain is expected across the coast tomorrow afternoon.",
    "The morning fog lifted and the sky turned a clear blue.",
    "A cold front will bring snow to the mountains overnight.",
    "Strong winds knocked down power lines during the storm.",
    "Temperatures will climb above thirty degrees this weekend.",
    "The forecast calls for scattered thunderstorms in the evening.",
    # football
    "The striker scored twice in the second half to win the match.",
    "Our goalkeeper saved a penalty in the final minute.",
    "The coach changed the formation after a poor first half.",
    "Fans sang in the stadium long after the final whistle.",
    "The defender was sent off for a dangerous tackle.",
    "The club signed a young midfielder before the transfer deadline.",
    # programming
    "The function returns None when the list is empty.",
    "Run the unit tests before you merge the pull request.",
    "A memory leak made the server slower every hour.",
    "The compiler reported a type error on line forty.",
    "We rewrote the parser to handle nested brackets correctly.",
    "Caching the query results cut the page load time in half.",
    # finance
    "The central bank raised interest rates by a quarter point.",
    "Shares of the company fell after weak quarterly earnings.",
    "Inflation eased slightly for the second month in a row.",
    "Investors moved money into government bonds during the sell-off.",
    "The currency weakened against the dollar after the announcement.",
    "The startup raised fifty million in its latest funding round.",
    # health
    "Regular exercise lowers the risk of heart disease.",
    "The doctor prescribed antibiotics for the ear infection.",
    "Drinking enough water helps prevent headaches.",
    "The vaccine trial reported strong protection against the virus.",
    "A balanced diet includes fruit, vegetables and whole grains.",
    "Poor sleep can weaken the immune system over time.",
    # travel
    "Our flight to Lisbon was delayed by three hours.",
    "The hotel room had a balcony overlooking the harbour.",
    "We took the night train across the border to Vienna.",
    "Remember to check the visa rules before booking the trip.",
    "The hiking trail follows the river up to a hidden lake.",
    "Renting a car is the easiest way to explore the island.",
    # astronomy
    "The telescope captured a faint galaxy billions of light years away.",
    "Jupiter is the largest planet in our solar system.",
    "A total solar eclipse will be visible from the south next year.",
    "The probe sent back images of ice on the surface of the moon.",
    "Astronomers detected a planet orbiting a nearby red dwarf.",
    "Meteor showers are best seen far from city lights.",
)


def weights_file_size(model: nn.Module) -> int:
    """Bytes of the safetensors file :func:`~monarch_matrices.convert.save_monarch` writes."""
    fd, name = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        save_model(model, name, metadata={"format": "pt"}, force_contiguous=True)
        return os.path.getsize(name)
    finally:
        os.remove(name)


def example_inputs(
    model: nn.Module, batch_size: int = 32, seq_len: int = 128, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random batch of the shape a transformers ``model`` takes (tokens or images)."""
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if name == "input_ids" and getattr(config, "vocab_size", None):
        limit = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        seq_len = min(seq_len, limit) if limit else seq_len
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=gen)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    if name == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        channels = getattr(config, "num_channels", 3)
        dtype = next(model.parameters()).dtype
        x = torch.randn(batch_size, channels, *size, generator=gen)
        return {"pixel_values": x.to(device=device, dtype=dtype)}
    raise ValueError(f"no example input for a {type(model).__name__} (main input {name!r})")


@dataclass(frozen=True)
class Latency:
    """Forward-pass times of the two models on one batch (milliseconds)."""

    dense_ms: tuple[float, ...]
    monarch_ms: tuple[float, ...]
    threads: int

    @property
    def dense_median_ms(self) -> float:
        return statistics.median(self.dense_ms)

    @property
    def monarch_median_ms(self) -> float:
        return statistics.median(self.monarch_ms)

    @property
    def speedup(self) -> float:
        """Dense median over Monarch median: above 1 means Monarch is faster."""
        return self.dense_median_ms / self.monarch_median_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_ms_median": self.dense_median_ms,
            "monarch_ms_median": self.monarch_median_ms,
            "speedup": self.speedup,
            "threads": self.threads,
            "dense_ms": list(self.dense_ms),
            "monarch_ms": list(self.monarch_ms),
        }


@torch.inference_mode()
def measure_latency(
    dense: nn.Module,
    monarch: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    repeats: int = 7,
    warmup: int = 1,
) -> Latency:
    """Time ``model(**inputs)`` for both models, alternating so drift hits both alike."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(warmup + repeats):
        for j, model in enumerate((dense, monarch) if i % 2 == 0 else (monarch, dense)):
            idx = j if i % 2 == 0 else 1 - j
            start = time.perf_counter()
            model(**inputs)
            elapsed = (time.perf_counter() - start) * 1e3
            if i >= warmup:
                times[idx].append(elapsed)
    return Latency(tuple(times[0]), tuple(times[1]), torch.get_num_threads())


def _last_hidden(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1]
    return hidden


def text_inputs(
    model: nn.Module, tokenizer: Any, sentences: Sequence[str] = SENTENCES
) -> dict[str, torch.Tensor]:
    """``sentences`` as one padded batch on ``model``'s device (real text, unlike
    :func:`example_inputs`: a model calibrated on text is judged on text)."""
    pads = getattr(tokenizer, "pad_token", None) is not None
    if len(sentences) > 1 and not pads:
        raise ValueError("the tokenizer has no pad token, so sentences cannot share a batch")
    batch = tokenizer(list(sentences), padding=pads, truncation=True, return_tensors="pt")
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def output_error(
    dense: nn.Module, monarch: nn.Module, inputs: Mapping[str, torch.Tensor]
) -> float:
    """``‖h_monarch − h_dense‖_F / ‖h_dense‖_F`` for the last hidden states on ``inputs``.

    Positions that ``inputs["attention_mask"]`` marks as padding are left out.
    """
    a = _last_hidden(dense, inputs).double()
    b = _last_hidden(monarch, inputs).double()
    mask = inputs.get("attention_mask")
    if mask is not None and a.dim() == 3 and mask.shape == a.shape[:2]:
        keep = mask.bool().unsqueeze(-1).to(a.device)
        a, b = a.masked_fill(~keep, 0.0), b.masked_fill(~keep, 0.0)
    return float((b - a).norm() / a.norm())


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 16
) -> torch.Tensor:
    """Mean-pooled last hidden states (over real tokens): ``(len(sentences), hidden)``.

    This is how sentence-transformers pools all-MiniLM-L6-v2.  A tokenizer
    without a pad token (GPT-2's) is fed one sentence at a time.
    """
    step = batch_size if getattr(tokenizer, "pad_token", None) is not None else 1
    pooled = []
    for i in range(0, len(sentences), step):
        batch = text_inputs(model, tokenizer, sentences[i : i + step])
        hidden = _last_hidden(model, batch).double()
        mask = batch["attention_mask"].unsqueeze(-1).double()
        pooled.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    return torch.cat(pooled)


@dataclass(frozen=True)
class Fidelity:
    """How well the Monarch model's sentence embeddings match the dense ones."""

    sentences: int
    cosine_mean: float  # cosine(dense, monarch) per sentence, averaged
    cosine_min: float
    nn_agreement: float  # fraction of sentences whose nearest other sentence is unchanged
    top3_overlap: float  # mean overlap of the three nearest other sentences

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def neighbour_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosines between the unit rows of ``embeddings``, each row's own entry set
    to -2 (below any cosine), so that a sentence is never its own neighbour."""
    eye = torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return (embeddings @ embeddings.T).masked_fill(eye, -2.0)


def sentence_fidelity(
    dense: nn.Module, monarch: nn.Module, tokenizer: Any, sentences: Sequence[str] = SENTENCES
) -> Fidelity:
    """Compare the two models' embeddings of ``sentences`` (see :class:`Fidelity`)."""
    if len(sentences) < 4:
        raise ValueError(f"need at least 4 sentences to compare neighbours, got {len(sentences)}")
    a = torch.nn.functional.normalize(sentence_embeddings(dense, tokenizer, sentences), dim=-1)
    b = torch.nn.functional.normalize(sentence_embeddings(monarch, tokenizer, sentences), dim=-1)
    cosine = (a * b).sum(-1)
    sim_a, sim_b = neighbour_similarities(a), neighbour_similarities(b)
    agree = (sim_a.argmax(1) == sim_b.argmax(1)).double().mean()
    top_a, top_b = sim_a.topk(3, dim=1).indices, sim_b.topk(3, dim=1).indices
    overlap = (top_a[:, :, None] == top_b[:, None, :]).any(-1).double().mean()
    return Fidelity(
        sentences=len(sentences),
        cosine_mean=float(cosine.mean()),
        cosine_min=float(cosine.min()),
        nn_agreement=float(agree),
        top3_overlap=float(overlap),
    )
