"""The agent loop as a LangGraph ``StateGraph``, and ``run_episode`` that drives it over one episode.

One step of the loop is a chain of small nodes::

    observe -> retrieve -> plan -> guard -> env_step -> record -> diagnose -> (observe | END)
                             ^        |                   ^
                             +--------+ (blocked, <= 2 re-asks, without the refused actions)
                                      +-------------------+ (blocked a 3rd time: a failed step)

The graph is compiled once per process; everything live (env, policy, hooks, the per-episode
diagnoser) travels in the run *context* (:class:`AgentContext`), so the state holds only
schema models and one compiled graph serves every episode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime

from evolve.agents.base import AgentHooks, NoHooks, Policy
from evolve.diagnose import RuleDiagnoser, episode_diagnosis
from evolve.envs.base import Env
from evolve.errors import EnvCrashed, EvolveError, PolicyError
from evolve.schema import (
    Action,
    ActionSource,
    CauseEvidence,
    Diagnosis,
    FailureCause,
    MemoryContext,
    Observation,
    Outcome,
    Step,
    Task,
    Timings,
    TokenUsage,
    Trajectory,
)

log = logging.getLogger(__name__)

MAX_REASKS = 2
"""How often the planner is asked again after a guardrail blocked its action, per step."""

# Super-steps one agent step can take: 7 nodes plus (plan, guard) for each re-ask.
_NODES_PER_STEP = 7 + 2 * MAX_REASKS


class AgentState(TypedDict, total=False):
    """The typed state of the agent graph (schema models only; live objects are in the context)."""

    task: Task
    obs: Observation
    """The current observation: the pre-state of the step being taken."""
    history: list[Step]
    memory: MemoryContext
    carry_notes: list[str]
    """Replanning notes for the *next* step's memory."""
    replanning: bool
    action: Action | None
    decision_error: str | None
    usage: TokenUsage
    reasks: int
    blocked: str | None
    post: Observation | None
    step_error: str | None
    retrieved: list[str]
    memory_prompt: str
    """The memory block the last plan call showed the policy (recorded on the step)."""
    timings: Timings
    t0: float
    outcome: Outcome | None
    """Set only when the episode must end early (env crash, policy error)."""
    error: str | None


@dataclass
class AgentContext:
    """The live objects of one episode, passed to ``graph.invoke(..., context=...)``."""

    env: Env
    policy: Policy
    hooks: AgentHooks = field(default_factory=NoHooks)
    max_steps: int = 50
    diagnoser: RuleDiagnoser = field(default_factory=RuleDiagnoser)


# --------------------------------------------------------------------------- nodes


def _add_time(t: Timings, **deltas: float) -> Timings:
    return t.model_copy(update={k: getattr(t, k) + v for k, v in deltas.items()})


def observe(state: AgentState) -> dict[str, Any]:
    """Start a step: clear the per-step fields."""
    return {
        "t0": time.perf_counter(),
        "timings": Timings(),
        "usage": TokenUsage(),
        "action": None,
        "decision_error": None,
        "reasks": 0,
        "blocked": None,
        "post": None,
        "step_error": None,
        "retrieved": [],
        "memory_prompt": "",
    }


