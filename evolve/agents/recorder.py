"""Record experience into an ``ExperienceStore``: from our agent, or from the user's own LangGraph graph.

* :class:`Recorder` buffers trajectories and writes them in batches (one DuckDB transaction per
  batch); as a context manager it flushes on exit, exceptions included.
* :meth:`Recorder.episode` gives an :class:`EpisodeRecorder` for hand-driven loops:
  ``ep.step(pre, action, post, reward, done)`` with observations as text or ``Observation``.
* :meth:`Recorder.node` gives a LangGraph node that records a step from the user's graph state.
* :meth:`Recorder.callback` gives a LangChain callback that attributes LLM token usage to steps.

Every recorded step gets a rule diagnosis, and every finished episode an episode diagnosis.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.runnables import RunnableConfig

from evolve.diagnose import RuleDiagnoser, episode_diagnosis
from evolve.schema import (
    Action,
    EnvState,
    Observation,
    Outcome,
    RetrievalLog,
    Split,
    Step,
    Timings,
    TokenUsage,
    Trajectory,
)
from evolve.stores import ExperienceStore


class UsageCallback(BaseCallbackHandler):
    """A LangChain callback summing token usage of LLM calls until the next recorded step takes it.

    Attribution assumes one episode runs at a time through the recorder that owns it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._pending = TokenUsage()

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        prompt = completion = 0
        for gens in getattr(response, "generations", None) or []:
            for gen in gens:
                meta = getattr(getattr(gen, "message", None), "usage_metadata", None)
                if meta:
                    prompt += int(meta.get("input_tokens", 0))
                    completion += int(meta.get("output_tokens", 0))
        if not (prompt or completion):
            # Older integrations report usage only in llm_output (OpenAI naming).
            usage = (getattr(response, "llm_output", None) or {}).get("token_usage") or {}
            prompt = int(usage.get("prompt_tokens", 0))
            completion = int(usage.get("completion_tokens", 0))
        with self._lock:
            self._pending = self._pending + TokenUsage(prompt_tokens=prompt, completion_tokens=completion)

    def take(self) -> TokenUsage:
        """The usage since the last call, resetting it."""
        with self._lock:
            usage, self._pending = self._pending, TokenUsage()
        return usage


def _as_action(action: Action | str) -> Action:
    return action if isinstance(action, Action) else Action(text=str(action))


