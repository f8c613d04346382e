"""Memory reranker: dense+BM25 vs teachers vs the distilled student, on held-out retrieval decisions.

Decisions come from stores that ``bench/evolution.py`` wrote (real TextWorld / ScienceWorld runs;
their retrieval logs hold query, candidates, hybrid score). Labels are outcome labels
(:mod:`evolve.synth.reranker_data`); decisions are split by task (``--holdout``), so the held-out
tasks are unseen by the student. ``--sw-oracle N`` first adds ScienceWorld decisions made with the
env oracle acting and EvolveMemory retrieving (propose off): random-policy ScienceWorld runs almost
never make progress, so they hold almost no positive labels.

Rows: ``dense+BM25`` (the logged fused score), ``outcome stats`` (the item's usage confidence, a
free teacher), ``LLM judge`` (pairwise, both orders, Bradley-Terry; ``--judge-gguf`` serves a local
GGUF through ``bench/local_llm.py``), and the ``student`` (MiniLM cross-encoder, calibrated).
Metrics: NDCG@10, MAP (relevant = label 1), expected calibration error, latency per query.
``--e2e-tasks N`` then runs EvolveMemory with and without the student on the held-out TextWorld
test tasks (same tasks and seeds) and reports success.

    OMP_NUM_THREADS=1 python bench/reranker.py --tw runs/evolution/store.duckdb \\
        --sw runs/evolution-sw/store.duckdb --sw-oracle 8 \\
        --judge-gguf ~/.cache/evolve/models/qwen2.5-coder-0.5b.gguf --judge-held 25 --e2e-tasks 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _table import print_table  # noqa: E402

from evolve.schema import TrainingExample  # noqa: E402
from evolve.stores import ExperienceStore, make_embedder  # noqa: E402
from evolve.stores.hybrid import CrossEncoderReranker, HybridScorer  # noqa: E402
from evolve.synth.reranker_data import (  # noqa: E402
    bradley_terry,
    candidate_pairs,
    reranker_examples,
    sigmoid,
)
from evolve.train.reranker import RerankerSettings, held_out, ranking_metrics, split_by_task, train_reranker  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tw", default="runs/evolution/store.duckdb", help="TextWorld evolution store ('' = none)"
    )
    ap.add_argument("--sw", default="", help="ScienceWorld evolution store ('' = none)")
    ap.add_argument("--out", default="runs/reranker")
    ap.add_argument(
        "--sw-oracle", type=int, default=0, help="ScienceWorld tasks run by the oracle with memory"
    )
    ap.add_argument(
        "--sw-args",
        default="--n-train 8 --n-dev 3 --n-test 8 --max-steps 30",
        help="bench/evolution.py arguments that made the --sw store (for its task list)",
    )
    ap.add_argument("--holdout", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--losses", default="bce,margin_mse")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128, help="tokens per (query, memory) pair")
    ap.add_argument("--query-chars", default="120,300", help="head,tail characters of the query kept")
    ap.add_argument("--judge-gguf", default="", help="serve this GGUF as the LLM judge")
    ap.add_argument("--judge-base-url", default="", help="or an OpenAI-compatible endpoint")
    ap.add_argument("--judge-model", default="judge")
    ap.add_argument("--judge-held", type=int, default=25, help="held-out decisions the judge ranks")
    ap.add_argument("--judge-train", type=int, default=0, help="training decisions the judge labels")
    ap.add_argument("--pairs", type=int, default=4, help="judged pairs per decision")
    ap.add_argument(
        "--e2e-tasks", type=int, default=0, help="held-out TextWorld test tasks for the agent arm"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--student", default="", help="a trained student directory: skip training")
    return ap.parse_args(argv)


def _copy_store(src: str, out: Path, name: str) -> ExperienceStore | None:
    if not src:
        return None
    dst = out / f"{name}.duckdb"
    if not dst.exists():
        shutil.copy(src, dst)
    store = ExperienceStore(dst, embedder=make_embedder("hash"))
    ns = [n for n in store.list_namespaces() if n != "default"]
    store.namespace = ns[0] if ns else store.namespace
    return store


def sw_oracle_decisions(store: ExperienceStore, n: int, sw_args: list[str], log: Any) -> None:
    """Oracle-acting ScienceWorld episodes on the first ``n`` test tasks of the evolution run that
    made the store, with EvolveMemory over its knowledge retrieving (propose off), logged."""
    import evolution as evo_bench

    from evolve.eval import Episodes
    from evolve.skills import EvolveMemory, MemoryConfig, knowledge_of
    from evolve.specs import PolicySpec

    ev = evo_bench.parse_args(["--env", "scienceworld", *sw_args])
    spec = evo_bench.env_spec(ev)
    tasks = evo_bench.split_tasks(ev, spec)["test"][:n]
    ns = store.namespace
    eps = Episodes(
        store, spec, PolicySpec(kind="oracle"), namespace=ns, max_steps=ev.max_steps, progress=False
    )
    hooks = EvolveMemory.factory(
        knowledge_of(store, ns), "hash", namespace=ns, env="scienceworld", config=MemoryConfig(propose=False)
    )
    trajs = eps.run("rr:oracle+memory", tasks, hooks=hooks)
    log(f"  sw oracle+memory: {len(trajs)} episodes, {sum(t.success for t in trajs)} won")


def judge_rank(judge: Any, ex: TrainingExample, pairs: int) -> np.ndarray:
    """The LLM judge's Bradley-Terry scores (sigmoid of strengths) for one decision's documents."""
    votes = []
    for i, j in candidate_pairs(len(ex.documents), pairs):
        p = judge.prefer(ex.query or "", ex.documents[i], ex.documents[j])
        if p is not None:
            votes.append((i, j, p, 1.0))
    return sigmoid(bradley_terry(len(ex.documents), votes))


def stats_scores(store: ExperienceStore, ex: TrainingExample) -> list[float]:
    conf = {
        k.id: k.stats.confidence for k in [*store.skills(store.namespace), *store.guardrails(store.namespace)]
    }
    return [conf.get(k, 0.5) for k in ex.metadata.get("knowledge_ids", [])]


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda *m: print(*m, flush=True)  # noqa: E731
    stores = {
        k: s
        for k, s in (
            ("textworld", _copy_store(a.tw, out, "tw")),
            ("scienceworld", _copy_store(a.sw, out, "sw")),
        )
        if s
    }
    if not stores:
        raise SystemExit("give --tw and/or --sw: stores written by bench/evolution.py")
    if a.sw_oracle and "scienceworld" in stores:
        sw_oracle_decisions(stores["scienceworld"], a.sw_oracle, a.sw_args.split(), log)

    # 1. decisions with outcome labels, split by task
    examples: dict[str, list[TrainingExample]] = {}
    for env, st in stores.items():
        # Decisions of this script's own agent arms (e2e:, and rr:evolve of earlier versions) are left out.
        ids = [
            t.id
            for t in st.trajectories(st.namespace)
            if not (t.run_id or "").startswith(("e2e:", "rr:evolve"))
        ]
        examples[env] = reranker_examples(st, st.namespace, trajectory_ids=ids)
        for ex in examples[env]:
            ex.metadata["env"] = env
        log(f"{env}: {len(examples[env])} labelled decisions from '{st.namespace}'")
    all_ex = [ex for v in examples.values() for ex in v]
    train, held = split_by_task(all_ex, a.holdout, a.seed)
    held = [ex for ex in held if max(ex.labels) >= 0.5 and min(ex.labels) < 0.5]
    log(f"train {len(train)} decisions, held-out {len(held)} rankable decisions")

    # 2. the LLM judge (optional): held-out ranking + training soft labels
    rows: dict[str, dict[str, Any]] = {}
    judge = None
    srv = None
    if a.judge_gguf or a.judge_base_url:
        from evolve.llm.client import ChatClient
        from evolve.synth.reranker_data import LLMPairwiseJudge

        base_url = a.judge_base_url
        model = a.judge_model
        if a.judge_gguf:
            from local_llm import local_server

            srv = local_server(gguf=a.judge_gguf, threads=a.threads, ctx=2048)
            base_url = srv.__enter__()
            model = Path(a.judge_gguf).stem
        judge = LLMPairwiseJudge(ChatClient(model, base_url=base_url, max_retries=1, timeout_s=120))
    try:
        # 3. scores per system on the held-out decisions
        emb = make_embedder("hash")
        systems: dict[str, list[tuple[list[float], list[float]]]] = {
            "dense+BM25": [],
            "memory score (no reranker)": [],
            "outcome stats": [],
        }
        lat: dict[str, list[float]] = {k: [] for k in systems}
        for ex in held:
            st = stores[ex.metadata["env"]]
            sim = ex.metadata.get("similarity") or []
            systems["dense+BM25"].append(([float(x or 0.0) for x in sim], ex.labels))
            systems["memory score (no reranker)"].append((list(ex.metadata["memory_score"]), ex.labels))
            hs = HybridScorer(ex.documents, emb)
            t = time.perf_counter()
            hs.scores(ex.query or "")
            lat["dense+BM25"].append(time.perf_counter() - t)
            t = time.perf_counter()
            systems["outcome stats"].append((stats_scores(st, ex), ex.labels))
            lat["outcome stats"].append(time.perf_counter() - t)
        if judge is not None:
            name = f"LLM judge ({judge.client.model})"
            systems[name], lat[name] = [], []
            for ex in held[: a.judge_held]:
                t = time.perf_counter()
                systems[name].append((judge_rank(judge, ex, a.pairs).tolist(), ex.labels))
                lat[name].append(time.perf_counter() - t)
            log(f"judge: {judge.calls} calls, {judge.errors} errors")
            if a.judge_train:
                # Teacher soft labels on training decisions: the judge's votes join the outcome votes.
                from evolve.synth.reranker_data import outcome_votes, platt_fit

                judged = [ex for ex in train if len(ex.documents) >= 2][: a.judge_train]
                thetas = []
                for ex in judged:
                    ol = ex.metadata["outcome_labels"]
                    votes = outcome_votes(ol)
                    for i, j in candidate_pairs(len(ex.documents), a.pairs):
                        p = judge.prefer(ex.query or "", ex.documents[i], ex.documents[j])
                        if p is not None:
                            votes.append((i, j, p, 1.0))
                    thetas.append(bradley_terry(len(ex.documents), votes))
                xs = [
                    float(t[i])
                    for t, ex in zip(thetas, judged)
                    for i, y in enumerate(ex.metadata["outcome_labels"])
                    if y is not None
                ]
                ys = [float(y) for ex in judged for y in ex.metadata["outcome_labels"] if y is not None]
                pa, pb = platt_fit(xs, ys)
                for t, ex in zip(thetas, judged):
                    ex.metadata["teacher_labels"] = [float(sigmoid(pa * x + pb)) for x in t]
                    ex.labels = [
                        float(o) if o is not None else tl
                        for o, tl in zip(ex.metadata["outcome_labels"], ex.metadata["teacher_labels"])
                    ]
                log(f"judge labelled {len(judged)} training decisions ({judge.calls} calls in all)")

        # 4. the student
        first = next(iter(stores.values()))
        settings = RerankerSettings(
            out_dir=str(out / "student"),
            losses=[x for x in a.losses.split(",") if x],
            epochs=a.epochs,
            max_steps=a.max_steps,
            batch_size=a.batch_size,
            max_length=a.max_length,
            query_chars=tuple(int(x) for x in a.query_chars.split(",")),
            holdout=a.holdout,
            seed=a.seed,
            num_threads=a.threads,
        )
        if a.student:
            model_dir = a.student
        else:
            t0 = time.perf_counter()
            res = train_reranker(
                first, settings, examples=all_ex, judges=[judge] if judge is not None else [], log=log
            )
            log(f"student trained in {time.perf_counter() - t0:.0f}s: {res.train_rows}")
            model_dir = res.model_dir
        student = CrossEncoderReranker(model_dir)
        systems["student (MiniLM-L6 CE)"], lat["student (MiniLM-L6 CE)"] = [], []
        for ex in held:
            t = time.perf_counter()
            s = student.score(ex.query or "", ex.documents)
            lat["student (MiniLM-L6 CE)"].append(time.perf_counter() - t)
            systems["student (MiniLM-L6 CE)"].append((s.tolist(), ex.labels))
    finally:
        if srv is not None:
            srv.__exit__(None, None, None)

    if judge is not None:
        # The judge ranks only the first --judge-held decisions: the others on those same ones.
        n = len(systems[f"LLM judge ({judge.client.model})"])
        for name in ("dense+BM25", "student (MiniLM-L6 CE)"):
            systems[f"{name}, judge's {n}"] = systems[name][:n]
            lat[f"{name}, judge's {n}"] = lat[name][:n]
    table = []
    for name, groups in systems.items():
        m = ranking_metrics(groups)
        rows[name] = {**m.model_dump(), "latency_ms": 1000 * float(np.mean(lat[name])) if lat[name] else None}
        table.append(
            [
                name,
                str(m.queries),
                f"{100 * m.ndcg_at_10:.1f}",
                f"{100 * m.map:.1f}",
                f"{m.ece:.3f}" if m.ece is not None else "-",
                f"{rows[name]['latency_ms']:.1f}" if rows[name]["latency_ms"] is not None else "-",
            ]
        )
    print_table(
        "Held-out retrieval decisions", ["ranker", "queries", "NDCG@10", "MAP", "ECE", "ms/query"], table
    )
    by_env = []
    for env in examples:
        for name in ("dense+BM25", "student (MiniLM-L6 CE)"):
            g = [gr for gr, ex in zip(systems[name], held) if ex.metadata["env"] == env]
            m = ranking_metrics(g)
            by_env.append([env, name, str(m.queries), f"{100 * m.ndcg_at_10:.1f}", f"{100 * m.map:.1f}"])
    print_table("Per environment", ["env", "ranker", "queries", "NDCG@10", "MAP"], by_env)

    # 5. end effect: EvolveMemory with / without the student on held-out TextWorld test tasks
    e2e: dict[str, Any] = {}
    if a.e2e_tasks and "textworld" in stores:
        e2e = end_to_end(stores["textworld"], model_dir, a, log)
        print_table(
            "EvolveMemory on held-out TextWorld tasks (same tasks and seeds)",
            ["arm", "episodes", "success %", "score"],
            [[k, str(v["n"]), f"{100 * v['success']:.1f}", f"{v['score']:.1f}"] for k, v in e2e.items()],
        )
    (out / "results.json").write_text(
        json.dumps({"rows": rows, "e2e": e2e, "student": model_dir, "args": vars(a)}, indent=1, default=str)
    )


def end_to_end(store: ExperienceStore, model_dir: str, a: argparse.Namespace, log: Any) -> dict[str, Any]:
    import evolution as evo_bench

    from evolve.eval import Episodes
    from evolve.skills import EvolveMemory, MemoryConfig, knowledge_of

    ev = evo_bench.parse_args(["--out", str(Path(a.out) / "e2e")])
    spec = evo_bench.env_spec(ev)
    tasks = [t for t in evo_bench.split_tasks(ev, spec)["test"] if held_out(t.id, a.holdout, a.seed)][
        : a.e2e_tasks
    ]
    log(f"e2e: {len(tasks)} held-out test tasks x {ev.trials} seeds")
    eps = Episodes(
        store, spec, evo_bench.policy_spec(ev), namespace=store.namespace, seeds=(ev.seed,), trials=ev.trials,
        max_steps=ev.max_steps, workers=1, retry_errors=True, progress=False,
    )  # fmt: skip
    know = knowledge_of(store, store.namespace)
    out = {}
    cfg = MemoryConfig()
    arms = (
        ("evolve", None, cfg),
        ("evolve + student (rerank only)", model_dir, cfg.model_copy(update={"rerank_threshold": 0.0})),
        ("evolve + student (rerank + threshold)", model_dir, cfg),
        ("evolve + student (threshold only)", model_dir, cfg.model_copy(update={"rerank_weight": 0.0})),
    )
    for arm, rr, c in arms:
        hooks = EvolveMemory.factory(
            know, "hash", namespace=store.namespace, env="textworld", config=c, reranker=rr
        )
        trajs = eps.run(f"e2e:{arm}", tasks, hooks=hooks)
        out[arm] = {
            "n": len(trajs),
            "success": float(np.mean([t.success for t in trajs])) if trajs else 0.0,
            "score": float(np.mean([t.normalized_score for t in trajs])) if trajs else 0.0,
        }
        log(f"  {arm}: {sum(t.success for t in trajs)}/{len(trajs)} won")
    return out


if __name__ == "__main__":
    main()
