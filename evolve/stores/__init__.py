"""The data layer: ExperienceStore (DuckDB truth + FAISS/BM25 indexes), embedders, LangGraph store."""

from evolve.stores.embedders import (
    Embedder,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    default_embedder,
    make_embedder,
)
from evolve.stores.experience import DEFAULT_NAMESPACE, ExperienceStore

__all__ = [
    "DEFAULT_NAMESPACE",
    "Embedder",
    "ExperienceStore",
    "HashingEmbedder",
    "SentenceTransformerEmbedder",
    "default_embedder",
    "make_embedder",
]