def retrieve(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """Ask the hooks for memory, then add the replanning notes left by the previous step."""
    t = time.perf_counter()
    memory = runtime.context.hooks.retrieve(state["obs"], state["history"]) or MemoryContext()
    carry = state.get("carry_notes") or []
    if carry:
        memory = memory.model_copy(update={"notes": [*memory.notes, *carry]})
    retrieved = [s.id for s in memory.skills] + [g.id for g in memory.guardrails]
    return {
        "memory": memory,
        "carry_notes": [],
        "replanning": bool(carry),
        "retrieved": retrieved,
        "timings": _add_time(state["timings"], memory_s=time.perf_counter() - t),
    }


def plan(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """A skill macro from ``hooks.propose`` if any (first ask only), else the policy's decision."""
    ctx = runtime.context
    obs, history, memory = state["obs"], state["history"], state["memory"]
    timings = state["timings"]
    # Recorded on the step, so that the exact prompt of this step can be rendered again (synth).
    shown = {"memory_prompt": memory.prompt_text()}
    if state["reasks"] == 0:
        t = time.perf_counter()
        proposed = ctx.hooks.propose(obs, history, memory)
        timings = _add_time(timings, memory_s=time.perf_counter() - t)
        if proposed is not None:
            if proposed.source == ActionSource.policy:
                proposed = proposed.model_copy(update={"source": ActionSource.skill})
            return {"action": proposed, "decision_error": None, "timings": timings, **shown}
    t = time.perf_counter()
    try:
        decision = ctx.policy.act(obs, history, memory)
    except Exception as e:  # noqa: BLE001 - any policy failure ends the episode, recorded
        what = f"{e}" if isinstance(e, PolicyError) else f"policy raised {type(e).__name__}: {e}"
        if not isinstance(e, EvolveError):
            log.warning("policy %s raised", ctx.policy.name, exc_info=True)
        action = Action(text="", thought="the policy raised", source=ActionSource.fallback)
        post = obs.model_copy(update={"info": {**obs.info, "policy_error": what}, "reward": 0.0})
        return {
            "action": action,
            "post": post,
            "step_error": f"PolicyError: {what}",
            "outcome": Outcome.error,
            "error": f"PolicyError: {what}",
            "timings": _add_time(timings, policy_s=time.perf_counter() - t),
            **shown,
        }
    action = decision.action
    if decision.error:
        action = action.model_copy(update={"source": ActionSource.fallback})
    elif state.get("replanning") and action.source == ActionSource.policy:
        action = action.model_copy(update={"source": ActionSource.replan})
    return {
        "action": action,
        "decision_error": decision.error,
        "usage": state["usage"] + decision.usage,
        "timings": _add_time(timings, policy_s=time.perf_counter() - t),
        **shown,
    }


def guard(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """Enforce guardrails: a blocked action never reaches the env; its reason becomes a note."""
    if state.get("outcome") == Outcome.error:
        return {}
    action, obs, memory = state["action"], state["obs"], state["memory"]
    assert action is not None
    t = time.perf_counter()
    verdict = runtime.context.hooks.check_action(action, obs, memory)
    timings = _add_time(state["timings"], memory_s=time.perf_counter() - t)
    if verdict.allowed:
        return {"blocked": None, "timings": timings}
    reason = verdict.reason or f"guardrail {verdict.guardrail_id or '?'} forbids '{action.text}'"
    note = f"Action '{action.text}' was blocked: {reason}. Choose a different action."
    reasks = state["reasks"] + 1
    # The re-ask neither lists the refused action nor accepts it (MemoryContext.blocked): a small
    # model shown the same list proposes the same action again, and each re-ask costs a call.
    blocked = [*memory.blocked, action.text] if action.text else list(memory.blocked)
    update: dict[str, Any] = {
        "blocked": reason,
        "reasks": reasks,
        "memory": memory.model_copy(update={"notes": [*memory.notes, note], "blocked": blocked}),
        "timings": timings,
    }
    if reasks > MAX_REASKS:
        # Give up on this step: record it as failed with the state unchanged.
        info = {**obs.info, "guardrail_blocked": reason}
        if verdict.guardrail_id:
            info["guardrail_id"] = verdict.guardrail_id
        update["post"] = obs.model_copy(update={"info": info, "reward": 0.0})
    return update


def env_step(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """Send the action to the env; a crash becomes a recorded failed step and ends the episode."""
    action, obs = state["action"], state["obs"]
    assert action is not None
    t = time.perf_counter()
    try:
        post = runtime.context.env.step(action.text)
    except Exception as e:  # noqa: BLE001 - whatever the engine raised, keep the episode
        msg = str(e) if isinstance(e, EnvCrashed) else f"{type(e).__name__}: {e}"
        err = f"EnvCrashed: {msg}"
        if not isinstance(e, EvolveError):
            log.warning("env %s raised on %r", runtime.context.env.name, action.text, exc_info=True)
        post = obs.model_copy(update={"info": {**obs.info, "env_error": err}, "reward": 0.0})
        return {
            "post": post,
            "step_error": err,
            "outcome": Outcome.error,
            "error": err,
            "timings": _add_time(state["timings"], env_s=time.perf_counter() - t),
        }
    return {"post": post, "timings": _add_time(state["timings"], env_s=time.perf_counter() - t)}


def record(state: AgentState) -> dict[str, Any]:
    """Append the experience tuple of this step to the history."""
    history = state["history"]
    action, post = state["action"], state["post"]
    assert action is not None and post is not None
    error = state.get("step_error")
    if error is None and state.get("decision_error"):
        error = f"policy fallback: {state['decision_error']}"
    step = Step(
        index=len(history),
        pre_state=state["obs"],
        action=action,
        post_state=post,
        reward=post.reward,
        done=post.state.done,
        timings=state["timings"],
        usage=state["usage"],
        error=error,
        retrieved=state["retrieved"],
        memory_prompt=state.get("memory_prompt", ""),
    )
    return {"history": [*history, step]}


def replan_note(diagnosis: Diagnosis, history: list[Step]) -> str | None:
    """The replanning message for a stagnation/loop event (None when there is no such event)."""
    names = {c.cause for c in diagnosis.causes}
    stagnated = FailureCause.stagnation in names
    looping = diagnosis.looping or FailureCause.loop in names
    if not (stagnated or looping):
        return None
    parts = []
    if stagnated:
        parts.append(f"No progress for {diagnosis.steps_since_progress} steps")
    if looping:
        ev = next((c.evidence for c in diagnosis.causes if c.cause == FailureCause.loop), "")
        parts.append(f"you are repeating '{history[-1].action.text}'" + (f" ({ev})" if ev else ""))
    recent = list(dict.fromkeys(s.action.text for s in history[-6:] if s.action.text))
    causes = "; ".join(
        f"{c.cause.value}: {c.evidence}"
        for c in diagnosis.causes
        if c.cause not in (FailureCause.stagnation, FailureCause.loop)
    )
    tail = f" Causes: {causes}." if causes else ""
    avoid = ", ".join(f"'{a}'" for a in recent)
    return (
        f"{'; '.join(parts)}; try a different approach: do not repeat {avoid}; pick an action that"
        f" changes the state towards the goal.{tail}"
    )


def diagnose(state: AgentState, runtime: Runtime[AgentContext]) -> dict[str, Any]:
    """Fill the step's diagnosis (the hook's, else the rule diagnoser's) and plan replanning."""
    ctx = runtime.context
    history = state["history"]
    step = history[-1]
    hooked = ctx.hooks.diagnose(step, history[:-1])
    # The rule diagnoser always sees every step, so its detectors stay consistent even when
    # the hook answers only for some steps.
    rules = ctx.diagnoser.observe(step)
    diagnosis = hooked if hooked is not None else rules
    timings = state["timings"].model_copy(update={"total_s": time.perf_counter() - state["t0"]})
    step = step.model_copy(update={"diagnosis": diagnosis, "timings": timings})
    history = [*history[:-1], step]
    note = replan_note(diagnosis, history)
    return {"history": history, "obs": step.post_state, "carry_notes": [note] if note else []}


# --------------------------------------------------------------------------- routing


def _route_start(state: AgentState, runtime: Runtime[AgentContext]) -> Literal["observe", "__end__"]:
    if state["obs"].state.done or runtime.context.max_steps <= 0:
        return END
    return "observe"


def _route_guard(state: AgentState) -> Literal["plan", "env_step", "record"]:
    if state.get("outcome") == Outcome.error or state.get("post") is not None:
        return "record"  # policy raised, or blocked for the last time
    if state.get("blocked"):
        return "plan"
    return "env_step"


def _route_next(state: AgentState, runtime: Runtime[AgentContext]) -> Literal["observe", "__end__"]:
    if state.get("outcome") == Outcome.error or state["obs"].state.done:
        return END
    if len(state["history"]) >= runtime.context.max_steps:
        return END
    return "observe"


def agent_graph_builder() -> StateGraph:
    """The uncompiled graph, for users who want to add nodes or edges before compiling."""
    g = StateGraph(AgentState, context_schema=AgentContext)
    g.add_node("observe", observe)
    g.add_node("retrieve", retrieve)
    g.add_node("plan", plan)
    g.add_node("guard", guard)
    g.add_node("env_step", env_step)
    g.add_node("record", record)
    g.add_node("diagnose", diagnose)
    g.add_conditional_edges(START, _route_start)
    g.add_edge("observe", "retrieve")
    g.add_edge("retrieve", "plan")
    g.add_edge("plan", "guard")
    g.add_conditional_edges("guard", _route_guard)
    g.add_edge("env_step", "record")
    g.add_edge("record", "diagnose")
    g.add_conditional_edges("diagnose", _route_next)
    return g


def build_agent_graph(**compile_kwargs: Any) -> Any:
    """The compiled agent graph (``compile_kwargs`` go to ``StateGraph.compile``, e.g. a checkpointer).

    Run it with ``graph.invoke(initial_state(task, obs), {"recursion_limit": recursion_limit(n)},
    context=AgentContext(env, policy, hooks, max_steps=n))``; :func:`run_episode` does all that.
    """
    return agent_graph_builder().compile(**compile_kwargs)


@lru_cache(maxsize=1)
def _default_graph() -> Any:
    return build_agent_graph()


def recursion_limit(max_steps: int) -> int:
    """The LangGraph recursion limit that lets ``max_steps`` steps run, re-asks included."""
    return _NODES_PER_STEP * max(max_steps, 1) + 5


def initial_state(task: Task, obs: Observation) -> AgentState:
    """The graph input for an episode that starts at ``obs``."""
    return {
        "task": task,
        "obs": obs,
        "history": [],
        "carry_notes": [],
        "replanning": False,
        "outcome": None,
        "error": None,
    }


# --------------------------------------------------------------------------- episodes


def _final_outcome(state: AgentState, max_steps: int) -> Outcome:
    if state.get("outcome") == Outcome.error:
        return Outcome.error
    last = state["obs"].state
    if last.won:
        return Outcome.success
    if last.done:
        return Outcome.failure
    return Outcome.step_limit if len(state.get("history") or []) >= max_steps else Outcome.failure


def error_diagnosis(message: str, cause: FailureCause = FailureCause.env_error) -> Diagnosis:
    """The episode diagnosis of an episode that failed before (or outside of) any step."""
    evidence = " ".join(message.split())[:300]
    return Diagnosis(
        step_index=-1,
        causes=[CauseEvidence(cause=cause, evidence=evidence)],
        root_cause=f"{cause.value}: {evidence}",
    )


def run_episode(
    env: Env,
    policy: Policy,
    task: Task | str,
    *,
    hooks: AgentHooks | None = None,
    max_steps: int = 50,
    arm: str = "",
    namespace: str = "default",
    run_id: str | None = None,
    seed: int | None = None,
    graph: Any = None,
) -> Trajectory:
    """Run one episode through the agent graph and return its trajectory (never raises for env or
    policy failures: they are recorded, with ``outcome=error``).

    ``seed`` is recorded on the trajectory; policies seed themselves from their own spec.
    ``graph`` lets a caller pass a graph built with :func:`build_agent_graph` (default: a shared one).
    """
    hooks = hooks if hooks is not None else NoHooks()
    graph = graph if graph is not None else _default_graph()
    task_id = task.id if isinstance(task, Task) else task
    traj = Trajectory(
        namespace=namespace,
        run_id=run_id,
        task_id=task_id,
        env=env.name,
        policy=getattr(policy, "name", type(policy).__name__),
        arm=arm,
        seed=seed,
        metadata={"max_steps": max_steps},
    )
    t_reset = time.perf_counter()
    try:
        obs = env.reset(task)
    except Exception as e:
        # A wrong task id or a bad env option is the user's to fix: raise it; a crash is recorded.
        if isinstance(e, EvolveError) and not isinstance(e, EnvCrashed):
            raise
        msg = str(e) if isinstance(e, EnvCrashed) else f"{type(e).__name__}: {e}"
        traj.outcome = Outcome.error
        traj.metadata["error"] = f"EnvCrashed: {msg}"
        traj.diagnosis = error_diagnosis(traj.metadata["error"])
        return traj
    traj.metadata["reset_s"] = round(time.perf_counter() - t_reset, 4)
    if not isinstance(task, Task):
        current = getattr(env, "current_task", None)
        task = current if isinstance(current, Task) else Task(id=task_id, env=env.name)
    if not task.goal and obs.goal:
        task = task.model_copy(update={"goal": obs.goal})
    traj.split, traj.goal = task.split, task.goal or obs.goal
    traj.max_score = obs.state.max_score

    state: AgentState = initial_state(task, obs)
    try:
        privileged = env.privileged() if getattr(policy, "needs_privileged", False) else None
        policy.reset(task, privileged)
        hooks.on_episode_start(task, obs)
        ctx = AgentContext(
            env=env,
            policy=policy,
            hooks=hooks,
            max_steps=max_steps,
            diagnoser=RuleDiagnoser(max_score=obs.state.max_score),
        )
        config = {"recursion_limit": recursion_limit(max_steps)}
        # Stream the state so that an unexpected failure mid-graph keeps every step taken so far.
        for values in graph.stream(state, config, context=ctx, stream_mode="values"):
            state = values
    except Exception as e:  # noqa: BLE001 - a bug in hooks/policy must not lose the episode
        log.warning("episode %s failed outside env/policy", task_id, exc_info=True)
        kind = "PolicyError" if isinstance(e, PolicyError) else type(e).__name__
        state = {**state, "outcome": Outcome.error, "error": f"{kind}: {e}"}

    traj.steps = list(state.get("history") or [])
    traj.outcome = _final_outcome(state, max_steps)
    last = traj.steps[-1].post_state.state if traj.steps else obs.state
    traj.score = last.score
    traj.max_score = last.max_score if last.max_score is not None else traj.max_score
    if state.get("error"):
        traj.metadata["error"] = state["error"]
    traj.diagnosis = episode_diagnosis(traj, step_limit=max_steps)
    error = traj.metadata.get("error")
    if error and not any(s.error for s in traj.steps):
        # Failed outside any step (policy.reset, a hook): say so in the episode diagnosis.
        if error.startswith("PolicyError"):
            traj.diagnosis.causes.append(CauseEvidence(cause=FailureCause.policy_error, evidence=error[:300]))
        traj.diagnosis.root_cause = traj.diagnosis.root_cause or error[:300]
    try:
        hooks.on_episode_end(traj)
    except Exception:  # noqa: BLE001 - the trajectory is complete; a hook bug must not lose it
        log.warning("hooks.on_episode_end failed for %s", task_id, exc_info=True)
    return traj