class EpisodeRecorder:
    """Records the steps of one episode; :meth:`finish` hands the trajectory to its recorder.

    Text observations become ``Observation``s whose score is the cumulative reward, so the rule
    diagnoser still sees progress, stagnation and loops.
    """

    def __init__(self, recorder: Recorder, trajectory: Trajectory) -> None:
        self.recorder = recorder
        self.trajectory = trajectory
        self.finished = False
        self._diagnoser = RuleDiagnoser(max_score=trajectory.max_score)
        self._last: Observation | None = None
        self._total_reward = 0.0

    @property
    def steps(self) -> list[Step]:
        return self.trajectory.steps

    def _obs(
        self, obs: Observation | str | None, *, reward: float = 0.0, done: bool = False, pre: bool = True
    ) -> Observation:
        if isinstance(obs, Observation):
            return obs
        if obs is None:
            if self._last is None:
                raise ValueError("the first step of an episode needs its pre-observation")
            return self._last
        if pre and self._last is not None and self._last.text == obs:
            return self._last  # the same object as the previous post-state: stored once
        state = EnvState(score=self._total_reward, done=done, max_score=self.trajectory.max_score)
        return Observation(text=str(obs), state=state, goal=self.trajectory.goal, reward=reward)

    def step(
        self,
        pre: Observation | str | None,
        action: Action | str,
        post: Observation | str,
        reward: float | None = None,
        done: bool | None = None,
        *,
        usage: TokenUsage | None = None,
        error: str | None = None,
        timings: Timings | None = None,
        retrieved: Iterable[str] = (),
    ) -> Step:
        """Record one step (``pre=None`` reuses the previous post-observation) and diagnose it."""
        if self.finished:
            raise RuntimeError(f"episode {self.trajectory.task_id} is finished; open a new one")
        pre_obs = self._obs(pre)
        if reward is None:
            reward = post.reward if isinstance(post, Observation) else 0.0
        if done is None:
            done = post.state.done if isinstance(post, Observation) else False
        if not isinstance(post, Observation):
            self._total_reward += reward
        post_obs = self._obs(post, reward=reward, done=done, pre=False)
        if usage is None and self.recorder.usage_callback is not None:
            usage = self.recorder.usage_callback.take()
        step = Step(
            index=len(self.trajectory.steps),
            pre_state=pre_obs,
            action=_as_action(action),
            post_state=post_obs,
            reward=reward,
            done=done,
            usage=usage or TokenUsage(),
            error=error,
            timings=timings or Timings(),
            retrieved=list(retrieved),
        )
        step.diagnosis = self._diagnoser.observe(step)
        self.trajectory.steps.append(step)
        self._last = post_obs
        return step

    def finish(
        self, outcome: Outcome | str | None = None, score: float | None = None, **metadata: Any
    ) -> Trajectory:
        """Close the episode and queue it for the store.

        ``outcome`` defaults to: success when the last state is won, failure when it is lost or
        done with no reward, success when done with positive total reward (text-only episodes),
        step_limit when it never finished.
        """
        if self.finished:
            return self.trajectory
        t = self.trajectory
        last = t.steps[-1] if t.steps else None
        if outcome is None:
            if last is None:
                outcome = Outcome.failure
            elif last.post_state.state.won:
                outcome = Outcome.success
            elif last.post_state.state.lost:
                outcome = Outcome.failure
            elif last.done:
                outcome = Outcome.success if self._episode_score() > 0 else Outcome.failure
            else:
                outcome = Outcome.step_limit
        t.outcome = Outcome(outcome)
        t.score = score if score is not None else self._episode_score()
        if last is not None and last.post_state.state.max_score is not None:
            t.max_score = last.post_state.state.max_score
        t.metadata.update(metadata)
        t.diagnosis = episode_diagnosis(t, step_limit=t.metadata.get("max_steps"))
        self.finished = True
        self.recorder._finished(self)
        return t

    def _episode_score(self) -> float:
        if not self.trajectory.steps:
            return 0.0
        return self.trajectory.steps[-1].post_state.state.score

    def __enter__(self) -> EpisodeRecorder:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.finish(Outcome.error, error=f"{type(exc).__name__}: {exc}")
        else:
            self.finish()


