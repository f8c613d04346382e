"""The LangGraph agent loop and the recorder, on real TextWorld / ScienceWorld games and real DuckDB."""

from __future__ import annotations

import shutil
import time
from typing import Any, TypedDict

import pytest

from evolve.agents.base import Decision, NoHooks
from evolve.agents.graph import build_agent_graph, run_episode
from evolve.agents.policies import OraclePolicy, RandomPolicy
from evolve.agents.recorder import Recorder
from evolve.envs import make_env
from evolve.errors import EnvCrashed, PolicyError
from evolve.schema import (
    Action,
    ActionSource,
    FailureCause,
    GuardrailVerdict,
    MemoryContext,
    Observation,
    Outcome,
    Privileged,
    Step,
    Task,
)
from evolve.stores import ExperienceStore


@pytest.fixture(scope="module")
def tw():
    env = make_env("textworld", n_train=3)
    yield env
    env.close()


@pytest.fixture(scope="module")
def tw_tasks(tw):
    return tw.tasks("train")


def walkthrough(env, task) -> list[str]:
    env.reset(task)
    return env.privileged().gold_actions


class SpyEnv:
    """Wraps an env, logging every action sent to it; raises on step ``crash_at`` (1-based)."""

    def __init__(self, env, crash_at: int | None = None, exc: Exception | None = None) -> None:
        self.env, self.name = env, env.name
        self.crash_at, self.exc = crash_at, exc
        self.sent: list[str] = []

    def tasks(self, split):
        return self.env.tasks(split)

    def reset(self, task):
        return self.env.reset(task)

    def step(self, action: str) -> Observation:
        self.sent.append(action)
        if self.crash_at is not None and len(self.sent) == self.crash_at:
            raise self.exc or EnvCrashed("engine died (test)")
        return self.env.step(action)

    def privileged(self) -> Privileged:
        return self.env.privileged()

    def close(self) -> None:
        pass


class ScriptPolicy:
    """Returns actions from ``script(obs, memory, call)``; logs every memory it was shown."""

    needs_privileged = False

    def __init__(self, script, name: str = "script") -> None:
        self.script, self.name = script, name
        self.memories: list[MemoryContext] = []

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        self.calls = 0

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        self.memories.append(memory)
        self.calls += 1
        out = self.script(obs, memory, self.calls)
        return out if isinstance(out, Decision) else Decision(action=Action(text=out))


class Forbid(NoHooks):
    """A guardrail hook that refuses one action."""

    def __init__(self, action: str) -> None:
        self.action = action

    def check_action(self, action: Action, obs: Observation, memory: MemoryContext) -> GuardrailVerdict:
        if action.text == self.action:
            return GuardrailVerdict(allowed=False, guardrail_id="guard-test", reason=f"never '{self.action}'")
        return GuardrailVerdict()


def test_oracle_replays_gold_path_to_success(tw, tw_tasks):
    for task in tw_tasks:
        traj = run_episode(tw, OraclePolicy(), task, max_steps=30, namespace="ns", run_id="r1", seed=3)
        assert traj.outcome == Outcome.success, traj.diagnosis
        assert traj.score == traj.max_score == 1.0
        assert traj.policy == "oracle" and traj.namespace == "ns" and traj.run_id == "r1" and traj.seed == 3
        assert traj.goal and traj.split.value == "train"
        assert traj.diagnosis is not None and not traj.diagnosis.failed
        for i, s in enumerate(traj.steps):
            assert s.index == i and s.diagnosis is not None
            assert s.action.source == ActionSource.oracle
            t = s.timings
            assert t.total_s >= t.memory_s + t.policy_s + t.env_s and t.env_s > 0
        # Consecutive steps share the observation object, which the store stores once.
        assert all(b.pre_state is a.post_state for a, b in zip(traj.steps, traj.steps[1:]))


