"""Tiny transformers models, one per architecture family, built offline from configs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may reach a hub
transformers = pytest.importorskip("transformers")  # test modules import this one first

WIDTH, FFN, VOCAB = 64, 256, 100


@dataclass(frozen=True)
class Family:
    """A tiny model of one family, its inputs, and the layer suffixes of one block."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    block: str  # prefix of block i, with {i}
    mlp: tuple[str, ...]
    qkv: tuple[str, ...]
    attention_output: tuple[str, ...]
    extra: tuple[str, ...] = ()  # other dense layers "all" converts
    head: str | None = None  # the output layer "all" leaves dense


def _tokens(batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    return {"input_ids": torch.randint(3, VOCAB, (batch, 7), generator=gen)}


def _images(batch: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=FFN, max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=2, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=FFN,
        image_size=32, patch_size=8, num_labels=10,
    )
    return transformers.ViTForImageClassification(config).eval()


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(config).eval()


FAMILIES = {
    "bert": Family(
        "bert", _bert, _tokens, "encoder.layer.{i}.",
        mlp=("intermediate.dense", "output.dense"),
        qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
        attention_output=("attention.output.dense",),
        extra=("pooler.dense",),
    ),
    "gpt2": Family(
        "gpt2", _gpt2, _tokens, "transformer.h.{i}.",
        mlp=("mlp.c_fc", "mlp.c_proj"), qkv=("attn.c_attn",), attention_output=("attn.c_proj",),
        head="lm_head",
    ),
    "vit": Family(
        "vit", _vit, _images, "vit.layers.{i}.",
        mlp=("mlp.fc1", "mlp.fc2"),
        qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        attention_output=("attention.o_proj",),
        head="classifier",
    ),
    "llama": Family(
        "llama", _llama, _tokens, "model.layers.{i}.",
        mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
        qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attention_output=("self_attn.o_proj",),
        head="lm_head",
    ),
}


def names(family: Family, *groups: str) -> set[str]:
    """Full names of the layers of ``groups`` in both blocks (``extra`` for "extra")."""
    out = set()
    for group in groups:
        suffixes = getattr(family, group)
        if group == "extra":
            out |= set(suffixes)
            continue
        out |= {family.block.format(i=i) + s for i in range(2) for s in suffixes}
    return out


def output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
