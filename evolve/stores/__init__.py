"""The data layer: ExperienceStore (DuckDB truth + FAISS/BM25 indexes), embedders, rerankers, LangGraph store."""

from evolve.stores.embedders import (
    Embedder,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    default_embedder,
    make_embedder,
)
from evolve.stores.experience import DEFAULT_NAMESPACE, ExperienceStore
from evolve.stores.hybrid import CrossEncoderReranker, EmbeddingReranker, HybridScorer, Reranker

__all__ = [
    "DEFAULT_NAMESPACE",
    "CrossEncoderReranker",
    "Embedder",
    "EmbeddingReranker",
    "ExperienceStore",
    "HashingEmbedder",
    "HybridScorer",
    "Reranker",
    "SentenceTransformerEmbedder",
    "default_embedder",
    "make_embedder",
]
