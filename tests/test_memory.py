"""EvolveMemory and RawTrajectoryMemory in the loop: retrieval cut-off, enforcement, macros, stats,
the real agent graph, and a few real TextWorld games."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from test_skills import NAMES, CautiousRandom, ChestWorld, gold, play, run_loop

from evolve.diagnose import RuleDiagnoser
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
    Skill,
    Split,
    Step,
    Task,
)
from evolve.skills import EvolveMemory, RawTrajectoryMemory, distill_snapshot, usage_from_trajectories
from evolve.skills.memory import MemoryConfig
from evolve.skills.predicates import FactBase, match_conditions
from evolve.skills.retrieval import GoalTracker

UNLOCK = Skill(
    name="unlock {obj1} with {obj2}",
    steps=["unlock {obj1} with {obj2}"],
    preconditions=["locked({obj1})", "in({obj2}, I)", "match({obj2}, {obj1})", "at({obj1}, {room})"],
    verification=["not locked({obj1})"],
    tags=["atomic", "cue:unlock"],
    status=KnowledgeStatus.active,
)
MACRO = Skill(
    name="unlock then open",
    steps=["unlock {obj1} with {obj2}", "open {obj1}"],
    preconditions=["locked({obj1})", "in({obj2}, I)", "match({obj2}, {obj1})"],
    verification=["open({obj1})"],
    tags=["macro", "cue:unlock", "cue:open"],
    status=KnowledgeStatus.active,
)
NO_OPEN_LOCKED = Guardrail(
    root_cause=FailureCause.precondition_unmet,
    forbidden_action=r"open\s+(?P<obj1>.+?)",
    trigger=["locked({obj1})"],
    scope=GuardrailScope.subgoal,
    status=KnowledgeStatus.active,
)


def _focus_skill(kind: str) -> Skill:
    """ScienceWorld's decisive step as a learned skill: ``focus on {obj1}`` when ``kind({obj1})``."""
    return Skill(
        name="focus on {obj1}",
        steps=["focus on {obj1}"],
        preconditions=[f"{kind}({{obj1}})"],
        verification=["score increased"],
        tags=["atomic", "cue:focus"],
        status=KnowledgeStatus.active,
    )


def _test_task(i: int = 0):
    env = ChestWorld()
    task = env.tasks("test")[i]
    return env, task, NAMES[Split.test][i]


def test_existential_matching_and_cutoff() -> None:
    facts = FactBase(["locked(crate)", "in(card, I)", "match(card, crate)", "at(crate, hall)"])
    assert match_conditions(UNLOCK.preconditions, facts, {"room": "hall"})[:2] == (4, 4)
    sat, tot, b = match_conditions(UNLOCK.preconditions, FactBase(["locked(crate)", "at(crate, hall)"]))
    assert (sat, tot) == (2, 4) and b["obj1"] == "crate"
    assert match_conditions(["not open({obj1})"], facts, {"obj1": "crate"})[0] == 1


def test_retrieval_applicability_cutoff_and_logs() -> None:
    env, task, (k, c, _) = _test_task()
    mem = EvolveMemory([UNLOCK])
    obs = env.reset(task)
    mem.on_episode_start(task, obs)
    ctx = mem.retrieve(obs, [])
    # The key is not held yet: 3 of 4 preconditions fail -> not applicable, not injected, but logged.
    assert ctx.skills == []
    logs = mem._ep.logs
    assert logs and not logs[0].applicable and not logs[0].injected and "not admissible" in logs[0].reason
    obs = env.step(f"take {k}")
    ctx = mem.retrieve(
        obs, [Step(index=0, pre_state=env.reset(task), action=Action(text=f"take {k}"), post_state=obs)]
    )
    assert [s.id for s in ctx.skills] == [UNLOCK.id]
    assert ctx.skills[0].steps == [f"unlock {c} with {k}"]  # bound to this state's objects
    assert any(f"unlock {c} with {k}" in n for n in ctx.notes)
    injected = [r for r in mem._ep.logs if r.injected]
    assert injected and injected[-1].applicable and injected[-1].score > 0.3


