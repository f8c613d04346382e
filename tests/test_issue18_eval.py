"""Issue 18, in the eval harness: ADAPT trials that can differ (sampling, the policy seed varying
with the trial, usage carried in the knowledge), and the context-only ablation arms
(``evolve_context``, ``raw_exemplars``) next to the memory arms that also act.

Real parts: TextWorld games, DuckDB stores, the skills memory through ``evolve.pipeline.memory_for``,
the random policy, and the OpenAI policy against a real local HTTP server (:class:`conftest.ChatPeer`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ChatPeer

from evolve.agents.base import NoHooks
from evolve.config import EvalStage
from evolve.envs import build_env
from evolve.errors import ConfigError
from evolve.eval import ARMS, CONTEXT_ARMS, Episodes, Memory, adapt, arm_hooks, task_ids
from evolve.eval.adapt import trial_policy, with_usage
from evolve.pipeline import memory_for
from evolve.schema import ActionSource, KnowledgeStats, Skill
from evolve.skills import MemoryConfig
from evolve.specs import EnvSpec, PolicySpec
from evolve.stores import ExperienceStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import evolution  # noqa: E402

TW = EnvSpec(name="textworld", kwargs={"n_train": 2, "n_dev": 1, "n_test": 2})


class _NoMemory:
    """A picklable hooks factory: the loop without memory (what changes between trials is the policy)."""

    def __call__(self) -> NoHooks:
        return NoHooks()


# ------------------------------------------------------------------------------------ ADAPT


def test_trial_policy_and_usage_carried() -> None:
    base = {"kind": "openai", "model": "m", "seed": 7}
    assert trial_policy(base, 3) == PolicySpec.parse(base)  # as given: every trial the same
    t3 = trial_policy(base, 3, temperature=0.8, vary_seed=True)
    assert (t3.temperature, t3.seed) == (0.8, 9)
    assert trial_policy({"kind": "random"}, 2, seed=5, vary_seed=True).seed == 6
    s = Skill(id="skill-a", name="a", steps=["look"], stats=KnowledgeStats(uses=1, successes=1))
    (out,) = with_usage([s], {"skill-a": (2, 0, 2)})
    assert (out.stats.uses, out.stats.successes, out.stats.failures) == (3, 1, 2)
    assert out.stats.confidence < s.stats.confidence and s.stats.uses == 1  # a copy


def test_adapt_trials_differ_only_when_the_seed_varies(tmp_path: Path) -> None:
    memory = Memory(evolve=lambda k: _NoMemory(), distill=lambda trajs: [])
    with ExperienceStore(tmp_path / "a.duckdb", namespace="a", embedder="hash") as store:
        eps = Episodes(store, TW, {"kind": "random", "seed": 0}, max_steps=6, progress=False)
        task = task_ids(TW, "test")[:1]

        def actions(label: str) -> list[list[str]]:
            trajs = {t.run_id: t for t in store.trajectories(run_id=None) if t.run_id.startswith(label)}
            return [[s.action.text for s in trajs[f"{label}{k}"].steps] for k in (1, 2)]

        adapt(eps, memory, task, trials=2, label=lambda k: f"fixed:{k}")
        same = actions("fixed:")
        assert same[0] == same[1]  # greedy/fixed seed and no memory change: the same episode twice
        adapt(eps, memory, task, trials=2, label=lambda k: f"vary:{k}", vary_seed=True)
        differ = actions("vary:")
        assert differ[0] == same[0] and differ[1] != differ[0]  # trial 1 unchanged, trial 2 resampled
        assert all(t.seed == 0 for t in store.trajectories(run_id=None))  # the same task instance


def test_adapt_llm_requests_sample_with_the_trial_seed_and_see_trial_1s_knowledge(
    tmp_path: Path, chat_peer: Callable[..., ChatPeer]
) -> None:
    task = task_ids(TW, "test")[0]
    env = build_env(TW)
    try:
        env.reset(task)
        gold = env.privileged().gold_actions
    finally:
        env.close()
    # The endpoint plays the walkthrough once (trial 1 wins), then repeats its last answer.
    peer = chat_peer([(200, json.dumps({"thought": "t", "command": a})) for a in gold])
    policy = {
        "kind": "openai",
        "model": "peer-model",
        "base_url": peer.url,
        "response_format": "none",
        "max_retries": 0,
        "max_tokens": 32,
    }
    with ExperienceStore(tmp_path / "l.duckdb", namespace="l", embedder="hash") as store:
        # Context only, so that every step of trial 2 asks the model (a macro would need no call).
        memory = memory_for(store, "l", "hash", config=MemoryConfig(propose=False))
        eps = Episodes(store, TW, policy, max_steps=len(gold) + 2, progress=False)
        pts = adapt(eps, memory, [task], trials=2, temperature=0.7, vary_seed=True)
        first = store.trajectories(run_id="adapt:1")[0]
        assert first.success and len(first.steps) == len(gold)
    assert [p.memories for p in pts][0] == 0 and pts[1].memories > 0
    trial1, trial2 = peer.requests[: len(gold)], peer.requests[len(gold) :]
    assert trial2, "trial 2 asked the model"
    assert {r["seed"] for r in trial1} == {0} and {r["seed"] for r in trial2} == {1}
    assert {r["temperature"] for r in peer.requests} == {0.7}

    # What trial 1 taught is in trial 2's prompts.
    def shown(r: dict) -> bool:
        return any("Skills that worked before" in m["content"] for m in r["messages"])

    assert shown(trial2[0]) and not any(shown(r) for r in trial1)


def test_bench_adapt_temperature_labels_and_title(tmp_path: Path) -> None:
    a = evolution.parse_args(["--adapt-temperature", "0.7"])
    assert evolution.adapt_label(a, 3) == "adapt:empty:t0.7:3"
    assert evolution.adapt_label(evolution.parse_args([]), 3) == "adapt:empty:3"


# ------------------------------------------------------------------------------------ arms


def test_context_arms_are_known_everywhere() -> None:
    assert set(CONTEXT_ARMS) <= set(ARMS) and set(CONTEXT_ARMS) <= set(evolution.ARMS)
    assert EvalStage(arms=["no_memory", "evolve_context", "raw_exemplars"]).arms[-1] == "raw_exemplars"
    with pytest.raises(ConfigError, match="evolve_context"):
        arm_hooks("evolve_context", Memory(evolve=lambda k: _NoMemory()), [], [])
    with pytest.raises(ConfigError, match="raw_exemplars"):
        arm_hooks("raw_exemplars", Memory(evolve=lambda k: _NoMemory()), [], [])


def test_bench_context_arms_show_memory_but_never_act(tmp_path: Path) -> None:
    out = tmp_path / "arms"
    arms = "no_memory,raw_retrieval,evolve,evolve_context,raw_exemplars"
    evolution.main(
        ["--out", str(out), "--n-train", "3", "--n-dev", "1", "--n-test", "2", "--oracle-demos", "3"]
        + ["--knowledge", "oracle", "--trials", "1", "--max-steps", "8", "--workers", "1", "--curve", ""]
        + ["--no-probation", "--quiet", "--arms", arms]
    )
    res = json.loads((out / "results.json").read_text())
    assert list(res["arms"]) == arms.split(",")
    assert {"no_memory", "raw_retrieval", "evolve_context", "evolve_context-no_memory"} <= set(
        res["comparisons"]
    )
    assert {"raw_retrieval-raw_exemplars", "raw_exemplars-no_memory"} <= set(res["comparisons"])
    with ExperienceStore(out / "store.duckdb", namespace=res["namespace"], embedder="hash") as store:
        steps = {
            arm: [s for t in store.trajectories(run_id=f"eval:{arm}") for s in t.steps] for arm in res["arms"]
        }
    # Memory-executed steps: skill macros carry a skill id, replays come as ActionSource.skill
    # ("replan" alone is a policy decision taken while replanning).
    memory_acted = {
        arm: sum(bool(s.action.skill_id) or s.action.source == ActionSource.skill for s in ss)
        for arm, ss in steps.items()
    }
    assert memory_acted["evolve"] > 0  # the full memory executes skill steps
    assert memory_acted["evolve_context"] == memory_acted["raw_exemplars"] == 0
    # ... while still showing what it knows.
    assert any("Skills that worked before" in s.memory_prompt for s in steps["evolve_context"])
    assert any("Excerpts of past episodes" in s.memory_prompt for s in steps["raw_exemplars"])
