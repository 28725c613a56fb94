"""LoRA (Hu et al., 2021) for ``nn.Linear`` and ``nn.Embedding``.

Linear:     y = W x + b + s * B (A dropout(x)),        A: (r, in),  B: (out, r)
Embedding:  y = E[x] + s * (A.T[x]) B.T,               A: (r, num_embeddings), B: (dim, r)

s = lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA). Merging adds s * B A to the frozen weight
(s * (B A).T for the embedding table), unmerging subtracts it again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, LowRankLinear, low_rank_linear


class LoraLinear(LowRankLinear):
    """y = W x + b + s * B A dropout(x)."""

    adapter_name = "lora"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        x_d = self.dropout_input(x)
        if self.use_fused(x):
            return low_rank_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling, x_branch=x_d)
        # the plain composition: scale the r-wide intermediate, not the out-wide result
        hidden = F.linear(x_d, self.lora_A) * self.scaling
        return self.base_layer(x) + F.linear(hidden, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling



class LoraEmbedding(AdapterLayer):
    """E'[x] = E[x] + s * A.T[x] B.T, with A (r, num_embeddings) used as a lookup table.

    Initialisation follows PEFT for embeddings (A zeros, B normal): the start is still a no-op, and
    the gradient reaches A through a B of unit scale instead of vanishing through a tiny A.
    """

    adapter_name = "lora"
    peft_use_dora = None  # PEFT keeps embeddings plain LoRA next to DoRA linears

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise ValueError(f"LoraEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        if lora_dropout > 0:
            raise ValueError("lora_dropout is not supported for embedding adapters (inputs are token ids)")
        super().__init__(base_layer, r, lora_alpha, 0.0, use_rslora)
        self.num_embeddings = base_layer.num_embeddings
        self.embedding_dim = base_layer.embedding_dim
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.zeros(r, self.num_embeddings, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.embedding_dim, r, **factory))
        nn.init.normal_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        emb = self.base_layer
        after_a = F.embedding(
            x, self.lora_A.T, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse
        )
        return result + F.linear(after_a * self.scaling, self.lora_B)

    def peft_tensors(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.r, {"lora_embedding_A": self.lora_A.detach(), "lora_embedding_B": self.lora_B.detach()}

    def delta_weight(self) -> torch.Tensor:
        """The (num_embeddings, dim) update to the embedding table."""
        return (self.lora_B @ self.lora_A).T * self.scaling
