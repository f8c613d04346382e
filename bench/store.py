"""ExperienceStore benchmark: ingest, LangGraph small operations, dense and namespace-filtered search.

    python bench/store.py                      # every section (1M vectors: ~10 GB RAM, tens of minutes)
    python bench/store.py --quick              # 10k vectors, small ingest: a smoke run (~1 min)
    python bench/store.py --only ingest,small --baseline /tmp/evolve-before   # issue 17's rows
    python bench/store.py --only filtered --filtered-sizes 100000:2+10,1000000:10   # target 3

Sections (``--only``, comma-separated; default all)
--------
ingest     TextWorld-like trajectories (10-40 steps, ~300-char observations, 10-30 admissible
           actions, a diagnosis on some steps) written with ``add_trajectories`` in batches, vs
           naive writers of the same trajectories: one ``add_trajectories`` call (transaction) per
           trajectory, and row-by-row ``executemany`` INSERTs of the same rows (same serialisation).
           With ``--baseline DIR`` (a directory holding an older ``evolve`` package, e.g.
           ``git archive <commit> evolve | tar -x -C DIR``) the batched row is measured for both
           codes, alternated ``--ingest-rounds`` times, each run in a fresh process: on a shared
           machine only side-by-side figures compare. The final CHECKPOINT is part of the cost.
small      LangGraph ``BaseStore`` small operations, ``EvolveStore`` beside LangGraph's ``SqliteStore``
           (with sqlite-vec), interleaved round by round, the same embed function for both (384-d
           feature hashing): open a store on a new file, put one item, get it, search for it, close;
           the same on reopening a file that holds it; and single ops on an open store of 1,000
           items. ``duckdb.connect`` / ``sqlite3.connect`` alone are timed too. With ``--baseline``
           the older EvolveStore runs in the same rounds (in a subprocess per round).
           Needs ``pip install -e .[bench]`` (langgraph-checkpoint-sqlite, sqlite-vec, pysqlite3).
dense      384-d embedding-like vectors (a two-level mixture of Gaussians, see ``Mixture``; ``--hard``
           for isotropic clusters), L2-normalised, stored with ``store.add_vectors``; index build
           time; top-10 latency p50/p99 through ``store.search_vector`` (the store's public path:
           freshness check, namespace filter, hit metadata) and recall@10 against brute force.
filtered   The same kind of vectors (random, not embedded text) spread evenly over 2 / 10 / 100
           namespaces (``--namespaces``); top-10 within one namespace through ``search_vector``:
           p50, p95, recall@10 against brute force restricted to that namespace. Each size runs
           with evolve's index (an own FAISS index per namespace of >= ``PARTITION_MIN`` vectors)
           and, at sizes up to ``--shared-max``, with one shared index searched through a FAISS
           ``IDSelector`` (the layout before, ``partition_min`` set past the size).
langgraph  LangGraph ``InMemoryStore`` holding the same 100k vectors (its embed function is a dict
           lookup of the precomputed vectors, so only search is timed) vs ``search_vector``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402

from evolve.schema import (  # noqa: E402
    Action,
    CauseEvidence,
    Diagnosis,
    EnvState,
    FailureCause,
    Observation,
    Outcome,
    StateDiff,
    Step,
    Timings,
    TokenUsage,
    Trajectory,
)
from evolve.stores import ExperienceStore, HashingEmbedder  # noqa: E402
from evolve.stores import vector_index as vi  # noqa: E402

DIM = 384
ROOMS = [
    "kitchen",
    "pantry",
    "living room",
    "bedroom",
    "bathroom",
    "garden",
    "shed",
    "corridor",
    "cellar",
    "attic",
]
THINGS = [
    "apple", "knife", "red key", "blue key", "carrot", "cookbook", "lamp", "wooden chest", "fridge", "oven",
    "table", "counter", "sofa", "bed", "toolbox", "shovel", "bucket", "towel", "bar of soap", "mirror",
    "potato", "onion", "stove", "shelf", "rusty lock", "glass jar", "parcel", "map",
]  # fmt: skip
VERBS = ["take", "drop", "open", "close", "examine", "eat", "slice", "cook", "put", "unlock"]


# --------------------------------------------------------------------------- synthetic episodes


def _observation(
    rng: np.random.Generator, room: str, inv: list[str], score: float, moves: int
) -> Observation:
    vis = [str(x) for x in rng.choice(THINGS, size=6, replace=False)]
    exit_dir = str(rng.choice(["north", "south", "east", "west"]))
    text = (
        f"-= {room.title()} =-\nYou are in a {room}. An ordinary kind of place, with the usual furniture and a "
        f"faint smell of dust. You can see a {vis[0]}, a {vis[1]} and a {vis[2]} here. On the {vis[3]} you "
        f"make out a {vis[4]}. There is an exit to the {exit_dir} leading to the {rng.choice(ROOMS)}. "
        f"You are carrying: {', '.join(inv) or 'nothing'}."
    )
    n_adm = int(rng.integers(10, 31))
    adm = [f"{v} {t}" for v in VERBS for t in vis]
    adm = [str(a) for a in rng.choice(adm, size=n_adm - 3, replace=False)] + [
        "look",
        "inventory",
        f"go {exit_dir}",
    ]
    facts = [f"at(P, {room})"] + [f"in({t}, {room})" for t in vis[:4]] + [f"in({t}, I)" for t in inv]
    return Observation(
        text=text,
        goal="Cook the carrot with the stove, then eat it.",
        state=EnvState(
            location=room,
            inventory=list(inv),
            visible=vis,
            score=score,
            max_score=5,
            moves=moves,
            facts=facts,
        ),
        admissible_actions=adm,
        reward=0.0,
    )


def textworld_trajectories(n: int, seed: int = 0, namespace: str = "default") -> list[Trajectory]:
    """``n`` episodes of 10-40 steps, chained the way the recorder writes them (pre = previous post)."""
    rng = np.random.default_rng(seed)
    out = []
    for e in range(n):
        room, inv, score = str(rng.choice(ROOMS)), [], 0.0
        obs = _observation(rng, room, inv, score, 0)
        steps = []
        for i in range(int(rng.integers(10, 41))):
            act = str(rng.choice(obs.admissible_actions))
            if act.startswith("take") and len(inv) < 4:
                inv = [*inv, act[5:]]
            if act.startswith("go"):
                room = str(rng.choice(ROOMS))
            reward = float(rng.random() < 0.08)
            score += reward
            post = _observation(rng, room, inv, score, i + 1)
            diag = None
            if rng.random() < 0.3:
                diag = Diagnosis(
                    step_index=i,
                    diff=StateDiff(location_from=obs.state.location, location_to=room),
                    causes=[CauseEvidence(cause=FailureCause.no_effect, evidence=f"'{act}' changed nothing")],
                    steps_since_progress=int(rng.integers(0, 6)),
                    stagnating=bool(rng.random() < 0.2),
                )
            steps.append(
                Step(
                    index=i,
                    pre_state=obs,
                    action=Action(text=act, thought="The carrot must be somewhere; keep looking."),
                    post_state=post,
                    reward=reward,
                    done=False,
                    diagnosis=diag,
                    timings=Timings(policy_s=0.8, env_s=0.012, total_s=0.812),
                    usage=TokenUsage(prompt_tokens=900, completion_tokens=12),
                )
            )
            obs = post
        out.append(
            Trajectory(
                id=f"traj-{seed}-{e}",
                namespace=namespace,
                task_id=f"tw-cooking-{e % 50}",
                env="textworld",
                goal="Cook the carrot with the stove, then eat it.",
                policy="gpt-4o-mini",
                outcome=Outcome.success if score >= 1 else Outcome.failure,
                score=score,
                max_score=5,
                steps=steps,
                seed=e,
            )
        )
    return out


def _fresh(workdir: Path, name: str) -> ExperienceStore:
    p = workdir / f"{name}.duckdb"
    for f in (p, Path(str(p) + ".wal")):
        f.unlink(missing_ok=True)
    return ExperienceStore(p, embedder=HashingEmbedder(64))


def ingest_batched_once(workdir: Path, n_traj: int, batch: int) -> dict[str, float]:
    """One batched ingest in this process: steps, wall and CPU seconds (all threads), file MiB."""
    trajs = textworld_trajectories(n_traj)
    n_steps = sum(len(t.steps) for t in trajs)
    w = _fresh(workdir, "warm-up")  # first calls import lazily loaded modules: not part of the rate
    w.add_trajectories(textworld_trajectories(5, seed=1))
    w.close()
    s = _fresh(workdir, "ingest-batched")
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(trajs), batch):
        s.add_trajectories(trajs[i : i + batch])
    s.conn.execute("CHECKPOINT")  # what is left in the WAL is part of the cost
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert s.count_trajectories() == n_traj
    s.close()
    size = (workdir / "ingest-batched.duckdb").stat().st_size / 2**20
    return {"steps": n_steps, "wall": dt, "cpu": cpu, "mib": size}


def _in_subprocess(code_dir: Path, args: list[str], workdir: Path) -> dict[str, Any]:
    """This script in a fresh process with the ``evolve`` package found in ``code_dir`` first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code_dir), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args, "--workdir", str(workdir)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_ingest(
    workdir: Path,
    n_traj: int,
    batch: int,
    n_naive: int,
    n_rows: int,
    rounds: int = 3,
    baseline: Path | None = None,
) -> list[list[object]]:
    rows: list[list[object]] = []
    label = f"add_trajectories, {batch} episodes per call"
    # Both codes in fresh processes, alternated: a shared machine's load moves between runs.
    sides = {"now": Path(__file__).resolve().parents[1]}
    if baseline is not None:
        sides = {"before (--baseline)": baseline, **sides}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    args = ["--ingest-json", "--episodes", str(n_traj), "--batch", str(batch)]
    for _ in range(rounds):
        for name, code in sides.items():
            runs[name].append(_in_subprocess(code, args, workdir / "sub"))
            print(f"  ingest {name}: {runs[name][-1]}", flush=True)
    ref = None
    for name, rs in runs.items():
        wall = float(np.median([r["wall"] for r in rs]))
        n_steps = rs[0]["steps"]
        rate = n_steps / wall
        ref = rate if ref is None else ref
        cpu_us = float(np.median([r["cpu"] for r in rs])) / n_steps * 1e6
        each = " / ".join(f"{r['steps'] / r['wall']:,.0f}" for r in rs)
        rows.append([f"{label}, {name}", n_steps, wall, rate, each, cpu_us, rate / ref, rs[-1]["mib"]])

    trajs = textworld_trajectories(n_traj)
    sub = trajs[:n_naive]
    n_sub = sum(len(t.steps) for t in sub)
    s = _fresh(workdir, "ingest-per-call")
    t0 = time.perf_counter()
    for t in sub:
        s.add_trajectories([t])
    s.conn.execute("CHECKPOINT")
    dt = time.perf_counter() - t0
    s.close()
    rows.append(["add_trajectories, 1 episode per call", n_sub, dt, n_sub / dt, None, None, None, None])

    # Row by row: the same serialisation, then one parameterised INSERT per row (executemany).
    s = _fresh(workdir, "ingest-executemany")
    sub, have = [], 0
    for t in trajs:
        if have >= n_rows:
            break
        sub.append(t)
        have += len(t.steps)
    t0 = time.perf_counter()
    with s.transaction():
        for t in sub:
            s.conn.execute(
                "INSERT INTO trajectories VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [t.id, t.namespace, t.run_id, t.task_id, t.env, t.split.value, t.policy, t.arm,
                 t.outcome.value, t.score, t.max_score, len(t.steps), t.seed, t.created_at, t.goal,
                 t.model_dump_json(exclude={"steps"})],
            )  # fmt: skip
            s.conn.executemany(
                "INSERT INTO steps VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    [t.id, st.index, t.namespace, st.action.text, st.post_state.text, st.reward, st.done,
                     st.diagnosis.cause_names() if st.diagnosis else [], j > 0,
                     st.model_dump_json(exclude={"pre_state"} if j else None)]
                    for j, st in enumerate(t.steps)
                ],
            )  # fmt: skip
    s.conn.execute("CHECKPOINT")
    dt = time.perf_counter() - t0
    s.close()
    rows.append(["row-by-row INSERT (duckdb executemany)", have, dt, have / dt, None, None, None, None])
    return rows


