"""Tiny random models built from a config (no download), shared by the adapter tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 101


def tiny_bert(num_labels: int = 3, seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    """A 2-layer BERT classifier with random weights; model dropout off unless asked for."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertForSequenceClassification(config).eval()


def token_batch(batch: int = 3, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # some padding, so masking paths are exercised
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 2) -> None:
    """Give every adapter tensor non-trivial values (B starts at zero, which would hide errors)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if any(part in name for part in ("lora_A", "lora_B", "gate", "magnitude", "gate_logits")):
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1
            param.add_(noise)