class Recorder:
    """Buffers trajectories and writes them to an ``ExperienceStore`` in batches of ``batch_size``.

    ``store`` is a store or a path (a store opened from a path is closed with the recorder).
    Use it as a context manager, or call :meth:`close`, so the last partial batch is written.
    """

    def __init__(
        self,
        store: ExperienceStore | str | Path,
        namespace: str = "default",
        run_id: str | None = None,
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._owns_store = not isinstance(store, ExperienceStore)
        self.store = store if isinstance(store, ExperienceStore) else ExperienceStore(store, namespace)
        self.namespace = namespace
        self.run_id = run_id
        self.batch_size = batch_size
        self.usage_callback: UsageCallback | None = None
        self.written = 0
        """Trajectories written to the store so far."""
        self._buffer: list[Trajectory] = []
        self._logs: list[RetrievalLog] = []
        self._open: dict[str, EpisodeRecorder] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ batches

    def add(self, trajectory: Trajectory, retrieval_logs: Iterable[RetrievalLog] = ()) -> None:
        """Queue a finished trajectory (and its retrieval logs); writes a batch when one is full.

        Everything a recorder writes goes to its namespace; its run id fills a missing one.
        """
        with self._lock:
            if trajectory.namespace != self.namespace:
                trajectory.namespace = self.namespace
            if trajectory.run_id is None:
                trajectory.run_id = self.run_id
            self._buffer.append(trajectory)
            self._logs.extend(
                r if r.namespace == self.namespace else r.model_copy(update={"namespace": self.namespace})
                for r in retrieval_logs
            )
            if len(self._buffer) >= self.batch_size:
                self.flush()

    def extend(self, trajectories: Iterable[Trajectory]) -> None:
        for t in trajectories:
            self.add(t)

    @property
    def pending(self) -> int:
        """Trajectories queued but not yet written."""
        return len(self._buffer)

    def flush(self) -> int:
        """Write everything queued now, in one transaction per kind; returns trajectories written."""
        with self._lock:
            batch, logs = self._buffer, self._logs
            if not batch and not logs:
                return 0
            n = self.store.add_trajectories(batch) if batch else 0
            # Trajectories first: a log must never point at a trajectory that was not written.
            self.store.log_retrievals(logs)
            self._buffer, self._logs = [], []
            self.written += n
            return n

    def close(self, error: BaseException | None = None) -> None:
        """Finish open episodes (as errors when ``error`` is given), flush, release an owned store."""
        with self._lock:
            for ep in list(self._open.values()):
                if error is not None:
                    ep.finish(Outcome.error, error=f"{type(error).__name__}: {error}")
                else:
                    ep.finish()
            try:
                self.flush()
            finally:
                if self._owns_store:
                    self.store.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(error=exc)

    # ------------------------------------------------------------------ hand-driven episodes

    def episode(
        self,
        task_id: str,
        env: str = "custom",
        goal: str = "",
        *,
        split: Split | str = Split.train,
        policy: str = "",
        arm: str = "",
        seed: int | None = None,
        max_score: float | None = None,
        key: str | None = None,
        **metadata: Any,
    ) -> EpisodeRecorder:
        """Open an episode; ``key`` (default: the task id) names it among concurrently open ones."""
        key = key or task_id
        with self._lock:
            previous = self._open.get(key)
            if previous is not None:
                previous.finish()  # an episode re-opened under the same key ends the old one
            traj = Trajectory(
                namespace=self.namespace,
                run_id=self.run_id,
                task_id=task_id,
                env=env,
                split=Split(split),
                goal=goal,
                policy=policy,
                arm=arm,
                seed=seed,
                max_score=max_score,
                metadata=dict(metadata),
            )
            ep = EpisodeRecorder(self, traj)
            ep.trajectory.metadata.setdefault("recorder_key", key)
            self._open[key] = ep
            return ep

    def _finished(self, ep: EpisodeRecorder) -> None:
        with self._lock:
            key = ep.trajectory.metadata.get("recorder_key", ep.trajectory.task_id)
            if self._open.get(key) is ep:
                del self._open[key]
            self.add(ep.trajectory)

    # ------------------------------------------------------------------ the user's own graph

    def node(
        self,
        *,
        observation_key: str = "observation",
        action_key: str = "action",
        reward_key: str = "reward",
        done_key: str = "done",
        task_key: str = "task_id",
        goal_key: str = "goal",
        env: str = "custom",
        policy: str = "",
        split: Split | str = Split.train,
    ) -> Callable[[Mapping[str, Any], RunnableConfig], dict[str, Any]]:
        """A LangGraph node that records the user's graph as it runs.

        Wire it after the reset and after every env step (``reset -> record -> act -> env ->
        record -> ...``). A call whose state has no action opens an episode at
        ``state[observation_key]``; a call with an action records the step from the previous
        observation to this one. ``state[done_key]`` (or a done ``Observation``) finishes the
        episode; episodes still open when the recorder closes end as ``step_limit``. Episodes are
        keyed by the run's ``thread_id`` when set, else by ``state[task_key]``.
        """

        def record_step(state: Mapping[str, Any], config: RunnableConfig) -> dict[str, Any]:
            obs = state.get(observation_key)
            action = state.get(action_key)
            task_id = str(state.get(task_key) or "episode")
            key = str((config or {}).get("configurable", {}).get("thread_id") or task_id)
            ep = self._open.get(key)
            starting = action is None or action == ""
            if starting or ep is None:
                goal = state.get(goal_key) or (obs.goal if isinstance(obs, Observation) else "")
                max_score = obs.state.max_score if isinstance(obs, Observation) else None
                ep = self.episode(
                    task_id, env, goal, split=split, policy=policy, key=key, max_score=max_score
                )
                # Not wired after the reset: the start state is unknown, recorded as empty.
                ep._last = ep._obs(obs if starting and obs is not None else "")
                if starting:
                    return {}
            reward = state.get(reward_key)
            done = state.get(done_key)
            ep.step(
                None,
                action,
                obs if obs is not None else "",
                reward=float(reward) if reward is not None else None,
                done=bool(done) if done is not None else None,
            )
            if ep.steps[-1].done:
                ep.finish()
            return {}

        return record_step

    def callback(self) -> UsageCallback:
        """A LangChain callback (pass it in ``config={"callbacks": [...]}``) whose token usage the
        next recorded step takes."""
        if self.usage_callback is None:
            self.usage_callback = UsageCallback()
        return self.usage_callback