# --------------------------------------------------------------------------- vectors


class Mixture:
    """Embedding-like vectors: a two-level mixture of Gaussians, L2-normalised, float32.

    ``topics`` broad clusters, each holding sub-clusters of ~``per_sub`` points (paraphrases,
    near-duplicates): a point's nearest neighbours are its sub-cluster (cosine ~0.8-0.9), then its
    topic (~0.45), then everything else (~0). With ``hard=True`` there are no sub-clusters: 1000
    isotropic clusters in which all of a cluster's points are nearly equidistant, a worst case for
    graph indexes that real text embeddings (low intrinsic dimension) do not look like.
    """

    def __init__(self, n: int, seed: int = 0, topics: int = 1000, per_sub: int = 10, hard: bool = False):
        rng = np.random.default_rng(seed)
        self.hard = hard
        topic = rng.standard_normal((topics, DIM), dtype=np.float32)
        if hard:
            self.centers = topic / np.linalg.norm(topic, axis=1, keepdims=True)
            self.spread = 0.6
        else:
            topic /= np.sqrt(DIM)
            n_sub = max(1, n // per_sub)
            self.centers = topic[rng.integers(0, topics, n_sub)]
            self.centers += 0.6 * rng.standard_normal((n_sub, DIM), dtype=np.float32) / np.sqrt(DIM)
            self.spread = 0.4

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, DIM), dtype=np.float32)
        for a in range(0, n, 100_000):
            m = min(100_000, n - a)
            x = self.centers[rng.integers(0, len(self.centers), m)]
            x += self.spread * rng.standard_normal((m, DIM), dtype=np.float32) / np.sqrt(DIM)
            out[a : a + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Row indices of the exact top-k inner products (brute force, in blocks)."""
    out = np.empty((len(q), k), dtype=np.int64)
    for a in range(0, len(q), 64):
        s = q[a : a + 64] @ x.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1)
        out[a : a + 64] = np.take_along_axis(part, order, axis=1)
    return out


def timed(fn: Callable[[int], list[str]], n: int) -> tuple[np.ndarray, list[list[str]]]:
    """Latencies in ms of ``fn(i)`` for i < n (after a short warm-up), and what it returned."""
    for i in range(min(5, n)):
        fn(i)
    lat, res = [], []
    for i in range(n):
        t0 = time.perf_counter()
        r = fn(i)
        lat.append(time.perf_counter() - t0)
        res.append(r)
    return np.array(lat) * 1e3, res


def recall(got: list[list[str]], truth: list[set[str]]) -> float:
    return float(np.mean([len(set(g) & t) / len(t) for g, t in zip(got, truth)]))


def load_store(
    path: Path, ids: list[str], namespaces: list[str], x: np.ndarray
) -> tuple[ExperienceStore, float]:
    for f in (path, Path(str(path) + ".wal")):
        f.unlink(missing_ok=True)
    shutil.rmtree(str(path) + ".index", ignore_errors=True)
    s = ExperienceStore(path, embedder=HashingEmbedder(DIM))
    t0 = time.perf_counter()
    for a in range(0, len(ids), 100_000):
        b = a + 100_000
        s.add_vectors("bench", list(zip(ids[a:b], namespaces[a:b], ids[a:b])), x[a:b], model="synthetic")
    return s, time.perf_counter() - t0


def build_index(s: ExperienceStore, rebuild: bool = False) -> tuple[float, float, str]:
    """(seconds end to end, seconds inside FAISS, index kind) for the first search-ready index."""
    faiss_s = []
    real = vi.VectorIndex.build

    def spy(self: vi.VectorIndex, vids: np.ndarray, vecs: np.ndarray, namespaces: Any) -> None:
        t0 = time.perf_counter()
        real(self, vids, vecs, namespaces)
        faiss_s.append(time.perf_counter() - t0)

    vi.VectorIndex.build = spy  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        idx = s.vector_index("bench", rebuild=rebuild)
        total = time.perf_counter() - t0
    finally:
        vi.VectorIndex.build = real  # type: ignore[method-assign]
    return total, sum(faiss_s), idx.kind


def bench_dense(workdir: Path, sizes: list[int], n_queries: int, hard: bool) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in sizes:
        mix = Mixture(n, hard=hard)
        x, queries = mix.sample(n, 1), mix.sample(n_queries, 2)
        ids = [f"v{i}" for i in range(n)]
        s, t_insert = load_store(workdir / f"dense-{n}.duckdb", ids, ["default"] * n, x)
        t_build, t_faiss, kind = build_index(s)
        truth = [{ids[j] for j in row} for row in exact_topk(x, queries, 10)]
        lat, got = timed(
            lambda i, s=s, q=queries: [h.id for h in s.search_vector(q[i], "bench", k=10)], n_queries
        )
        rows.append(
            [f"{n:,}", kind, n / t_insert, t_faiss, t_build, np.percentile(lat, 50), np.percentile(lat, 99),
             recall(got, truth)]
        )  # fmt: skip
        print(f"  dense {n:,}: {rows[-1]}", flush=True)
        s.close()
        del x, s, ids, truth
        gc.collect()
    return rows


def bench_filtered(
    workdir: Path,
    sizes: list[tuple[int, list[int]]],
    n_queries: int,
    hard: bool,
    shared_max: int,
) -> list[list[object]]:
    """Top-10 within one namespace: evolve's per-namespace indexes, and one shared index + IDSelector.

    ``sizes``: ``(vectors, namespace counts)`` pairs; the vectors are split evenly over each count."""
    rows: list[list[object]] = []
    for n, ns_counts in sizes:
        mix = Mixture(n, seed=7, hard=hard)
        x, queries = mix.sample(n, 1), mix.sample(n_queries, 2)
        ids = [f"v{i}" for i in range(n)]
        for n_ns in ns_counts:
            namespaces = [f"tenant-{i % n_ns}" for i in range(n)]
            mine = np.arange(0, n, n_ns)  # tenant-0's rows
            truth = [{ids[mine[j]] for j in row} for row in exact_topk(x[mine], queries, 10)]
            s, _ = load_store(workdir / f"filtered-{n}-{n_ns}.duckdb", ids, namespaces, x)
            layouts = [("per-namespace (evolve)", vi.PARTITION_MIN)]
            if n <= shared_max:
                layouts.append(("one shared index, id filter", n + 1))
            for layout, partition_min in layouts:
                s.partition_min = partition_min
                t_build, _, _ = build_index(s, rebuild=True)
                idx = s.vector_index("bench")
                lat, got = timed(
                    lambda i, s=s, q=queries: [
                        h.id for h in s.search_vector(q[i], "bench", k=10, namespace="tenant-0")
                    ],
                    n_queries,
                )
                rows.append(
                    [f"{n:,}", f"1 of {n_ns} ({len(mine):,})", layout, idx.describe(), t_build,
                     np.percentile(lat, 50), np.percentile(lat, 95), recall(got, truth)]
                )  # fmt: skip
                print(f"  filtered: {rows[-1]}", flush=True)
            s.close()
            shutil.rmtree(str(workdir / f"filtered-{n}-{n_ns}.duckdb") + ".index", ignore_errors=True)
            (workdir / f"filtered-{n}-{n_ns}.duckdb").unlink(missing_ok=True)
            gc.collect()
        del x, queries, ids, mix
        gc.collect()
    return rows


def bench_langgraph(
    workdir: Path, n: int, n_queries: int, n_lg_queries: int, hard: bool
) -> list[list[object]]:
    mix = Mixture(n, seed=7, hard=hard)
    x, queries = mix.sample(n, 1), mix.sample(n_queries, 2)
    ids = [f"v{i}" for i in range(n)]
    lg_rows: list[list[object]] = []
    from langgraph.store.memory import InMemoryStore

    s, _ = load_store(workdir / "langgraph-ours.duckdb", ids, ["default"] * n, x)
    build_index(s)
    qtexts = [f"query {i}" for i in range(len(queries))]
    lookup = {t: x[i] for i, t in enumerate(ids)} | {t: queries[i] for i, t in enumerate(qtexts)}

    def embed(texts: list[str]) -> list[np.ndarray]:
        return [lookup[t] for t in texts]  # precomputed: only search is timed

    lg = InMemoryStore(index={"dims": DIM, "embed": embed, "fields": ["text"]})
    t0 = time.perf_counter()
    for a in range(0, n, 10_000):
        lg.batch(_puts(ids[a : a + 10_000]))
    t_put = time.perf_counter() - t0
    truth = [{ids[j] for j in row} for row in exact_topk(x, queries[:n_lg_queries], 10)]
    lat_lg, got_lg = timed(
        lambda i: [it.key for it in lg.search(("docs",), query=qtexts[i], limit=10)], n_lg_queries
    )
    lat_us, got_us = timed(lambda i: [h.id for h in s.search_vector(queries[i], "bench", k=10)], n_lg_queries)
    lg_rows.append(["LangGraph InMemoryStore (exact, numpy)", f"{n:,}", n / t_put, np.percentile(lat_lg, 50),
                    np.percentile(lat_lg, 99), recall(got_lg, truth), 1.0])  # fmt: skip
    lg_rows.append(["ExperienceStore.search_vector", f"{n:,}", None, np.percentile(lat_us, 50),
                    np.percentile(lat_us, 99), recall(got_us, truth),
                    float(np.percentile(lat_lg, 50) / np.percentile(lat_us, 50))])  # fmt: skip
    s.close()
    return lg_rows


def _puts(keys: list[str]) -> list[object]:
    from langgraph.store.base import PutOp

    return [PutOp(("docs",), k, {"text": k}) for k in keys]


# --------------------------------------------------------------------------- small operations


def _sqlite_module() -> Any:
    """An sqlite3 module that can load sqlite-vec (the stdlib one of some builds cannot)."""
    try:
        import pysqlite3.dbapi2 as sqlite  # type: ignore[import-not-found]
    except ImportError:
        import sqlite3 as sqlite
    return sqlite


def _small_stores(
    embed: Callable[[list[str]], list[list[float]]], dims: int
) -> dict[str, Callable[[Path], Any]]:
    """``name -> open(path) -> (store, close)`` for the stores compared."""
    from langgraph.store.sqlite import SqliteStore

    from evolve.stores.langgraph_store import EvolveStore

    index = {"dims": dims, "embed": embed, "fields": ["text"]}
    sqlite = _sqlite_module()

    def open_sqlite(path: Path) -> tuple[Any, Callable[[], None]]:
        # What SqliteStore.from_conn_string does, with a connection that can load sqlite-vec.
        conn = sqlite.connect(str(path), check_same_thread=False, isolation_level=None)
        st = SqliteStore(conn, index=index)  # type: ignore[arg-type]
        st.setup()
        return st, conn.close

    def open_evolve(path: Path) -> tuple[Any, Callable[[], None]]:
        st = EvolveStore(path=path, index=index)  # type: ignore[arg-type]
        return st, st.close

    return {"SqliteStore": open_sqlite, "EvolveStore": open_evolve}


_OPS = ("open", "put", "get", "search", "close")


def _embed_fn() -> Callable[[list[str]], list[list[float]]]:
    emb = HashingEmbedder(DIM)

    def embed(texts: list[str]) -> list[list[float]]:
        return emb.embed(list(texts)).tolist()

    return embed


def _timed_round(open_store: Any, path: Path) -> dict[str, float]:
    """ms of each of open / put / get / search / close of one item; ``open_store(path)`` gives
    (store, close)."""
    t0 = time.perf_counter()
    st, close = open_store(path)
    t1 = time.perf_counter()
    st.put(("users", "u1"), "pref", {"text": "likes green tea in the morning"})
    t2 = time.perf_counter()
    got = st.get(("users", "u1"), "pref")
    t3 = time.perf_counter()
    hits = st.search(("users",), query="green tea", limit=10)
    t4 = time.perf_counter()
    close()
    t5 = time.perf_counter()
    assert got is not None and hits and hits[0].key == "pref", hits
    return {op: dt * 1e3 for op, dt in zip(_OPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4))}


def small_round_json(workdir: Path) -> dict[str, dict[str, float]]:
    """One warm-up, one new-file and one reopen round of EvolveStore alone (``--small-json``)."""
    from evolve.stores.langgraph_store import EvolveStore

    index = {"dims": DIM, "embed": _embed_fn(), "fields": ["text"]}

    def open_store(path: Path) -> tuple[Any, Any]:
        st = EvolveStore(path=path, index=index)  # type: ignore[arg-type]
        return st, st.close

    out: dict[str, dict[str, float]] = {}
    for mode in ("warm-up", "new file", "reopen"):
        out[mode] = _timed_round(open_store, workdir / ("small-warm.db" if mode == "warm-up" else "small.db"))
    return out


def bench_small_ops(
    workdir: Path, rounds: int, n_items: int = 1000, n_ops: int = 100, baseline: Path | None = None
) -> list[list[object]]:
    """Medians in ms of open / put / get / search / close, the stores interleaved round by round."""
    import duckdb

    embed = _embed_fn()
    stores = _small_stores(embed, DIM)
    ops = _OPS
    times: dict[tuple[str, str], dict[str, list[float]]] = {}

    def one_round(name: str, mode: str, path: Path) -> None:
        t = times.setdefault((name, mode), {op: [] for op in ops})
        for op, ms in _timed_round(stores[name], path).items():
            t[op].append(ms)

    for name in stores:  # warm-up: imports, sqlite-vec loading, first DuckDB instance
        one_round(name, "warm-up", workdir / f"small-warm-{name}.db")
    floor: dict[str, list[float]] = {"duckdb.connect + close": [], "sqlite3.connect + close": []}
    sqlite = _sqlite_module()
    for r in range(rounds):
        for name in stores:
            one_round(name, "new file", workdir / f"small-{r}-{name}.db")
        for name in stores:
            one_round(name, "reopen", workdir / f"small-{r}-{name}.db")
        if baseline is not None:  # the older EvolveStore, in a process of its own, in the same round
            sub = workdir / f"before-{r}"
            for mode, got in _in_subprocess(baseline, ["--small-json"], sub).items():
                if mode != "warm-up":
                    t = times.setdefault(("EvolveStore before", mode), {op: [] for op in ops})
                    for op, v in got.items():
                        t[op].append(v)
        t0 = time.perf_counter()
        duckdb.connect(str(workdir / f"floor-{r}.duckdb")).close()
        floor["duckdb.connect + close"].append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        sqlite.connect(str(workdir / f"floor-{r}.sqlite")).close()
        floor["sqlite3.connect + close"].append((time.perf_counter() - t0) * 1e3)

    rows: list[list[object]] = []
    names = [*stores, *(["EvolveStore before"] if baseline is not None else [])]
    for mode in ("new file", "reopen"):
        base = None
        for name in names:
            med = {op: float(np.median(v)) for op, v in times[(name, mode)].items()}
            four = med["open"] + med["put"] + med["get"] + med["search"]
            base = four if base is None else base
            rows.append([f"{name}, {mode}", *(med[op] for op in ops), four, four / base])
    for what, v in floor.items():
        rows.append([what, float(np.median(v)), None, None, None, None, None, None])

    # Single operations on an open store that holds n_items.
    for name in stores:
        st, close = stores[name](workdir / f"steady-{name}.db")
        from langgraph.store.base import PutOp

        st.batch(
            [
                PutOp(("users", f"u{i % 10}"), f"k{i}", {"text": f"memory number {i} about tea"})
                for i in range(n_items)
            ]
        )
        lat: dict[str, list[float]] = {"put": [], "get": [], "search": []}
        for i in range(n_ops):
            t0 = time.perf_counter()
            st.put(("users", "u1"), f"new{i}", {"text": f"a new memory {i}"})
            t1 = time.perf_counter()
            st.get(("users", "u1"), f"k{i}")
            t2 = time.perf_counter()
            st.search(("users", "u1"), query="tea", limit=10)
            t3 = time.perf_counter()
            for op, dt in zip(lat, (t1 - t0, t2 - t1, t3 - t2)):
                lat[op].append(dt * 1e3)
        close()
        rows.append(
            [
                f"{name}, open, {n_items:,} items",
                None,
                *(float(np.median(v)) for v in lat.values()),
                None,
                None,
                None,
            ]
        )
    return rows


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.python_version()}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in load)}"
    )


def _size_spec(spec: str, default: list[int]) -> tuple[int, list[int]]:
    """``100000`` or ``100000:2+10`` -> ``(100000, [2, 10])``."""
    size, _, counts = spec.partition(":")
    return int(size), [int(c) for c in counts.split("+")] if counts else default


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", default="", help="sections: ingest, small, dense, filtered, langgraph (default all)"
    )
    ap.add_argument("--quick", action="store_true", help="10k vectors, small ingest, few rounds")
    ap.add_argument("--sizes", default="10000,100000,1000000", help="dense: comma-separated vector counts")
    ap.add_argument(
        "--filtered-sizes",
        default="100000:2+10,1000000:10",
        help="filtered: vector counts, each with its namespace counts after ':' (default --namespaces)",
    )
    ap.add_argument("--namespaces", default="2,10", help="filtered: namespace counts (vectors split evenly)")
    ap.add_argument(
        "--shared-max", type=int, default=100_000, help="filtered: sizes up to this also run one shared index"
    )
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--episodes", type=int, default=1000, help="episodes per batched ingest (~25 steps each)")
    ap.add_argument("--batch", type=int, default=500, help="episodes per add_trajectories call")
    ap.add_argument("--ingest-rounds", type=int, default=3, help="batched ingest runs per code (medians)")
    ap.add_argument("--baseline", type=Path, help="a directory holding an older evolve package to compare")
    ap.add_argument("--hard", action="store_true", help="isotropic clusters, no sub-clusters (see Mixture)")
    ap.add_argument("--md", type=Path, help="also write the markdown tables to this file")
    ap.add_argument("--rounds", type=int, default=30, help="rounds of the small-operations section")
    ap.add_argument("--workdir", type=Path, help="where the stores go (default: a temporary directory)")
    ap.add_argument("--ingest-json", action="store_true", help=argparse.SUPPRESS)  # one run, for --baseline
    ap.add_argument("--small-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="evolve-bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.ingest_json or args.small_json:  # a child of --baseline / the alternated ingest runs
        out = (
            ingest_batched_once(work, args.episodes, args.batch)
            if args.ingest_json
            else small_round_json(work)
        )
        print(json.dumps(out))
        return
    sizes = [10_000] if args.quick else [int(x) for x in args.sizes.split(",") if x]
    ns_counts = [int(x) for x in args.namespaces.split(",") if x]
    fsizes = (
        [(10_000, ns_counts)]
        if args.quick
        else [_size_spec(x, ns_counts) for x in args.filtered_sizes.split(",") if x]
    )
    n_episodes = 200 if args.quick else args.episodes
    n_queries = 100 if args.quick else args.queries
    header = f"Machine: {machine()}"
    print(header, flush=True)
    md = [header]
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    want = lambda section: not only or section in only  # noqa: E731
    baseline = args.baseline.resolve() if args.baseline else None
    try:
        if want("small"):
            small = bench_small_ops(work, 5 if args.quick else args.rounds, baseline=baseline)
            md.append(
                print_table(
                    "LangGraph small operations, ms (medians; interleaved round by round)",
                    [
                        "store",
                        "open",
                        "put",
                        "get",
                        "search",
                        "close",
                        "open+put+get+search",
                        "x SqliteStore",
                    ],
                    small,
                    caption="Target: open + put + get + search of one item within 2x SqliteStore's time.",
                )
            )
        if want("ingest"):
            ingest = bench_ingest(
                work,
                n_episodes,
                args.batch,
                n_naive=min(200, n_episodes),
                n_rows=2000,
                rounds=1 if args.quick else args.ingest_rounds,
                baseline=baseline,
            )
            md.append(
                print_table(
                    "Ingest (TextWorld-like steps: ~300-char observations, 10-30 admissible actions)",
                    [
                        "writer",
                        "steps",
                        "seconds",
                        "steps/s",
                        "each run",
                        "CPU us/step",
                        "x before",
                        "file MiB",
                    ],
                    ingest,
                    caption="Target: >= 50k steps/s batched. Medians of alternated runs in fresh processes; "
                    "CPU: all threads.",
                )
            )
        if want("dense"):
            dense = bench_dense(work, sizes, n_queries, args.hard)
            md.append(
                print_table(
                    f"Dense top-10 search, {DIM}-d {'isotropic' if args.hard else 'two-level'} mixture, "
                    f"{n_queries} queries, one namespace",
                    [
                        "vectors",
                        "index",
                        "insert vec/s",
                        "FAISS build s",
                        "build end-to-end s",
                        "p50 ms",
                        "p99 ms",
                        "recall@10",
                    ],
                    dense,
                    caption=f"HNSW M={vi.HNSW_M}, efConstruction={vi.HNSW_EF_CONSTRUCTION}, "
                    f"efSearch={vi.HNSW_EF_SEARCH}; flat below the threshold. Latency through "
                    "store.search_vector.",
                )  # fmt: skip
            )
        if want("filtered"):
            filt = bench_filtered(work, fsizes, n_queries, args.hard, args.shared_max)
            md.append(
                print_table(
                    f"Namespace-filtered top-10 search ({DIM}-d random vectors, {n_queries} queries)",
                    [
                        "vectors",
                        "namespace (its vectors)",
                        "index layout",
                        "FAISS parts",
                        "build s",
                        "p50 ms",
                        "p95 ms",
                        "recall@10",
                    ],
                    filt,
                    caption="Target at 1M: p50 <= 1 ms at recall@10 >= 0.95. Latency through "
                    "store.search_vector; build: DuckDB read + FAISS.",
                )  # fmt: skip
            )
        if want("langgraph"):
            lg = bench_langgraph(
                work, 10_000 if args.quick else 100_000, n_queries, min(50, n_queries), args.hard
            )
            md.append(
                print_table(
                    "vs LangGraph InMemoryStore (same vectors, same query vectors)",
                    ["store", "vectors", "put items/s", "p50 ms", "p99 ms", "recall@10", "speed-up (p50)"],
                    lg,
                    caption="Target: >= 10x InMemoryStore at 100k.",
                )
            )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n\n".join(md) + "\n"
    if args.md:
        args.md.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