def test_check_action_enforces_guardrails_with_scope() -> None:
    env, task, (k, c, _) = _test_task()
    mem = EvolveMemory([NO_OPEN_LOCKED])
    obs = env.reset(task)
    mem.on_episode_start(task, obs)
    v = mem.check_action(Action(text=f"open {c}"), obs, MemoryContext())
    assert not v.allowed and v.guardrail_id == NO_OPEN_LOCKED.id and "locked" in v.reason
    assert mem.check_action(Action(text=f"take {k}"), obs, MemoryContext()).allowed
    for a in [f"take {k}", f"unlock {c} with {k}"]:
        obs = env.step(a)
    assert mem.check_action(Action(text=f"open {c}"), obs, MemoryContext()).allowed  # trigger gone
    # Task scope: a guardrail for other goals does not apply here.
    other = NO_OPEN_LOCKED.model_copy(update={"scope": GuardrailScope.task, "task_pattern": r"(?=.*\bbake)"})
    mem2 = EvolveMemory([other])
    obs = env.reset(task)
    mem2.on_episode_start(task, obs)
    assert mem2.check_action(Action(text=f"open {c}"), obs, MemoryContext()).allowed
    # Candidates are not enforced by a memory built for active knowledge.
    cand = NO_OPEN_LOCKED.model_copy(update={"status": KnowledgeStatus.candidate})
    assert EvolveMemory([cand]).check_action(Action(text=f"open {c}"), obs, MemoryContext()).allowed


def test_propose_runs_a_macro_and_abandons_it_when_a_step_fails() -> None:
    env, task, (k, c, _) = _test_task()
    mem = EvolveMemory([MACRO])
    obs0 = env.reset(task)
    obs = env.step(f"take {k}")
    hist = [Step(index=0, pre_state=obs0, action=Action(text=f"take {k}"), post_state=obs)]
    mem.on_episode_start(task, obs0)
    ctx = mem.retrieve(obs, hist)
    a = mem.propose(obs, hist, ctx)
    assert a is not None and a.text == f"unlock {c} with {k}"
    assert a.source == ActionSource.skill and a.skill_id == MACRO.id
    post = env.step(a.text)
    hist.append(Step(index=1, pre_state=obs, action=a, post_state=post))
    ctx = mem.retrieve(post, hist)
    b = mem.propose(post, hist, ctx)
    assert b is not None and b.text == f"open {c}" and "step 2/2" in b.thought
    # The second step fails (say the env refused): the macro is abandoned with a note.
    hist.append(Step(index=2, pre_state=post, action=b, post_state=post))
    ctx = mem.retrieve(post, hist)
    assert mem._ep.macro is None and any("abandoned" in n for n in ctx.notes)
    # ... and the failed action is not proposed again in that state, nor allowed by the episodic guard.
    again = mem.propose(post, hist, ctx)
    assert again is None or again.text != f"open {c}"
    assert not mem.check_action(Action(text=f"open {c}"), post, ctx).allowed


