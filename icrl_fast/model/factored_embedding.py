"""A token embedding that is the sum of its factors' embeddings (the step format's type, action and observation)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FactoredEmbedding(nn.Module):
    """``embed(id) = sum_f table_f[factors[id, f]]``: drop-in for a transformers model's ``embed_tokens``.

    ``factors``: int ``[V, F]``, each column's values in ``0 .. max``; every table is initialised ``N(0, std)``."""

    def __init__(self, factors, dim: int, std: float = 0.02, dtype: torch.dtype = torch.float32):
        super().__init__()
        factors = np.asarray(factors)
        if factors.ndim != 2 or factors.size == 0 or factors.min() < 0:
            raise ValueError(f"token factors must be a non-negative int array [vocab, factors], got shape "
                             f"{factors.shape}")
        self.register_buffer("factors", torch.as_tensor(factors, dtype=torch.long), persistent=False)
        self.tables = nn.ModuleList(nn.Embedding(int(n) + 1, dim, dtype=dtype) for n in factors.max(0))
        for table in self.tables:
            nn.init.normal_(table.weight, std=std)

    @property
    def num_embeddings(self) -> int:
        return int(self.factors.shape[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        f = self.factors[input_ids]
        out = self.tables[0](f[..., 0])
        for i in range(1, len(self.tables)):
            out = out + self.tables[i](f[..., i])
        return out