def test_step_timings_charge_each_stage_its_own_time(tw, tw_tasks):
    # Each stage sleeps a different, known time: a bucket charged with another stage's time fails.
    class SlowEnv(SpyEnv):
        def step(self, action: str) -> Observation:
            time.sleep(0.04)
            return super().step(action)

    class SlowMemory(NoHooks):
        def retrieve(self, obs, history):
            time.sleep(0.01)
            return MemoryContext()

    def script(obs, memory, call):
        time.sleep(0.02)
        return "inventory"

    traj = run_episode(SlowEnv(tw), ScriptPolicy(script), tw_tasks[0], hooks=SlowMemory(), max_steps=2)
    assert len(traj.steps) == 2
    for s in traj.steps:
        t = s.timings
        assert t.memory_s >= 0.01 and t.policy_s >= 0.02 and t.env_s >= 0.04
        assert t.total_s >= t.memory_s + t.policy_s + t.env_s


def test_random_fails_sometimes(tw, tw_tasks):
    trajs = [run_episode(tw, RandomPolicy(seed=0), t, max_steps=10) for t in tw_tasks]
    assert any(t.outcome != Outcome.success for t in trajs)
    limited = [t for t in trajs if t.outcome == Outcome.step_limit]
    assert limited and all(len(t.steps) == 10 for t in limited)
    assert all("step_limit" in t.diagnosis.cause_names() for t in limited)


def test_guardrail_blocks_then_replans(tw, tw_tasks):
    task = tw_tasks[0]
    gold = walkthrough(tw, task)
    spy = SpyEnv(tw)

    def script(obs, memory, call):
        # Insist on the forbidden action until a note says it was blocked.
        return "inventory" if any("blocked" in n for n in memory.notes) else gold[0]

    policy = ScriptPolicy(script)
    traj = run_episode(spy, policy, task, hooks=Forbid(gold[0]), max_steps=2)
    assert gold[0] not in spy.sent
    assert spy.sent == ["inventory", "inventory"]
    assert "never" in policy.memories[1].notes[-1]
    assert all(s.action.text == "inventory" for s in traj.steps)


def test_guardrail_blocked_three_times_records_failed_step(tw, tw_tasks):
    task = tw_tasks[0]
    spy = SpyEnv(tw)
    policy = ScriptPolicy(lambda obs, memory, call: "go north")
    traj = run_episode(spy, policy, task, hooks=Forbid("go north"), max_steps=2)
    assert spy.sent == []  # the env never saw it
    assert policy.calls == 6  # per step: asked once + 2 re-asks
    assert [len(m.notes) for m in policy.memories] == [0, 1, 2, 0, 1, 2]
    assert len(traj.steps) == 2
    # The memory block recorded is the one of the last ask, not the one with the final block note.
    assert [s.memory_prompt for s in traj.steps] == [policy.memories[i].prompt_text() for i in (2, 5)]
    assert traj.steps[0].memory_prompt.count("was blocked") == 2
    for s in traj.steps:
        assert s.post_state.info["guardrail_blocked"] == "never 'go north'"
        assert s.post_state.info["guardrail_id"] == "guard-test"
        assert s.post_state.text == s.pre_state.text
        assert FailureCause.guardrail_blocked.value in s.diagnosis.cause_names()
    assert traj.outcome == Outcome.step_limit


def test_propose_macro_actions_bypass_policy(tw, tw_tasks):
    task = tw_tasks[1]
    gold = walkthrough(tw, task)

    class Macro(NoHooks):
        def propose(self, obs, history, memory):
            return (
                Action(text=gold[len(history)], skill_id="skill-test") if len(history) < len(gold) else None
            )

        def retrieve(self, obs, history):
            from evolve.schema import Skill

            return MemoryContext(skills=[Skill(id="skill-test", name="walk")])

    policy = ScriptPolicy(lambda obs, memory, call: "look")
    traj = run_episode(tw, policy, task, hooks=Macro(), max_steps=20)
    assert traj.outcome == Outcome.success
    assert [s.action.text for s in traj.steps] == gold
    assert all(
        s.action.source == ActionSource.skill and s.action.skill_id == "skill-test" for s in traj.steps
    )
    assert all(s.retrieved == ["skill-test"] for s in traj.steps)
    assert not policy.memories  # the policy was never asked