def test_a_skill_the_env_refused_is_not_replayed_with_the_next_binding_in_the_same_state() -> None:
    """ScienceWorld lists ``focus on bee 0`` .. ``bee 4`` as valid and rejects each: after the
    skill's step fails, the skill is neither executed nor recommended again until the state changes."""
    focus = _focus_skill("is_animal")
    bees = [f"bee {i}" for i in range(3)]
    goal = "Your task is to find the animal with the shortest life span. Focus on the animal."

    def obs(location: str) -> Observation:
        facts = [f"is_animal({b})" for b in bees]
        state = EnvState(location=location, visible=["bee hive", *bees], facts=facts, score=0.0)
        acts = ["look around", "teleport to outside", *(f"focus on {b}" for b in bees)]
        return Observation(
            text=f"This room is called the {location}.", state=state, goal=goal, admissible_actions=acts
        )

    mem = EvolveMemory([focus])
    task = Task(id="sw-lifespan", env="scienceworld", goal=goal)
    o0 = obs("greenhouse")
    mem.on_episode_start(task, o0)
    ctx = mem.retrieve(o0, [])
    a = mem.propose(o0, [], ctx)
    assert a is not None and a.text == "focus on bee 0" and a.skill_id == focus.id
    refused = Observation(text="No known action matches that input.", state=o0.state, goal=goal,
                          admissible_actions=o0.admissible_actions)  # fmt: skip
    hist = [Step(index=0, pre_state=o0, action=a, post_state=refused)]
    hist[0].diagnosis = RuleDiagnoser().observe(hist[0])
    assert FailureCause.invalid_action in hist[0].diagnosis.cause_names()
    ctx = mem.retrieve(refused, hist)
    assert mem.propose(refused, hist, ctx) is None  # not `focus on bee 1`
    assert not any("applies now" in n for n in ctx.notes)
    assert "focus on bee 0" in ctx.blocked  # the refused binding is listed as refused
    # A step that was accepted but changed nothing ("that doesn't fit", TextWorld's wrong key) is
    # not a refusal: the skill tries its next binding.
    other = EvolveMemory([focus])
    other.on_episode_start(task, o0)
    a = other.propose(o0, [], other.retrieve(o0, []))
    nothing = refused.model_copy(update={"text": "Nothing happens."})
    tried = [Step(index=0, pre_state=o0, action=a, post_state=nothing)]
    tried[0].diagnosis = RuleDiagnoser().observe(tried[0])
    assert FailureCause.invalid_action not in tried[0].diagnosis.cause_names()
    b = other.propose(nothing, tried, other.retrieve(nothing, tried))
    assert b is not None and b.text == "focus on bee 1"
    # The model moves on (the state changes): the skill may act again there.
    moved = obs("outside")
    hist.append(Step(index=1, pre_state=refused, action=Action(text="teleport to outside"), post_state=moved))
    ctx = mem.retrieve(moved, hist)
    b = mem.propose(moved, hist, ctx)
    assert b is not None and b.skill_id == focus.id


def test_a_skill_is_bound_to_an_action_the_guardrails_allow() -> None:
    """The paint task's skill said "do 'focus on paint in cup ...'" and the next note said a
    guardrail refused it: a refused binding is dropped and the skill binds its next option."""
    focus = _focus_skill("is_substance")
    no_paint = NO_OPEN_LOCKED.model_copy(
        update={
            "id": "guard-no-paint",
            "root_cause": FailureCause.lost,
            "forbidden_action": r"focus\s+on\s+(?P<obj1>.+?)",
            "trigger": ["is_paint({obj1})"],
        }
    )
    goal = "Your task is to focus on a substance. First, focus on the substance near the red paint."
    facts = ["is_paint(red paint)", "is_substance(red paint)", "is_substance(water)"]
    o = Observation(
        text="This room is called the art studio.",
        state=EnvState(location="art studio", visible=["red paint", "water"], facts=facts),
        goal=goal,
        admissible_actions=["look around", "focus on red paint", "focus on water"],
    )
    task = Task(id="sw-paint", env="scienceworld", goal=goal)
    alone = EvolveMemory([focus])
    alone.on_episode_start(task, o)
    ctx = alone.retrieve(o, [])
    assert any("do 'focus on red paint'" in n for n in ctx.notes)  # the goal's words rank it first
    mem = EvolveMemory([focus, no_paint])
    mem.on_episode_start(task, o)
    ctx = mem.retrieve(o, [])
    assert not any("focus on red paint" in n for n in ctx.notes)
    assert ctx.skills and ctx.skills[0].steps == ["focus on water"]
    a = mem.propose(o, [], ctx)
    assert a is not None and a.text == "focus on water"
    assert mem.check_action(a, o, ctx).allowed


def test_goal_tracker_reopens_undone_subgoals() -> None:
    env, task, (k, c, _) = _test_task()
    tracker = GoalTracker(task.goal, {"pick", "tak", "unlock", "open", "recover"})
    first = tracker.pending[0]
    assert tracker.observe(f"take {k}", True, {"pick": 1.0}, [f"in({k}, I)"]) == first
    assert tracker.revalidate(FactBase([f"in({k}, I)"])) == []
    assert tracker.revalidate(FactBase([f"at({k}, hall)"])) == [first]  # dropped again: pending again
    assert tracker.pending[0] == first


