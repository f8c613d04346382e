"""Distillation, guardrails, the harmful-guardrail cross-check, merge/versions and probation.

``ChestWorld`` is a deterministic one-room game (take the key, unlock the chest, open it, take the
prize; drinking the poison loses) whose object names change with the task, so that skills must
generalise names into slots to transfer. ``tests/test_memory.py`` imports it from here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from evolve.agents.base import Decision
from evolve.diagnose import diagnose_trajectory
from evolve.errors import EnvError
from evolve.schema import (
    Action,
    ActionSource,
    EnvState,
    FailureCause,
    Guardrail,
    GuardrailScope,
    KnowledgeStatus,
    MemoryContext,
    Observation,
    Outcome,
    Privileged,
    Skill,
    Split,
    Step,
    Task,
    Trajectory,
)
from evolve.skills import (
    EvolveMemory,
    distill,
    distill_guardrails,
    distill_knowledge,
    distill_skills,
    harmful_reason,
    merge_knowledge,
    probation,
    run_probation,
)
from evolve.skills.distill import refuses
from evolve.stores import ExperienceStore, HashingEmbedder

NAMES = {
    Split.train: [
        ("key", "chest", "coin"),
        ("passkey", "safe", "ring"),
        ("latchkey", "locker", "gem"),
        ("keycard", "box", "pearl"),
    ],
    Split.dev: [
        ("fob", "trunk", "watch"),
        ("skeleton key", "strongbox", "crown"),
        ("brass key", "casket", "medal"),
    ],
    Split.test: [("card", "crate", "idol"), ("iron key", "vault", "scroll"), ("tag", "cabinet", "badge")],
}


class ChestWorld:
    """Take the key, unlock the chest (+1), open it, take the prize (+1, won). ``drink poison`` loses."""

    name = "chest"

    def __init__(self, decoy: bool = False) -> None:
        self.decoy = decoy
        self.facts: set[str] = set()
        self.k = self.c = self.z = ""
        self.score = 0.0
        self.over = self.won = self.lost = False
        self.task: Task | None = None

    def tasks(self, split: Split | str) -> list[Task]:
        split = Split(split)
        return [
            Task(id=f"chest-{split.value}-{i}", env=self.name, split=split, goal=self._goal(*n))
            for i, n in enumerate(NAMES[split])
        ]

    def _goal(self, k: str, c: str, z: str) -> str:
        decoy = "Never drink the poison. " if self.decoy else ""
        return f"{decoy}First, pick up the {k}. Then unlock the {c} with the {k}. Open the {c}. Finally recover the {z} from the {c}."

    def reset(self, task: Task | str) -> Observation:
        tid = task if isinstance(task, str) else task.id
        _, split, i = tid.split("-")
        self.k, self.c, self.z = NAMES[Split(split)][int(i)]
        self.task = Task(id=tid, env=self.name, split=Split(split), goal=self._goal(self.k, self.c, self.z))
        self.facts = {"at(P, hall)", f"at({self.k}, hall)", f"at({self.c}, hall)", f"locked({self.c})",
                      f"match({self.k}, {self.c})", f"in({self.z}, {self.c})", "at(poison, hall)", "in(note, I)"}  # fmt: skip
        self.score, self.over, self.won, self.lost = 0.0, False, False, False
        return self._obs("You are in the hall.")

    def _has(self, f: str) -> bool:
        return f in self.facts

    def admissible(self) -> list[str]:
        k, c, z = self.k, self.c, self.z
        out = ["look", "inventory", "drink poison", f"examine {c}"]
        if self._has(f"at({k}, hall)"):
            out.append(f"take {k}")
        if self._has(f"in({k}, I)"):
            out.append(f"drop {k}")
            if self._has(f"locked({c})"):
                out.append(f"unlock {c} with {k}")
            if self._has(f"closed({c})"):
                out.append(f"lock {c} with {k}")
        if not self._has(f"open({c})"):
            out.append(f"open {c}")
        else:
            out.append(f"close {c}")
            if self._has(f"in({z}, {c})"):
                out.append(f"take {z} from {c}")
        return out

    def step(self, action: str) -> Observation:
        if self.over:
            return self._obs("The game is over.")
        a = " ".join(action.lower().split())
        k, c, z = self.k, self.c, self.z
        if a not in self.admissible():
            return self._obs("You can't do that.")
        text = "Nothing happens."
        if a == f"take {k}":
            self.facts -= {f"at({k}, hall)"}
            self.facts |= {f"in({k}, I)"}
            text = f"You take the {k}."
        elif a == f"drop {k}":
            self.facts -= {f"in({k}, I)"}
            self.facts |= {f"at({k}, hall)"}
            text = f"You drop the {k}."
        elif a == f"unlock {c} with {k}":
            self.facts -= {f"locked({c})"}
            self.facts |= {f"closed({c})"}
            self.score += 1
            text = f"You unlock the {c}."
        elif a == f"lock {c} with {k}":
            self.facts -= {f"closed({c})"}
            self.facts |= {f"locked({c})"}
            text = f"You lock the {c}."
        elif a == f"open {c}":
            if self._has(f"locked({c})"):
                text = f"You have to unlock the {c} first."
            else:
                self.facts -= {f"closed({c})"}
                self.facts |= {f"open({c})"}
                text = f"You open the {c}."
        elif a == f"close {c}":
            self.facts -= {f"open({c})"}
            self.facts |= {f"closed({c})"}
            text = f"You close the {c}."
        elif a == f"take {z} from {c}":
            self.facts -= {f"in({z}, {c})"}
            self.facts |= {f"in({z}, I)"}
            self.score += 1
            self.won = self.over = True
            text = f"You take the {z}. You won!"
        elif a == "drink poison":
            self.facts -= {"at(poison, hall)"}
            self.lost = self.over = True
            text = "You drink the poison and die. You lost!"
        elif a.startswith("examine"):
            text = f"The {c} looks sturdy."
        return self._obs(text)

    def _obs(self, text: str) -> Observation:
        inv = sorted(f[3:].split(",")[0] for f in self.facts if f.endswith(", I)") and f.startswith("in("))
        state = EnvState(
            location="hall",
            inventory=inv,
            visible=sorted({self.k, self.c, "poison"} - set(inv)),
            score=self.score,
            max_score=2.0,
            done=self.over,
            won=self.won,
            lost=self.lost,
            facts=sorted(self.facts),
        )
        goal = self.task.goal if self.task else ""
        return Observation(
            text=text, state=state, goal=goal, admissible_actions=None if self.over else self.admissible()
        )

    def privileged(self) -> Privileged:
        if self.task is None:
            raise EnvError("reset first")
        k, c, z = self.k, self.c, self.z
        return Privileged(
            gold_actions=[f"take {k}", f"unlock {c} with {k}", f"open {c}", f"take {z} from {c}"]
        )

    def close(self) -> None:
        pass


class CautiousRandom:
    """A seeded random policy that never drinks the poison (so the base arm can win)."""

    needs_privileged = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.name = "cautious-random"
        self.rng = random.Random(seed)

    def reset(self, task: Task, privileged: Privileged | None = None) -> None:
        self.rng = random.Random(f"{self.seed}:{task.id}")

    def act(self, obs: Observation, history: list[Step], memory: MemoryContext) -> Decision:
        opts = [a for a in obs.admissible_actions or ["look"] if a != "drink poison"]
        return Decision(action=Action(text=self.rng.choice(opts)))


def play(
    env: ChestWorld, task: Task | str, actions: list[str], source: ActionSource = ActionSource.oracle
) -> Trajectory:
    """A scripted episode, diagnosed, as the agent would have recorded it."""
    obs = env.reset(task)
    t = env.task
    assert t is not None
    steps = []
    for i, a in enumerate(actions):
        post = env.step(a)
        steps.append(
            Step(
                index=i,
                pre_state=obs,
                action=Action(text=a, source=source),
                post_state=post,
                reward=post.state.score - obs.state.score,
                done=post.state.done,
            )
        )
        obs = post
        if post.state.done:
            break
    last = obs.state
    outcome = Outcome.success if last.won else Outcome.failure if last.lost else Outcome.step_limit
    traj = Trajectory(
        task_id=t.id,
        env=env.name,
        split=t.split,
        goal=t.goal,
        policy="scripted",
        outcome=outcome,
        score=last.score,
        max_score=2.0,
        steps=steps,
    )
    return diagnose_trajectory(traj)


def gold(env: ChestWorld, task: Task) -> Trajectory:
    env.reset(task)
    return play(env, task, env.privileged().gold_actions)


def run_loop(
    env: ChestWorld, policy: CautiousRandom, task: Task, hooks: EvolveMemory | None, max_steps: int = 15
) -> Trajectory:
    """The agent loop of ``evolve.agents.graph`` in miniature (propose, guard with re-asks, diagnose)."""
    from evolve.diagnose import RuleDiagnoser, episode_diagnosis

    obs = env.reset(task)
    t = env.task
    assert t is not None
    policy.reset(t)
    if hooks is not None:
        hooks.on_episode_start(t, obs)
    rules = RuleDiagnoser(max_score=2.0)
    hist: list[Step] = []
    for i in range(max_steps):
        mem = hooks.retrieve(obs, hist) if hooks else MemoryContext()
        action = hooks.propose(obs, hist, mem) if hooks else None
        post = None
        for _ in range(3):
            action = action or policy.act(obs, hist, mem).action
            verdict = hooks.check_action(action, obs, mem) if hooks else None
            if verdict is None or verdict.allowed:
                post = env.step(action.text)
                break
            action = None
        if post is None:
            post = obs.model_copy(update={"info": {"guardrail_blocked": "blocked"}})
            action = Action(text="look")
        step = Step(index=i, pre_state=obs, action=action, post_state=post, done=post.state.done)
        step.diagnosis = rules.observe(step)
        hist.append(step)
        obs = post
        if post.state.done:
            break
    last = obs.state
    outcome = Outcome.success if last.won else Outcome.failure if last.lost else Outcome.step_limit
    traj = Trajectory(
        task_id=t.id,
        env=env.name,
        split=t.split,
        goal=t.goal,
        outcome=outcome,
        score=last.score,
        max_score=2.0,
        steps=hist,
        seed=policy.seed,
    )
    traj.diagnosis = episode_diagnosis(traj)
    if hooks is not None:
        hooks.on_episode_end(traj)
    return traj


@pytest.fixture
def store(tmp_path: Path) -> ExperienceStore:
    s = ExperienceStore(tmp_path / "store.duckdb", embedder=HashingEmbedder(128))
    yield s
    s.close()


def _skill(skills: list[Skill], steps: list[str]) -> Skill:
    found = [s for s in skills if s.steps == steps]
    assert found, f"no skill {steps}; have {[s.steps for s in skills]}"
    return found[0]


# --------------------------------------------------------------------------- skills


def test_distill_generalises_across_instances() -> None:
    env = ChestWorld()
    t0, t1 = env.tasks("train")[:2]
    a, b = gold(env, t0), gold(env, t1)
    assert a.success and b.success
    skills = distill_skills([a, b])
    unlock = _skill(skills, ["unlock {obj1} with {obj2}"])
    # Two episodes with different names pool into one skill whose slots record both.
    assert set(unlock.provenance) == {a.id, b.id}
    assert unlock.slots["obj1"] == ["chest", "safe"] and unlock.slots["obj2"] == ["key", "passkey"]
    assert set(unlock.preconditions) >= {"locked({obj1})", "in({obj2}, I)", "match({obj2}, {obj1})"}
    assert "not locked({obj1})" in unlock.verification and "closed({obj1})" in unlock.verification
    assert unlock.status == KnowledgeStatus.candidate and unlock.signature
    assert "cue:pick" not in unlock.tags and "cue:unlock" in unlock.tags
    take = _skill(skills, ["take {obj1}"])
    assert "cue:pick" in take.tags  # "pick up the key": how goals ask for it, learned from the goal text
    # The whole successful segment is a macro with consistent slots across its steps.
    macros = [s for s in skills if "macro" in s.tags]
    assert any(s.steps == ["open {obj1}", "take {obj2} from {obj1}"] for s in macros)
    assert any(s.steps == ["take {obj1}", "unlock {obj2} with {obj1}"] for s in macros)


def test_compaction_drops_detours_and_noise() -> None:
    env = ChestWorld()
    task = env.tasks("train")[0]
    traj = play(
        env, task, ["look", "take key", "drop key", "examine chest", "take key", "unlock chest with key"]
    )
    macro = [s for s in distill_skills([traj]) if "macro" in s.tags]
    # take/drop/take collapses to one take; look and examine changed nothing.
    assert [m.steps for m in macro] == [["take {obj1}", "unlock {obj2} with {obj1}"]]


def test_partial_success_yields_skills_but_not_from_the_failed_tail() -> None:
    env = ChestWorld()
    task = env.tasks("train")[0]
    traj = play(env, task, ["take key", "unlock chest with key", "drink poison"], source=ActionSource.policy)
    assert traj.outcome == Outcome.failure and traj.score == 1
    skills = distill_skills([traj])
    assert {tuple(s.steps) for s in skills} >= {("take {obj1}",), ("unlock {obj1} with {obj2}",)}
    assert not any("drink" in " ".join(s.steps) for s in skills)
    guards, _ = distill_guardrails([traj])
    lost = [g for g in guards if g.root_cause == FailureCause.lost]
    assert lost and lost[0].scope == GuardrailScope.task and lost[0].task_pattern
    assert refuses(lost[0], "drink poison", traj.steps[2].pre_state.state, traj.goal)


# --------------------------------------------------------------------------- guardrails


def test_guardrail_from_precondition_failure_contrasts_with_successes() -> None:
    env = ChestWorld()
    tasks = env.tasks("train")
    fail = play(env, tasks[0], ["open chest", "take key"], source=ActionSource.policy)
    assert FailureCause.precondition_unmet in {c.cause for c in fail.steps[0].diagnosis.causes}
    ok = [gold(env, t) for t in tasks[1:3]]
    guards, _ = distill_guardrails([fail, *ok])
    g = next(g for g in guards if g.root_cause == FailureCause.precondition_unmet)
    # Successful opens happened on closed chests, so what tells the failure apart is locked(...).
    assert g.trigger == ["locked({obj1})"]
    assert g.scope == GuardrailScope.subgoal
    locked = env.reset(env.tasks("test")[0]).state  # unseen names: the rule generalises
    assert refuses(g, "open crate", locked)
    opened = env.reset(env.tasks("test")[0])
    for a in ["take card", "unlock crate with card"]:
        opened = env.step(a)
    assert not refuses(g, "open crate", opened.state)
    assert not refuses(g, "take card", locked)


def test_guardrail_from_invalid_action_keeps_the_room() -> None:
    env = ChestWorld()
    trajs = [
        play(
            env,
            t,
            ["go west", "take " + t.goal.split("pick up the ")[1].split(".")[0]],
            source=ActionSource.policy,
        )
        for t in env.tasks("train")[:2]
    ]
    guards, _ = distill_guardrails(trajs)
    g = next(g for g in guards if g.root_cause == FailureCause.invalid_action)
    assert g.trigger == ["at(P, hall)"] and refuses(g, "go west", trajs[0].steps[0].pre_state.state)
    assert not refuses(g, "go east", trajs[0].steps[0].pre_state.state)


def test_harmful_guardrail_is_never_distilled() -> None:
    env = ChestWorld()
    tasks = env.tasks("train")
    # Three episodes where examining the chest changed nothing ...
    noisy = [
        play(env, t, ["examine " + NAMES[Split.train][i][1]] * 2, source=ActionSource.policy)
        for i, t in enumerate(tasks[:3])
    ]
    # ... but a successful demo needed that very action (an oracle step).
    k, c, z = NAMES[Split.train][3]
    demo = play(
        env,
        tasks[3],
        [f"take {k}", f"examine {c}", f"unlock {c} with {k}", f"open {c}", f"take {z} from {c}"],
    )
    assert demo.success
    kept, rejected = distill_guardrails([*noisy, demo])
    assert not any("examine" in g.forbidden_action for g in kept)
    assert any("examine" in g.forbidden_action and "needed" in why for g, why in rejected)
    unchecked, _ = distill_guardrails([*noisy, demo], check_harm=False)
    assert any("examine" in g.forbidden_action for g in unchecked)  # the cross-check is what removed it
    # Direct check: forbidding 'take .*' would refuse a needed step; 'drink .*' would not.
    take_all = Guardrail(root_cause=FailureCause.invalid_action, forbidden_action="take .*")
    drink = Guardrail(root_cause=FailureCause.lost, forbidden_action=r"drink\s+(?P<obj1>.+?)")
    assert harmful_reason(take_all, [demo]) is not None
    assert harmful_reason(drink, [demo]) is None


def _reference_refuses(g: Guardrail, action: str, state: EnvState, goal: str) -> bool:
    """The enforcement rule written out independently (what ``distill.refuses`` and
    ``KnowledgeIndex.check`` each implemented before they shared one enforcer)."""
    import re

    from evolve.skills.predicates import FactBase, match_conditions

    try:
        rx = re.compile(g.forbidden_action, re.IGNORECASE)
    except re.error:
        return False
    m = rx.fullmatch(" ".join(action.lower().split()))
    if m is None:
        return False
    if g.scope == GuardrailScope.task and g.task_pattern:
        try:
            if not re.search(g.task_pattern, goal, re.IGNORECASE):
                return False
        except re.error:
            return False
    b = {k: " ".join(v.lower().split()) for k, v in m.groupdict().items() if v is not None}
    sat, tot, _ = match_conditions(g.trigger, FactBase(state.facts), b)
    return sat == tot


def test_one_enforcer_behind_distillation_and_retrieval() -> None:
    from evolve.skills.enforce import GuardrailEnforcer
    from evolve.skills.retrieval import KnowledgeIndex

    def guard(pattern: str, trigger: list[str], **kw: object) -> Guardrail:
        return Guardrail(
            root_cause=kw.pop("cause", FailureCause.precondition_unmet),
            forbidden_action=pattern,
            trigger=trigger,
            status=KnowledgeStatus.active,
            **kw,
        )

    guards = [
        guard(r"open\s+(?P<obj1>.+?)", ["locked({obj1})"], scope=GuardrailScope.subgoal),
        guard(r"unlock\s+(?P<obj1>.+?)\s+with\s+(?P<obj2>.+?)", ["not in({obj2}, I)"]),
        guard(r"drink\s+(?P<obj1>.+?)", [], cause=FailureCause.lost, task_pattern=r"(?=.*\bprize\b)"),
        guard(r"go\s+west", ["at(P, hall)"], scope=GuardrailScope.subgoal),
        guard(r"take (", []),  # corrupt action pattern: refuses nothing, crashes nothing
        guard(r"look", [], task_pattern=r"(unclosed"),  # corrupt task pattern: out of scope everywhere
        # Task scope without a task pattern: every task.
        guard(r"eat\s+(?P<obj1>.+?)", ["edible({obj1})"], scope=GuardrailScope.task),
    ]
    states = [
        EnvState(location="hall", facts=["at(P, hall)", "locked(crate)", "at(crate, hall)"]),
        EnvState(location="hall", facts=["at(P, hall)", "in(card, I)", "at(crate, hall)", "edible(apple)"]),
        EnvState(location="attic", facts=["at(P, attic)", "in(card, I)", "locked(Crate)"]),
    ]
    actions = [
        "open crate",
        "Open  Crate",
        "open card",
        "unlock crate with card",
        "unlock crate with key",
        "drink poison",
        "go west",
        "go east",
        "take card",
        "look",
        "eat apple",
        "eat card",
        "",
    ]
    goals = ["Open the crate and take the prize.", "Just look around.", ""]
    one_each = [(g, GuardrailEnforcer([g])) for g in guards]
    index = KnowledgeIndex([], guards)
    assert [g.id for g in index.guardrails] == [g.id for g in guards if g.forbidden_action != "take ("]
    refusals = 0
    for st in states:
        obs = Observation(text="", state=st, goal="")
        for goal in goals:
            for a in actions:
                expected = [g.id for g in guards if _reference_refuses(g, a, st, goal)]
                # distill.refuses (one guardrail) and the enforcer agree with the written-out rule ...
                assert [g.id for g in guards if refuses(g, a, st, goal)] == expected, (a, goal)
                assert [g.id for g, e in one_each if e.refuses(a, st, goal)] == expected, (a, goal)
                # ... and so does the agent's check: the first refusing guardrail in order wins.
                verdict = index.check(a, obs, goal)
                assert verdict.allowed == (not expected), (a, goal)
                assert verdict.guardrail_id == (expected[0] if expected else None)
                refusals += bool(expected)
    assert refusals >= 10  # the grid exercises refusals, not only passes
    locked, unlocked = states[0], states[1]
    enforcer = GuardrailEnforcer(guards)
    assert enforcer.refuses("open crate", locked) and not enforcer.refuses("open crate", unlocked)
    assert enforcer.refuses("drink poison", locked, "take the prize") and not enforcer.refuses(
        "drink poison", locked, "look around"
    )
    verdict = enforcer.check("open crate", locked)
    assert verdict.guardrail_id == guards[0].id and "locked(crate)" in verdict.reason


# --------------------------------------------------------------------------- merge + versions


def test_merge_dedup_version_bump_and_rollback(store: ExperienceStore) -> None:
    env = ChestWorld()
    t0, t1, t2 = env.tasks("train")[:3]
    first = gold(env, t0)
    skills, guards = distill_knowledge([first], store=store)
    assert skills and all(s.version == 1 for s in skills)
    unlock = _skill(store.skills(), ["unlock {obj1} with {obj2}"])
    n_items = len(store.skills())
    # The same procedures seen again in two more episodes: merged, not duplicated.
    again, _ = distill_knowledge([gold(env, t1), gold(env, t2)], store=store)
    assert len(store.skills()) == n_items
    merged = store.get_knowledge(unlock.id)
    assert isinstance(merged, Skill)
    assert merged.version == 2 and len(merged.provenance) == 3 and merged.parent_id == unlock.parent_id
    assert merged.slots["obj1"] == ["chest", "locker", "safe"]
    assert store.knowledge_versions(unlock.id) == [1, 2]
    back = store.rollback(unlock.id, 1)
    assert back.version == 3 and back.provenance == [first.id]
    assert store.get_knowledge(unlock.id).provenance == [first.id]


def test_anti_unification_merges_constant_words_into_lexical_slots() -> None:
    east = Skill(
        name="go east",
        steps=["go east"],
        verification=["moved"],
        signature="s",
        tags=["cue:head"],
        provenance=["t1"],
    )
    west = Skill(
        name="go west",
        steps=["go west"],
        verification=["moved"],
        signature="s",
        tags=["cue:venture"],
        provenance=["t2"],
    )
    eat = Skill(
        name="eat", steps=["eat {obj1}"], verification=["eaten({obj1})"], signature="x", provenance=["t3"]
    )
    drop = Skill(
        name="drop",
        steps=["drop {obj1}"],
        verification=["at({obj1}, {room})"],
        signature="x",
        provenance=["t4"],
    )
    res = merge_knowledge([east], [west, eat, drop], embedder=HashingEmbedder(256), threshold=0.5)
    go = next(k for k in res.items if k.id == east.id)
    assert isinstance(go, Skill)
    assert go.steps == ["go {w1}"] and go.slots["w1"] == ["east", "west"] and go.version == 2
    assert set(go.tags) >= {"cue:head", "cue:venture"} and set(go.provenance) == {"t1", "t2"}
    assert res.merged_into == {west.id: east.id}
    # A different verb is a different procedure, whatever the signature.
    assert {k.id for k in res.added} == {eat.id, drop.id}


# --------------------------------------------------------------------------- probation


def _runner(env: ChestWorld, seeds: tuple[int, ...] = (0, 1)):
    def runner(knowledge: list[Skill | Guardrail], tasks: list[Task]) -> list[Trajectory]:
        out = []
        for t in tasks:
            for s in seeds:
                hooks = EvolveMemory(knowledge, embedder="hash")
                out.append(run_loop(env, CautiousRandom(s), t, hooks))
        return out

    return runner


def test_probation_promotes_helpful_and_retires_a_planted_harmful_skill(store: ExperienceStore) -> None:
    env = ChestWorld(decoy=True)  # goals say "Never drink the poison": a wrong skill matches them
    train = env.tasks("train")
    good = [gold(env, t) for t in train[:3]]
    # A crafted trajectory that claims drinking the poison is how this goal is won.
    k, c, z = NAMES[Split.train][3]
    planted = play(env, train[3], [f"take {k}"], source=ActionSource.policy)
    post = planted.steps[0].post_state
    forged_post = post.model_copy(
        update={
            "state": post.state.model_copy(
                update={
                    "facts": [f for f in post.state.facts if f != "at(poison, hall)"] + ["drunk(poison)"],
                    "won": True,
                    "done": True,
                    "score": 2.0,
                }
            )
        }
    )
    planted.steps.append(
        Step(index=1, pre_state=post, action=Action(text="drink poison"), post_state=forged_post)
    )
    planted.outcome, planted.score = Outcome.success, 2.0
    planted = diagnose_trajectory(planted)
    skills, guards = distill_knowledge([*good, planted], store=store)
    drink = [s for s in skills if any(st.startswith("drink") for st in s.steps)]
    assert drink, "the planted skill should be distilled as a candidate"
    dev = env.tasks("dev")
    summary = run_probation(store, [*skills, *guards], _runner(env), dev)
    for s in drink:
        assert store.get_knowledge(s.id).status != KnowledgeStatus.active
    assert any(store.get_knowledge(s.id).status == KnowledgeStatus.retired for s in drink)
    assert summary["retired"] >= 1
    # With the harmful skill out of the way, a second round promotes the helpful ones.
    cands = [*store.skills(status="candidate"), *store.guardrails(status="candidate")]
    run_probation(store, cands, _runner(env), dev)
    active = store.skills(status="active")
    assert any(s.steps == ["unlock {obj1} with {obj2}"] for s in active)
    assert not any(any(st.startswith("drink") for st in s.steps) for s in active)
    unlock = next(s for s in active if s.steps == ["unlock {obj1} with {obj2}"])
    assert unlock.stats.probation_runs >= 1 and unlock.stats.effect is not None and unlock.stats.effect > 0


def test_probation_batches_and_unused_candidates_stay_candidate() -> None:
    env = ChestWorld()
    know = distill([gold(env, t) for t in env.tasks("train")[:2]])
    unused = Skill(name="dance", steps=["dance {obj1}"], verification=["danced({obj1})"])
    res = probation([*know.skills, unused], _runner(env, seeds=(0,)), env.tasks("dev"))
    assert res.evaluations == 2  # a helpful batch needs no ablation
    assert res.effect_all is not None and res.effect_all > 0
    assert unused.id in res.kept and unused.id not in res.promoted
    assert res.promoted


# --------------------------------------------------------------------------- bad input


def test_malformed_input_never_corrupts_the_knowledge_base(store: ExperienceStore) -> None:
    env = ChestWorld()
    good = gold(env, env.tasks("train")[0])
    weird = play(
        env,
        env.tasks("train")[1],
        ["take (passkey", "examine safe", "examine safe"],
        source=ActionSource.policy,
    )
    weird.steps[0].action.text = "take ((passkey] {evil}"
    broken = good.model_dump()
    broken["steps"][0]["pre_state"] = "not an observation"
    skills, guards = distill_knowledge([good, weird, {"garbage": 1}, "not json", broken, 42], store=store)
    assert skills  # the good trajectory still taught something
    for g in store.guardrails():
        __import__("re").compile(g.forbidden_action)  # every stored pattern compiles
    for s in store.skills():
        assert not any("{evil}" in st for st in s.steps)
    n = len(store.skills()) + len(store.guardrails())
    store.close()
    reopened = ExperienceStore(store.path, embedder=HashingEmbedder(128))
    assert len(reopened.skills()) + len(reopened.guardrails()) == n
    reopened.close()
    # A corrupt pattern in a snapshot is skipped by the memory, never raised or enforced.
    bad = Guardrail(root_cause=FailureCause.no_effect, forbidden_action="([", status=KnowledgeStatus.active)
    mem = EvolveMemory([bad])
    obs = env.reset(env.tasks("test")[0])
    assert mem.check_action(Action(text="(["), obs, MemoryContext()).allowed


def test_distilling_the_same_experience_twice_is_idempotent(store: ExperienceStore) -> None:
    env = ChestWorld()
    trajs = [gold(env, t) for t in env.tasks("train")[:2]]
    distill_knowledge(trajs, store=store)
    before = {k.id: k.version for k in [*store.skills(), *store.guardrails()]}
    again, _ = distill_knowledge(trajs, store=store)
    assert again == []  # nothing new to put on probation
    assert {k.id: k.version for k in [*store.skills(), *store.guardrails()]} == before


def test_knowledge_ids_come_from_content_so_runs_repeat() -> None:
    """The same experience distills to the same ids (the store lists by id; retrieval breaks ties by
    id), different namespaces or contents to different ones."""
    env = ChestWorld()
    tasks = env.tasks("train")
    fail = play(env, tasks[0], ["open chest", "take key"], source=ActionSource.policy)
    ok = [gold(env, t) for t in tasks[1:3]]
    first = distill_skills(ok), distill_guardrails([fail, *ok])[0]
    again = distill_skills(ok), distill_guardrails([fail, *ok])[0]
    ids = [k.id for k in [*first[0], *first[1]]]
    assert ids == [k.id for k in [*again[0], *again[1]]]
    assert len(set(ids)) == len(ids)  # distinct items, distinct ids
    assert all(i.startswith(("skill-", "guard-")) for i in ids)
    other_ns = [k.id for k in distill_skills(ok, namespace="other")]
    assert not set(other_ns) & set(ids)


def test_a_goal_naming_a_more_specific_thing_does_not_ground_the_plainer_action() -> None:
    """Issue 18's evolve arm: a 'focus on {obj1}' skill fired 'focus on paint in cup containing
    yellow paint' for "focus on the violet paint" (the word 'paint' matched) and lost the episode."""
    from evolve.skills.retrieval import grounding
    from evolve.text import content_stems

    def g(action: str, sentence: str) -> float:
        return grounding(action, set(content_stems(sentence)), {}, sentence_text=sentence, specific=True)

    violet = "When you are done, focus on the violet paint."
    assert g("focus on paint in cup containing yellow paint", violet) == 0.0
    assert g("focus on violet paint", violet) == 1.0
    # The object the sentence names, with all its words, still grounds.
    assert g("focus on sodium chloride", "First, focus on the sodium chloride.") == 1.0
    assert g("focus on thing", "First, focus on the thing.") == 1.0
    # The other box of a two-box choice no longer shares the credit of 'box'.
    green = "If the sodium chloride is electrically conductive, place it in the green box."
    assert g("move sodium chloride to green box", green) > g("move sodium chloride to red box", green) > 0
    # An action naming more than the goal does is fine; a mention without a determiner says
    # nothing about modifiers ("create violet paint" grounds "mix violet paint" as before).
    assert g("unlock wooden door with rusty key", "Unlock the wooden door with the key.") > 0.8
    assert g("take potato", "Your task is to take the red potato from the fridge.") == 0.0
    assert g("mix violet paint", "Your task is to use chemistry to create violet paint.") > 0
    # Skill relevance (not specific) still credits the shared head noun.
    loose = grounding(
        "take potato", set(content_stems("Take the red potato.")), {}, sentence_text="Take the red potato."
    )
    assert loose > 0