def test_replanning_note_after_stagnation(tw, tw_tasks):
    policy = ScriptPolicy(lambda obs, memory, call: "inventory")
    traj = run_episode(tw, policy, tw_tasks[0], max_steps=12)
    fired = [s.index for s in traj.steps if s.diagnosis.looping or "stagnation" in s.diagnosis.cause_names()]
    assert fired
    after = fired[0] + 1
    notes = policy.memories[after].notes
    assert notes and "try a different approach" in notes[0] and "'inventory'" in notes[0]
    assert not policy.memories[fired[0]].notes
    assert traj.steps[after].action.source == ActionSource.replan


@pytest.mark.parametrize("exc", [EnvCrashed("engine died (test)"), RuntimeError("segfault-ish")])
def test_env_crash_mid_episode_keeps_steps(tw, tw_tasks, exc):
    spy = SpyEnv(tw, crash_at=3, exc=exc)
    traj = run_episode(spy, RandomPolicy(seed=1), tw_tasks[0], max_steps=10)
    assert traj.outcome == Outcome.error
    assert len(traj.steps) == 3
    last = traj.steps[-1]
    assert last.error.startswith("EnvCrashed:") and str(exc) in last.error
    assert last.action.source != ActionSource.fallback
    assert "env_error" in last.diagnosis.cause_names()
    assert traj.metadata["error"] == last.error
    assert "env_error" in traj.diagnosis.cause_names()
    assert all(s.error is None for s in traj.steps[:2])


def test_policy_error_and_fallback_decision(tw, tw_tasks):
    def script(obs, memory, call):
        if call == 1:
            return Decision(action=Action(text="look"), error="unparseable model output")
        raise PolicyError("endpoint down")

    traj = run_episode(tw, ScriptPolicy(script), tw_tasks[0], max_steps=5)
    assert traj.outcome == Outcome.error and len(traj.steps) == 2
    first, second = traj.steps
    assert first.action.source == ActionSource.fallback and "unparseable" in first.error
    assert "policy_error" in first.diagnosis.cause_names()
    assert second.error == "PolicyError: endpoint down"
    assert "policy_error" in second.diagnosis.cause_names()
    assert traj.metadata["error"] == "PolicyError: endpoint down"


def test_build_agent_graph_is_inspectable():
    graph = build_agent_graph()
    nodes = set(graph.get_graph().nodes)
    assert {"observe", "retrieve", "plan", "guard", "env_step", "record", "diagnose"} <= nodes


# --------------------------------------------------------------------------- recorder


def test_recorder_flushes_in_batches_and_on_error(tmp_path, tw, tw_tasks):
    path = tmp_path / "store.duckdb"
    trajs = [run_episode(tw, RandomPolicy(seed=i), tw_tasks[0], max_steps=3) for i in range(5)]
    with pytest.raises(RuntimeError), Recorder(path, namespace="ns", batch_size=2) as rec:
        for t in trajs:
            rec.add(t)
        assert rec.written == 4 and rec.pending == 1
        ep = rec.episode("hand-1", env="custom", goal="say hi")
        ep.step("You are here.", "say hi", "Hi!", reward=1.0, done=False)
        raise RuntimeError("user code failed")
    with ExperienceStore(path, namespace="ns") as store:
        assert store.count_trajectories() == 6  # the 5 + the open episode, closed as an error
        hand = [t for t in store.trajectories() if t.task_id == "hand-1"][0]
        assert hand.outcome == Outcome.error and "user code failed" in hand.metadata["error"]
        assert hand.steps[0].diagnosis is not None and hand.steps[0].post_state.state.score == 1.0