def test_episode_end_updates_stats_and_logs() -> None:
    env, task, _ = _test_task()
    know = distill_snapshot([gold(ChestWorld(), t) for t in ChestWorld().tasks("train")[:2]])
    mem = EvolveMemory(know)
    traj = run_loop(env, CautiousRandom(0), task, mem)
    assert traj.success
    meta = traj.metadata["evolve"]
    assert meta["used"] and meta["proposed"] >= 1
    used = next(iter(meta["used"]))
    assert mem.usage[used][0] == 1 and mem.usage[used][1] == 1
    assert next(k for k in mem.skills if k.id == used).stats.uses == 1
    logs = mem.pop_retrieval_logs()
    assert logs and all(
        r.trajectory_id == traj.id and r.outcome and r.outcome.startswith("success") for r in logs
    )
    assert any("executed" in (r.outcome or "") for r in logs)
    assert mem.pop_retrieval_logs() == []
    assert usage_from_trajectories([traj])[used] == (1, 1, 0)


def test_factories_are_picklable() -> None:
    know = distill_snapshot([gold(ChestWorld(), ChestWorld().tasks("train")[0])])
    f = pickle.loads(pickle.dumps(EvolveMemory.factory(know, embedder="hash")))
    assert len(f().skills) == sum(isinstance(k, Skill) for k in know)
    r = pickle.loads(
        pickle.dumps(RawTrajectoryMemory.factory([gold(ChestWorld(), ChestWorld().tasks("train")[0])]))
    )
    assert len(r().records) == 1


def test_retrieval_logs_carry_query_rank_and_similarity() -> None:
    env, task, (k, c, _) = _test_task()
    other = NO_OPEN_LOCKED.model_copy(
        update={
            "id": "guard-other",
            "forbidden_action": r"drink\s+(?P<obj1>.+?)",
            "trigger": ["broken({obj1})"],
        }
    )
    mem = EvolveMemory([UNLOCK, MACRO, NO_OPEN_LOCKED, other])
    obs0 = env.reset(task)
    mem.on_episode_start(task, obs0)
    mem.retrieve(obs0, [])
    obs1 = env.step(f"take {k}")
    mem.retrieve(obs1, [Step(index=0, pre_state=obs0, action=Action(text=f"take {k}"), post_state=obs1)])
    logs = mem._ep.logs
    for step, obs in enumerate([obs0, obs1]):
        query = f"{task.goal}\n{obs.text}"
        sims = mem.index.similarities(query)
        skills = [r for r in logs if r.step_index == step and r.kind == "skill"]
        guards = [r for r in logs if r.step_index == step and r.kind == "guardrail"]
        # Every scored candidate of each kind is logged, ranked best first, with the query it ran on.
        assert [r.rank for r in skills] == [0, 1] and [r.rank for r in guards] == [0, 1]
        assert {r.knowledge_id for r in skills} == {UNLOCK.id, MACRO.id}
        assert {r.knowledge_id for r in guards} == {NO_OPEN_LOCKED.id, other.id}
        assert all(r.query == query for r in skills + guards)
        assert [r.score for r in skills] == sorted((r.score for r in skills), reverse=True)
        for r in skills:
            i = next(j for j, s in enumerate(mem.skills) if s.id == r.knowledge_id)
            assert r.similarity == pytest.approx(float(sims[i])) and 0.0 < r.similarity <= 1.0
        assert all(r.similarity is None for r in guards)  # guardrails are matched, not searched
        assert all(r.rerank_score is None for r in skills + guards)  # no reranker ran
    # Step 0: the card is not held, nothing applies; the locked crate makes the guardrail inject.
    step0 = {(r.kind, r.knowledge_id): r for r in logs if r.step_index == 0}
    assert not step0[("skill", UNLOCK.id)].injected and not step0[("skill", UNLOCK.id)].applicable
    assert (
        step0[("guardrail", NO_OPEN_LOCKED.id)].injected and step0[("guardrail", NO_OPEN_LOCKED.id)].rank == 0
    )
    assert not step0[("guardrail", other.id)].applicable and not step0[("guardrail", other.id)].injected
    # Step 1: with the card, both skills apply and are injected.
    step1 = [r for r in logs if r.step_index == 1 and r.kind == "skill"]
    assert all(r.injected and r.applicable for r in step1)
    # log_top caps the candidates logged per kind and step; injected ones are always logged.
    capped = EvolveMemory(
        [UNLOCK, MACRO, NO_OPEN_LOCKED, other], config=MemoryConfig(log_top=0, top_k_skills=1)
    )
    capped.on_episode_start(task, obs0)
    capped.retrieve(obs1, [Step(index=0, pre_state=obs0, action=Action(text=f"take {k}"), post_state=obs1)])
    assert [(r.kind, r.rank, r.injected) for r in capped._ep.logs] == [
        ("skill", 0, True),
        ("guardrail", 0, True),
    ]