def test_goal_asks_for_the_named_object_or_the_named_class() -> None:
    """The question behind ``not asked_by_goal({obj1})`` guardrails, on ScienceWorld goals."""
    from evolve.skills.grounding import goal_asks
    from evolve.skills.predicates import FactBase

    thermo = (
        "Your task is to measure the temperature of unknown substance B, which is located around "
        "the kitchen. First, focus on the thermometer. Next, focus on the unknown substance B."
    )
    facts = FactBase(
        ["type_door(art studio door)", "is_device(thermometer)", "is_substance(unknown substance b)"]
    )
    assert goal_asks("focus on thermometer", thermo, facts)
    assert goal_asks("focus on thermometer in inventory", thermo, facts)
    assert goal_asks("focus on unknown substance B in inventory", thermo, facts)
    assert not goal_asks("focus on art studio door", thermo, facts)
    assert not goal_asks("focus on kitchen", thermo, facts)  # named, but not where it asks to focus
    assert not goal_asks("focus on unknown substance", thermo, facts)  # the goal names substance B
    which = "First, focus on the thermometer, which is on the table. Then, focus on the lamp that works."
    assert goal_asks("focus on thermometer", which, facts)  # a clause after a name is no modifier
    assert goal_asks("focus on lamp", which, facts)

    paint = (
        "Your task is to use chemistry to create orange paint. When you are done, focus on the orange paint."
    )
    facts = FactBase(["is_fruit(orange)", "is_substance(orange paint)"])
    assert goal_asks("focus on orange paint", paint, facts)
    assert not goal_asks("focus on orange", paint, facts)  # "orange" only modifies "paint" there

    plant = "Your task is to find a(n) plant. First, focus on the thing. Then, move it to the red box in the living room."
    facts = FactBase(["is_plant(apple tree)", "is_location(living room)", "type_room(living room)"])
    assert goal_asks("focus on apple tree", plant, facts)  # by its class: "the thing"
    assert not goal_asks("focus on living room", plant, facts)  # "room" is no class the task wants
    assert not goal_asks("pick up apple tree", plant, facts)  # no sentence asks to pick up

    non_living = plant.replace("a(n) plant", "a(n) non-living thing")
    facts = FactBase(["is_living_thing(dove)", "is_container(glass jar)"])
    assert goal_asks("focus on glass jar", non_living, facts)
    assert goal_asks("focus on agent", non_living, facts)  # nothing says it is a living thing
    assert not goal_asks("focus on dove", non_living, facts)
