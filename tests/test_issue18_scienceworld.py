"""Issue 18 on real ScienceWorld variations: a wrong ``focus on`` ends an episode, and the
knowledge that prevents it must generalise over what objects *are* (the engine's object classes,
as ``is_<category>`` / ``type_<class>`` facts), not over the names one variation happened to use.

* a guardrail learned from the random policy's fatal focus in one train variation fires on the
  analogous wrong objects of a held-out variation and leaves its living things alone, with an
  oracle demo to contrast with and without one (the goal says what is wanted);
* it is out of scope for the opposite task ("non-living thing");
* the oracle demo's decisive step binds to a living thing of the held-out variation, not to the
  demo's own animal.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from evolve.agents.graph import run_episode
from evolve.agents.policies import OraclePolicy, RandomPolicy
from evolve.envs import make_env
from evolve.envs.scienceworld_env import class_predicates
from evolve.schema import FailureCause, GuardrailScope, KnowledgeStatus, Observation, Task, Trajectory
from evolve.skills import EvolveMemory, distill
from evolve.skills.distill import goal_pattern
from evolve.skills.enforce import GuardrailEnforcer
from evolve.skills.predicates import FactBase, goal_kinds

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="ScienceWorld needs a Java runtime")

LIVING = "Your task is to find a(n) living thing. First, focus on the thing. Then, move it to the red box in the kitchen."
NON_LIVING = LIVING.replace("living thing", "non-living thing")


def test_class_predicates_and_goal_scope() -> None:
    assert class_predicates("scienceworld.objects.livingthing.animals.BlueJay") == [
        "is_living_thing",
        "is_animal",
        "type_blue_jay",
    ]
    assert class_predicates("scienceworld.objects.containers.furniture.BeeHive") == [
        "is_container",
        "is_furniture",
        "type_bee_hive",
    ]
    assert class_predicates("scienceworld.objects.portal.Door") == ["is_portal", "type_door"]
    assert class_predicates("scienceworld.objects.agent.Agent") == []
    assert goal_kinds(LIVING, ["living thing", "animal"]) == ({"living thing"}, set())
    assert goal_kinds(NON_LIVING, ["living thing"]) == (set(), {"living thing"})
    # A rule of one task type is never in scope for its opposite.
    assert re.search(goal_pattern(LIVING), LIVING) and not re.search(goal_pattern(LIVING), NON_LIVING)
    assert re.search(goal_pattern(NON_LIVING), NON_LIVING) and not re.search(goal_pattern(NON_LIVING), LIVING)


@pytest.fixture(scope="module")
def sw() -> Iterator[Any]:
    env = make_env(
        "scienceworld", task_names=["find-living-thing", "find-non-living-thing"], max_variations=40
    )
    yield env
    env.close()


@pytest.fixture(scope="module")
def experience(sw: Any) -> tuple[Trajectory, Trajectory]:
    """An oracle demo on train variation 0 and the random policy's fatal focus on variation 3."""
    demo = run_episode(sw, OraclePolicy(), "sw-find-living-thing-v0", max_steps=20)
    fail = run_episode(sw, RandomPolicy(seed=0), "sw-find-living-thing-v3", max_steps=12)
    assert demo.success
    last = fail.steps[-1]
    assert last.action.text.startswith("focus on") and last.post_state.state.lost  # a wrong focus
    return demo, fail


def _outside(sw: Any, task_id: str) -> Observation:
    sw.reset(task_id)
    return sw.step("teleport to outside")


def _living(obs: Observation) -> set[str]:
    return {a[0] for a in FactBase.from_state(obs.state).by_name.get("is_living_thing", [])}


def _focus_verdicts(guards: list, obs: Observation) -> tuple[list[str], list[str]]:
    enforcer = GuardrailEnforcer(guards)
    focus = [a for a in obs.admissible_actions or [] if a.startswith("focus on ")]
    refused = [a for a in focus if enforcer.refuses(a, obs.state, obs.goal)]
    return [a for a in focus if a not in refused], refused


@pytest.mark.parametrize("with_demo", [True, False], ids=["with-demo", "own-failure-only"])
def test_fatal_focus_guardrail_generalises_over_the_class(
    sw: Any, experience: tuple, with_demo: bool
) -> None:
    demo, fail = experience
    result = distill([demo, fail] if with_demo else [fail], namespace="t")
    guards = [
        g
        for g in result.guardrails
        if g.root_cause in (FailureCause.lost, FailureCause.regression)
        and g.forbidden_action.startswith("focus")
    ]
    assert guards, result.rejected
    # Two rules: the task type's, over classes, and the env-wide one, over what the goal asks for.
    asked = [g for g in guards if g.trigger == ["not asked_by_goal({obj1})"]]
    assert len(asked) == 1 and asked[0].scope == GuardrailScope.subgoal and not asked[0].task_pattern
    guards = [g for g in guards if g not in asked]
    assert guards and all(g.scope == GuardrailScope.task for g in guards)
    assert all(
        t.startswith("not is_living_thing(") or t.startswith("not is_animal(")
        for g in guards
        for t in g.trigger
    )

    # A held-out variation: other objects, other names.
    obs = _outside(sw, "sw-find-living-thing-v225")
    living = _living(obs)
    assert living
    allowed, refused = _focus_verdicts(guards, obs)
    assert allowed and all(a[len("focus on ") :] in living for a in allowed)  # living things stay allowed
    assert "focus on door to kitchen" in refused  # the analogous wrong object is refused
    assert len(refused) >= len(allowed)

    # The env-wide rule agrees here: the goal asks for a focus on a living thing.
    assert _focus_verdicts(asked, obs) == (allowed, refused)

    # Out of scope for the opposite task, where those same non-living objects are the answer; there
    # the env-wide rule refuses exactly the living things ("a(n) non-living thing").
    other = _outside(sw, "sw-find-non-living-thing-v225")
    assert not _focus_verdicts(guards, other)[1]
    ok, no = _focus_verdicts(asked, other)
    living_other = _living(other)
    assert ok and no and all(a[len("focus on ") :] in living_other for a in no)
    assert not any(a[len("focus on ") :] in living_other for a in ok)


def test_demo_skill_binds_the_goal_named_class_not_the_demo_object(sw: Any, experience: tuple) -> None:
    demo, _ = experience
    result = distill([demo], namespace="t")
    focus = [s for s in result.skills if s.steps == ["focus on {obj1}"]]
    assert focus and focus[0].preconditions == ["is_living_thing({obj1})"]
    demo_object = next(s.action.text for s in demo.steps if s.action.text.startswith("focus on"))[
        len("focus on ") :
    ]

    know = [k.model_copy(update={"status": KnowledgeStatus.active}) for k in result.skills]
    memory = EvolveMemory(know)
    obs = _outside(sw, "sw-find-living-thing-v226")
    memory.on_episode_start(Task(id="sw-find-living-thing-v226", env="scienceworld", goal=obs.goal), obs)
    action = memory.propose(obs, [], memory.retrieve(obs, []))
    assert action is not None and action.text.startswith("focus on ")
    target = action.text[len("focus on ") :]
    assert target in _living(obs) and target != demo_object