def test_retrieval_logs_carry_the_rerankers_scores() -> None:
    class ByLength:
        def score(self, query: str, texts: list[str]) -> list[float]:
            return [float(len(t)) for t in texts]

    env, task, (k, _, _) = _test_task()
    mem = EvolveMemory([UNLOCK, MACRO])
    mem.index.hybrid.reranker = ByLength()
    obs0 = env.reset(task)
    mem.on_episode_start(task, obs0)
    obs1 = env.step(f"take {k}")
    mem.retrieve(obs1, [Step(index=0, pre_state=obs0, action=Action(text=f"take {k}"), post_state=obs1)])
    got = {r.knowledge_id: r.rerank_score for r in mem._ep.logs if r.kind == "skill"}
    assert got == {s.id: float(len(s.text())) for s in (UNLOCK, MACRO)}


def test_memory_config_is_a_retrieval_config() -> None:
    from evolve.skills.retrieval import RetrievalConfig

    cfg = MemoryConfig(min_score=0.5, propose=False)
    assert isinstance(cfg, RetrievalConfig) and cfg.min_score == 0.5 and not cfg.propose
    assert EvolveMemory([UNLOCK], config=cfg).index.config.min_score == 0.5
    with pytest.raises(ValueError):
        MemoryConfig(min_scor=0.5)  # typos are refused, not ignored


def test_raw_trajectory_baseline_replays_admissible_actions() -> None:
    env = ChestWorld()
    # A past episode on the *same* game: its actions are admissible here, so they replay.
    same = env.tasks("test")[0]
    past = gold(env, same)
    mem = RawTrajectoryMemory([past, play(env, env.tasks("train")[0], ["look"], ActionSource.policy)])
    assert len(mem.records) == 2
    traj = run_loop(env, CautiousRandom(3), same, mem)  # type: ignore[arg-type]
    assert traj.success and len(traj.steps) == 4
    assert traj.steps[0].action.source == ActionSource.skill and "replay" in traj.steps[0].action.thought
    obs = env.reset(same)
    mem.on_episode_start(same, obs)
    ctx = mem.retrieve(obs, [])
    assert ctx.examples and "take card" in ctx.examples[0]
    # Logs: the retrieved (top k) trajectories at every step; the others ranked, once per episode.
    one = RawTrajectoryMemory(mem.records, k=1)
    one.on_episode_start(same, obs)
    one.retrieve(obs, [])
    logs = one._ep.logs
    query = f"{same.goal}\n{obs.text[:400]}"
    assert [(r.rank, r.injected, r.knowledge_id) for r in logs] == [
        (0, True, past.id),
        (1, False, mem.records[1].id),
    ]
    assert all(r.query == query and r.similarity == r.score and r.rerank_score is None for r in logs)
    assert logs[0].similarity > logs[1].similarity
    one.retrieve(obs, [])
    assert [(r.rank, r.injected) for r in one._ep.logs[2:]] == [(0, True)]
    # On a game with other names nothing replays: raw trajectories do not transfer.
    other = env.tasks("test")[1]
    mem2 = RawTrajectoryMemory([past])
    obs = env.reset(other)
    mem2.on_episode_start(other, obs)
    assert mem2.propose(obs, [], mem2.retrieve(obs, [])) is None


