"""On-policy rollouts: N environments stepped in lockstep by the model being trained.

Each step renders every live episode's prompt with the one prompt layout
(:func:`evolve.llm.prompts.build_messages`, the bytes a deployed policy would send), generates all
answers in **one batched call** of the live model (:func:`evolve.llm.hf.generate`), parses them
the way :class:`~evolve.agents.policies.hf_policy.HFPolicy` does and steps each env. What comes
back per turn is what the trainer needs: the prompt's token ids (the loss mask: prompts, hence
observations and tool outputs, take no loss), the answer's token ids, the student's log-probs of
them, the privileged context a teacher should see at that state (``privileged(...)``), the next
gold action when the env knows it, and who wrote the turn. Every episode is recorded to the store
through a :class:`~evolve.agents.recorder.Recorder` like any other (diagnosis, skills and the
eval see it), with ``arm="onpolicy"`` and the memory block on each step.

Teacher-turn mixing (the remedy for multi-turn drift in OPD papers and GKD's λ): with probability
``mix`` a live turn is written by ``teacher_act`` instead of the student; the env follows the
teacher's action, and the turn is marked ``source="teacher"``.

The KV cache: our layout re-renders a window of recent turns at each step (older ones are
summarised), so one step's prompt is not a prefix of the next one's and transformers cannot carry a
cache across turns; within a step the batch shares one ``generate`` call. vLLM's automatic prefix
caching (when vLLM is the engine) reuses the common system/task prefix.

Memory hooks here only *retrieve* (the student's prompt shows the memory block): macro execution
and guardrail vetoes would put actions in the trajectory the student did not choose, and on-policy
training must train on the student's own decisions.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from evolve.agents.base import AgentHooks
from evolve.agents.recorder import EpisodeRecorder, Recorder
from evolve.envs.base import Env
from evolve.llm import hf
from evolve.llm.prompts import PromptOptions, build_messages, fallback_command, parse_answer
from evolve.schema import Action, ActionSource, MemoryContext, Observation, Step, Task, TokenUsage

PrivilegedFn = Callable[[Env, Task, Observation, list[Step]], str]
"""``(env, task, obs, history) -> context`` the teacher sees at this state ('' = none)."""


@dataclass
class TeacherAnswer:
    """A turn written by the teacher: its text and its token ids in the student's tokenizer."""

    text: str
    token_ids: list[int]


TeacherActFn = Callable[[list[list[dict[str, str]]], list[str]], list[TeacherAnswer]]
"""``(student-view messages per turn, privileged context per turn) -> answers`` (one batch)."""


@dataclass
class Turn:
    """One decision of a rollout, ready to train on."""

    episode: int
    """Index of the rollout in the returned list."""
    step: int
    messages: list[dict[str, str]]
    """The student's view (what the policy was shown)."""
    prompt_ids: list[int]
    token_ids: list[int]
    """The answer's tokens (with the end-of-turn token when generated)."""
    logprobs: list[float]
    """The student's log-probs of ``token_ids`` at sampling time (empty for teacher turns)."""
    text: str
    action: str
    parsed: bool
    """The answer parsed to an admissible command (False: the env got a fallback)."""
    source: Literal["student", "teacher"] = "student"
    privileged: str = ""
    """What a privileged teacher sees at this state ('' when there is nothing)."""
    gold: str | None = None
    """The next gold action at this state, when the env tells it (``Privileged.notes`` / gold path)."""


@dataclass
class Rollout:
    task: Task
    turns: list[Turn] = field(default_factory=list)
    trajectory_id: str = ""
    success: bool = False
    score: float = 0.0


@dataclass
class _Slot:
    env: Env
    task: Task
    obs: Observation
    hooks: AgentHooks | None
    episode: EpisodeRecorder
    out: Rollout
    done: bool = False


def next_gold(env: Env) -> str | None:
    """The env's next winning command from the current state, when it tells one (TextWorld does)."""
    try:
        p = env.privileged()
    except Exception:  # noqa: BLE001 - an env without privileged info simply has no gold
        return None
    note = p.notes or ""
    if ":" in note:
        first = note.split(":", 1)[1].split(">")[0].strip()
        if first:
            return first
    return None


