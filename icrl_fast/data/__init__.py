"""Contexts as tokens: the context formats (episodes <-> tokens: ``paper`` and ``compact`` in ``formats``, the
one-token-per-step ``step``, ``step-noend`` and ``step-grid`` in ``step_format``) and the offline multi-episode slice
dataset (``dataset``; every mode reads its test maps from it)."""