def test_agent_graph_with_memory_beats_the_policy_alone() -> None:
    from evolve.agents.graph import run_episode

    env = ChestWorld(decoy=False)
    know = distill_snapshot([gold(env, t) for t in env.tasks("train")[:2]])
    base = evo = 0
    for task in env.tasks("test"):
        t0 = run_episode(env, CautiousRandom(0), task, max_steps=8)
        t1 = run_episode(env, CautiousRandom(0), task, hooks=EvolveMemory(know), max_steps=8)
        base += t0.success
        evo += t1.success
        assert t1.metadata["evolve"]["proposed"] >= 1
        assert any(s.action.source == ActionSource.skill for s in t1.steps)
    assert evo == 3 and evo > base


@pytest.mark.slow
def test_textworld_held_out_games_random_plus_memory_beats_random() -> None:
    """Knowledge from oracle demos on 5 train games; random policy on 3 unseen games, same seeds."""
    pytest.importorskip("textworld")
    from evolve.agents.graph import run_episode
    from evolve.agents.policies import make_policy
    from evolve.envs import make_env

    env = make_env("textworld", n_train=5, n_dev=0, n_test=3)
    try:
        oracle = make_policy({"kind": "oracle"})
        demos = [run_episode(env, oracle, t, max_steps=20) for t in env.tasks("train")]
        assert all(d.success for d in demos)
        know = distill_snapshot(demos)
        assert any(isinstance(k, Skill) for k in know)
        base = evo = 0
        for seed in (0, 1):
            for t in env.tasks("test"):
                r = run_episode(env, make_policy({"kind": "random", "seed": seed}), t, max_steps=40)
                e = run_episode(
                    env,
                    make_policy({"kind": "random", "seed": seed}),
                    t,
                    hooks=EvolveMemory(know),
                    max_steps=40,
                )
                base += r.success
                evo += e.success
                assert e.outcome != Outcome.error
        print(f"textworld held-out: random {base}/6, random + EvolveMemory {evo}/6")
        # Deterministic (fixed games and seeds). Measured 0/6 vs 4/6 here (seeds 0-3: 9/12; the
        # random policy never redraws an action the memory refuses in that state, so one seed's
        # episodes move with any change to the refusals: two seeds keep the test about the memory),
        # and 5% vs 85% on 60 held-out episodes in bench/evolution.py: a robust, strict gain.
        assert evo > base and evo >= 4
    finally:
        env.close()


def test_from_store_takes_a_snapshot_of_active_knowledge(tmp_path: Path) -> None:
    from evolve.stores import ExperienceStore, HashingEmbedder

    with ExperienceStore(tmp_path / "s.duckdb", embedder=HashingEmbedder(64)) as store:
        store.upsert_skills([UNLOCK, MACRO.model_copy(update={"status": KnowledgeStatus.candidate})])
        store.upsert_guardrails([NO_OPEN_LOCKED])
        mem = EvolveMemory.from_store(store)
        assert [s.id for s in mem.skills] == [UNLOCK.id] and [g.id for g in mem.guardrails] == [
            NO_OPEN_LOCKED.id
        ]
        env, task, _ = _test_task()
        traj = run_loop(env, CautiousRandom(1), task, mem)
        # Seeded policy, deterministic game: the memory executed the unlock skill and the episode
        # ran out of steps (the guardrail never had to refuse anything).
        assert traj.outcome == Outcome.step_limit
        assert traj.metadata["evolve"]["used"] == {UNLOCK.id: "skill"}
        assert mem.flush(store) > 0
        assert store.retrieval_logs(trajectory_id=traj.id)
        stats = store.get_knowledge(UNLOCK.id).stats
        assert (stats.uses, stats.successes, stats.failures) == (1, 0, 1)
        assert store.knowledge_versions(UNLOCK.id) == [1, 2]  # usage is written as a new version
        assert store.get_knowledge(NO_OPEN_LOCKED.id).stats.uses == 0
        assert store.get_knowledge(MACRO.id).stats.uses == 0  # a candidate: never retrieved
        assert mem.usage == {}  # flushed