def rollout(
    model: Any,
    tokenizer: Any,
    envs: Sequence[Env],
    tasks: Sequence[Task],
    recorder: Recorder,
    *,
    max_turns: int = 20,
    temperature: float = 1.0,
    top_p: float | None = None,
    max_new_tokens: int = 64,
    seed: int | None = None,
    prompt: PromptOptions | None = None,
    hooks: Sequence[AgentHooks] | None = None,
    privileged: PrivilegedFn | None = None,
    teacher_act: TeacherActFn | None = None,
    mix: float = 0.0,
    gold: bool = False,
    policy_name: str = "student",
    split: str = "train",
    arm: str = "onpolicy",
) -> list[Rollout]:
    """Roll ``tasks[i]`` in ``envs[i]`` with the live ``model``, all envs in lockstep; see the module doc.

    ``hooks[i]`` (optional) retrieves the memory block shown in episode i's prompts. ``gold=True``
    records the env's next winning command per turn (:func:`next_gold`). The model's train/eval
    mode is left as the caller set it.
    """
    if len(envs) != len(tasks):
        raise ValueError(f"rollout needs one env per task, got {len(envs)} envs for {len(tasks)} tasks")
    if mix > 0 and teacher_act is None:
        raise ValueError("teacher-turn mixing (mix > 0) needs teacher_act")
    opts = prompt or PromptOptions(action_format="json")
    rng = random.Random(seed)
    slots: list[_Slot] = []
    for i, (env, task) in enumerate(zip(envs, tasks, strict=True)):
        obs = env.reset(task)
        h = hooks[i] if hooks else None
        if h is not None:
            h.on_episode_start(task, obs)
        ep = recorder.episode(
            task.id,
            env=task.env,
            goal=task.goal or obs.goal,
            split=split,
            policy=policy_name,
            arm=arm,
            seed=seed,
            max_score=obs.state.max_score,
            key=f"rollout-{seed}-{i}-{task.id}",
            max_steps=max_turns,
        )
        slots.append(_Slot(env, task, obs, h, ep, Rollout(task=task, trajectory_id=ep.trajectory.id)))

    for t in range(max_turns):
        live = [s for s in slots if not s.done]
        if not live:
            break
        memories = [s.hooks.retrieve(s.obs, s.episode.steps) if s.hooks else MemoryContext() for s in live]
        msgs = [
            build_messages(s.task.goal or s.obs.goal, s.obs, s.episode.steps, m, opts)
            for s, m in zip(live, memories, strict=True)
        ]
        contexts = [privileged(s.env, s.task, s.obs, s.episode.steps) if privileged else "" for s in live]
        golds = [next_gold(s.env) if gold else None for s in live]
        by_teacher = [mix > 0 and rng.random() < mix for _ in live]
        answers: dict[int, tuple[str, list[int], list[float], list[int], str]] = {}
        student_rows = [j for j, b in enumerate(by_teacher) if not b]
        if student_rows:
            gens = hf.generate(
                model,
                tokenizer,
                [msgs[j] for j in student_rows],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=None if seed is None else seed * 1_000_003 + t,
            )
            for j, g in zip(student_rows, gens, strict=True):
                answers[j] = (g.text, g.token_ids, g.logprobs, g.prompt_ids, "student")
        teacher_rows = [j for j, b in enumerate(by_teacher) if b]
        if teacher_rows:
            assert teacher_act is not None
            got = teacher_act([msgs[j] for j in teacher_rows], [contexts[j] for j in teacher_rows])
            for j, a in zip(teacher_rows, got, strict=True):
                answers[j] = (a.text, a.token_ids, [], hf.chat_prompt_ids(tokenizer, msgs[j]), "teacher")
        for j, s in enumerate(live):
            text, ids, lps, prompt_ids, source = answers[j]
            parsed = parse_answer(text, s.obs.admissible_actions)
            ok = parsed.command is not None
            command = parsed.command if ok else fallback_command(s.obs.admissible_actions)
            src = ActionSource.policy if ok else ActionSource.fallback
            action = Action(text=command, thought=parsed.thought, raw=text, source=src)
            post = s.env.step(command)
            usage = TokenUsage(prompt_tokens=len(prompt_ids), completion_tokens=len(ids))
            step = s.episode.step(s.obs, action, post, usage=usage, error=None if ok else parsed.problem)
            step.memory_prompt = memories[j].prompt_text()
            s.out.turns.append(
                Turn(
                    episode=slots.index(s),
                    step=t,
                    messages=msgs[j],
                    prompt_ids=list(prompt_ids),
                    token_ids=list(ids),
                    logprobs=list(lps),
                    text=text,
                    action=command,
                    parsed=ok,
                    source=source,  # type: ignore[arg-type]
                    privileged=contexts[j],
                    gold=golds[j],
                )
            )
            s.obs = post
            if post.done:
                s.done = True
    for s in slots:
        traj = s.episode.finish()
        if s.hooks is not None:
            s.hooks.on_episode_end(traj)
        s.out.success, s.out.score = traj.success, traj.score
    recorder.flush()
    return [s.out for s in slots]


__all__ = ["PrivilegedFn", "Rollout", "TeacherActFn", "TeacherAnswer", "Turn", "next_gold", "rollout"]
