"""The Embedder protocol, checked against every implementation (real MiniLM from the PyPI package)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from evolve.errors import EmbedderError
from evolve.stores import embedders as emb
from evolve.stores.embedders import (
    Embedder,
    HashingEmbedder,
    SentenceTransformerEmbedder,
    default_embedder,
    default_model_path,
    make_embedder,
)

# One factory per implementation; a new Embedder class must be added here (a test checks that).
FACTORIES: dict[str, Callable[[], Embedder]] = {
    "SentenceTransformerEmbedder": default_embedder,  # MiniLM, loaded once per process
    "HashingEmbedder": lambda: HashingEmbedder(256),
}

TEXTS = [
    "You are in a kitchen. There is a closed fridge here.",
    "take the red key from the table",
    "open door",
    "Ünïcödé text with émojis 🙂 and numbers 12345",
    "word " * 3000,  # longer than any model's window: truncated, still a unit vector
]


@pytest.fixture(scope="module", params=sorted(FACTORIES))
def embedder(request: pytest.FixtureRequest) -> Embedder:
    return FACTORIES[request.param]()


def test_every_implementation_is_covered() -> None:
    classes = {
        name
        for name, obj in inspect.getmembers(emb, inspect.isclass)
        if obj.__module__ == emb.__name__ and obj is not Embedder and callable(getattr(obj, "embed", None))
    }
    assert classes == set(FACTORIES)


def test_conforms_to_the_protocol(embedder: Embedder) -> None:
    assert isinstance(embedder, Embedder)
    assert isinstance(embedder.name, str) and embedder.name
    assert isinstance(embedder.dim, int) and embedder.dim > 0
    assert str(embedder.dim) in embedder.name  # vectors of another dim are never mixed under one name


def test_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    v = embedder.embed(TEXTS)
    assert isinstance(v, np.ndarray)
    assert v.shape == (len(TEXTS), embedder.dim)
    assert v.dtype == np.float32
    assert v.flags.c_contiguous
    assert np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert len({row.tobytes() for row in v}) == len(TEXTS)  # different texts, different vectors


def test_deterministic_and_independent_of_batching(embedder: Embedder) -> None:
    a = embedder.embed(TEXTS)
    b = embedder.embed(TEXTS)
    np.testing.assert_array_equal(a, b)
    one_by_one = np.concatenate([embedder.embed([t]) for t in TEXTS])
    np.testing.assert_allclose(one_by_one, a, atol=1e-5)


def test_hashing_embedder_is_the_same_in_another_process() -> None:
    """Stored vectors stay valid across runs: nothing depends on Python's per-process hash seed."""
    code = (
        "import sys, numpy as np; from evolve.stores.embedders import HashingEmbedder; "
        "sys.stdout.write(HashingEmbedder(64).embed(sys.argv[1:]).tobytes().hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *TEXTS[:3]],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    theirs = np.frombuffer(bytes.fromhex(out), dtype=np.float32).reshape(3, 64)
    np.testing.assert_array_equal(theirs, HashingEmbedder(64).embed(TEXTS[:3]))


def test_empty_list(embedder: Embedder) -> None:
    v = embedder.embed([])
    assert v.shape == (0, embedder.dim) and v.dtype == np.float32


def test_text_without_tokens_is_finite(embedder: Embedder) -> None:
    v = embedder.embed(["", "   ", "!!!"])
    assert v.shape == (3, embedder.dim) and np.isfinite(v).all()
    assert (np.linalg.norm(v, axis=1) <= 1.0 + 1e-5).all()


def _cos(e: Embedder, a: str, b: str) -> float:
    va, vb = e.embed([a, b])
    return float(va @ vb)


def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence() -> None:
    e = default_embedder()
    anchor = "A man is playing a guitar on stage."
    para = "Someone performs music with a string instrument in front of an audience."
    unrelated = "The central bank raised interest rates by half a point."
    assert _cos(e, anchor, para) > _cos(e, anchor, unrelated) + 0.2
    # ...which a bag of hashed words cannot do: no word is shared.
    h = HashingEmbedder(256)
    assert _cos(h, anchor, para) < 0.3


def test_make_embedder_specs(tmp_path: Path) -> None:
    for spec in (None, "", "default", "minilm"):
        assert make_embedder(spec) is default_embedder()
    assert default_embedder().dim == 384 and default_embedder().name.startswith("st:")
    h = make_embedder("hash")
    assert isinstance(h, HashingEmbedder) and h.dim == 256 and h.name == "hash:256"
    assert make_embedder("hash:512").dim == 512
    by_path = make_embedder(default_model_path())
    assert isinstance(by_path, SentenceTransformerEmbedder) and by_path.name == default_embedder().name
    np.testing.assert_allclose(by_path.embed(TEXTS[:2]), default_embedder().embed(TEXTS[:2]), atol=1e-5)
    for bad in ("hash:abc", "hash:0", "hash:-3"):
        with pytest.raises(EmbedderError, match="hash") as e:
            make_embedder(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(EmbedderError, match="does not exist"):
        make_embedder(str(tmp_path / "nowhere"))
