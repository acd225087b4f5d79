"""A token embedding that is the sum of its factors' embeddings (the step format's type, action and observation),
plus a learned projection of the same-state memory's features when the model has that head."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FactoredEmbedding(nn.Module):
    """``embed(id) = sum_f table_f[factors[id, f]]``: drop-in for a transformers model's ``embed_tokens``.

    ``factors``: int ``[V, F]``, each column's values in ``0 .. max``; every table is initialised ``N(0, std)``.
    ``memory_dim``: also add ``Linear(memory_dim, dim)`` of per-position features given to ``forward`` (the
    same-state memory, ``icrl_fast.model.same_state_memory``), initialised ``N(0, std)``."""

    def __init__(self, factors, dim: int, std: float = 0.02, dtype: torch.dtype = torch.float32,
                 memory_dim: int = 0):
        super().__init__()
        factors = np.asarray(factors)
        if factors.ndim != 2 or factors.size == 0 or factors.min() < 0:
            raise ValueError(f"token factors must be a non-negative int array [vocab, factors], got shape "
                             f"{factors.shape}")
        self.register_buffer("factors", torch.as_tensor(factors, dtype=torch.long), persistent=False)
        self.tables = nn.ModuleList(nn.Embedding(int(n) + 1, dim, dtype=dtype) for n in factors.max(0))
        for table in self.tables:
            nn.init.normal_(table.weight, std=std)
        self.memory = nn.Linear(memory_dim, dim, bias=False, dtype=dtype) if memory_dim else None
        if self.memory is not None:
            nn.init.normal_(self.memory.weight, std=std)

    @property
    def num_embeddings(self) -> int:
        return int(self.factors.shape[0])

    def forward(self, input_ids: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., dim]`` embeddings of ``input_ids`` ``[...]``; ``memory`` ``[..., memory_dim]``: required when the
        module has a memory projection, refused when it has none."""
        if (memory is None) != (self.memory is None):
            raise ValueError("this embedding " + ("adds same-state memory features: pass memory=[..., "
                             f"{self.memory.in_features}]" if self.memory is not None else "has no memory projection"))
        f = self.factors[input_ids]
        out = self.tables[0](f[..., 0])
        for i in range(1, len(self.tables)):
            out = out + self.tables[i](f[..., i])
        if memory is not None:
            out = out + self.memory(memory.to(out.dtype))
        return out