def test_recorder_wraps_a_user_langgraph_graph(tmp_path, tw, tw_tasks):
    """A user-written graph (not ours) records through ``Recorder.node``."""
    import random

    from langgraph.graph import END, START, StateGraph

    class S(TypedDict, total=False):
        task_id: str
        observation: Any
        action: str | None
        done: bool
        steps: int

    rng = random.Random(0)

    def reset(state: S) -> dict:
        obs = tw.reset(state["task_id"])
        return {"observation": obs, "action": None, "done": False, "steps": 0}

    def act(state: S) -> dict:
        return {"action": rng.choice(state["observation"].admissible_actions)}

    def env_step(state: S) -> dict:
        obs = tw.step(state["action"])
        return {"observation": obs, "done": obs.state.done, "steps": state["steps"] + 1}

    path = tmp_path / "user.duckdb"
    with Recorder(path, namespace="mine", run_id="u1", batch_size=64) as rec:
        g = StateGraph(S)
        g.add_node("reset", reset)
        g.add_node("record", rec.node(env="textworld", policy="my-random"))
        g.add_node("act", act)
        g.add_node("env", env_step)
        g.add_edge(START, "reset")
        g.add_edge("reset", "record")
        g.add_conditional_edges("record", lambda s: END if s["done"] or s["steps"] >= 6 else "act")
        g.add_edge("act", "env")
        g.add_edge("env", "record")
        app = g.compile()
        for task in tw_tasks[:2]:
            app.invoke({"task_id": task.id})
        # Text-only observations work too.
        ep = rec.episode("text-1", env="custom")
        ep.step("dark room", "light lamp", "lit room", reward=1.0, done=True)
        ep.finish()
    with ExperienceStore(path, namespace="mine") as store:
        trajs = {t.task_id: t for t in store.trajectories(run_id="u1")}
    assert set(trajs) == {tw_tasks[0].id, tw_tasks[1].id, "text-1"}
    for task in tw_tasks[:2]:
        t = trajs[task.id]
        assert t.policy == "my-random" and t.env == "textworld" and t.goal
        assert 1 <= len(t.steps) <= 6 and all(s.diagnosis for s in t.steps)
        assert t.outcome in (Outcome.success, Outcome.step_limit, Outcome.failure)
        assert t.steps[0].pre_state.state.facts  # the reset observation is the first pre-state
    assert trajs["text-1"].outcome == Outcome.success


def test_usage_callback_attributes_tokens(tmp_path):
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    with Recorder(tmp_path / "u.duckdb") as rec:
        cb = rec.callback()
        msg = AIMessage(
            content="go", usage_metadata={"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}
        )
        cb.on_llm_end(LLMResult(generations=[[ChatGeneration(message=msg)]]))
        ep = rec.episode("t", env="custom")
        step = ep.step("a", "go", "b")
        assert (step.usage.prompt_tokens, step.usage.completion_tokens) == (7, 2)
        assert ep.step(None, "go", "c").usage.prompt_tokens == 0


class GoldReplay:
    """Replays the privileged gold path verbatim (no admissibility filter)."""

    name = "gold-replay"
    needs_privileged = True

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        self.gold = list(privileged.gold_actions) if privileged else []

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        return Decision(action=Action(text=self.gold[len(history)], source=ActionSource.oracle))


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld needs java")


@pytest.fixture(scope="module")
def sw():
    env = make_env("scienceworld", task_names=["find-living-thing"], max_variations=1)
    yield env
    env.close()


@needs_java
def test_scienceworld_gold_path_through_the_graph(sw):
    traj = run_episode(sw, GoldReplay(), "sw-find-living-thing-v0", max_steps=15)
    assert traj.outcome == Outcome.success, traj.diagnosis
    assert traj.score == traj.max_score == 100 and traj.env == "scienceworld" and traj.goal
    assert all(s.diagnosis is not None and s.error is None for s in traj.steps)


@needs_java
def test_scienceworld_oracle_episode(sw):
    traj = run_episode(sw, OraclePolicy(), "sw-find-living-thing-v0", max_steps=15)
    assert traj.outcome == Outcome.success, traj.diagnosis
