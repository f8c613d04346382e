"""Rule diagnoser, detectors, segmentation and summaries on hand-built trajectories."""

from __future__ import annotations

import pytest

from evolve.diagnose import (
    LoopDetector,
    RuleDiagnoser,
    StagnationDetector,
    diagnose_trajectory,
    diff_states,
    segments,
    state_predicates,
    summarize_episode,
    summarize_segment,
)
from evolve.schema import (
    Action,
    ActionSource,
    EnvState,
    FailureCause,
    Observation,
    Outcome,
    Step,
    Trajectory,
)

KITCHEN = "-= Kitchen =-\nYou are in a kitchen. There is a fridge here. There is a locked door to the north."
PANTRY = "-= Pantry =-\nYou are in a pantry. Need an exit without a door? You should try going west."
KITCHEN_BACK = "-= Kitchen =-\nYou're in the kitchen. You need an unguarded exit? You should try going east."


def obs(
    text: str = "",
    loc: str | None = "kitchen",
    inv: tuple[str, ...] = (),
    vis: tuple[str, ...] = (),
    score: float = 0.0,
    **kw: object,
) -> Observation:
    state_keys = {"facts", "max_score", "won", "lost", "done"}
    state = EnvState(
        location=loc,
        inventory=list(inv),
        visible=list(vis),
        score=score,
        **{k: v for k, v in kw.items() if k in state_keys},
    )
    rest = {k: v for k, v in kw.items() if k not in state_keys}
    return Observation(text=text, state=state, **rest)


def mk_step(i: int, pre: Observation, action: str, post: Observation, **kw: object) -> Step:
    source = kw.pop("source", ActionSource.policy)
    return Step(index=i, pre_state=pre, action=Action(text=action, source=source), post_state=post, **kw)


def chain(start: Observation, moves: list[tuple[str, Observation]]) -> list[Step]:
    """Steps whose pre_state is the previous post_state, as a recorder writes them."""
    steps, pre = [], start
    for i, (action, post) in enumerate(moves):
        steps.append(mk_step(i, pre, action, post))
        pre = post
    return steps


def kitchen_episode() -> Trajectory:
    """Two subgoals reached, then a precondition, an invalid action, a look-loop and a walk-loop."""
    s0 = obs(KITCHEN, vis=("fridge", "door"), max_score=3)
    fridge_open = obs(
        "You open the fridge, revealing an apple.", vis=("fridge", "door", "apple"), max_score=3
    )
    has_apple = obs("You take the apple.", inv=("apple",), vis=("fridge", "door"), score=1, max_score=3)
    locked = has_apple.model_copy(update={"text": "You try to go north. The door is locked."})
    huh = has_apple.model_copy(update={"text": "I don't understand that."})
    look = has_apple.model_copy(update={"text": KITCHEN})
    ate = obs("You eat the apple. Delicious!", vis=("fridge", "door"), score=2, max_score=3)
    pantry = obs(PANTRY, loc="pantry", vis=("shelf",), score=2, max_score=3)
    back = obs(KITCHEN_BACK, vis=("fridge", "door"), score=2, max_score=3)
    steps = chain(
        s0,
        [
            ("open fridge", fridge_open),
            ("take apple", has_apple),
            ("go north", locked),
            ("xyzzy", huh),
            ("look", look),
            ("look", look),
            ("eat apple", ate),
            ("go east", pantry),
            ("go west", back),
            ("go east", pantry),
            ("go west", back),
        ],
    )
    return Trajectory(
        id="traj-kitchen",
        task_id="kitchen-1",
        env="textworld",
        goal="Eat the apple and leave through the north door.",
        outcome=Outcome.failure,
        score=2,
        max_score=3,
        steps=steps,
    )


# --------------------------------------------------------------------------- diff + predicates


def test_diff_states_is_ordered_set_difference_with_score_delta() -> None:
    pre = EnvState(location="a", inventory=["x", "y", "y"], visible=["v1", "v2"], facts=["f1"], score=1)
    post = EnvState(location="b", inventory=["z", "x", "w", "z"], visible=["v2"], facts=["f2", "f1"], score=3)
    d = diff_states(pre, post)
    assert (d.location_from, d.location_to) == ("a", "b")
    assert d.inventory_added == ["z", "w"]
    assert d.inventory_removed == ["y"]
    assert d.visible_added == [] and d.visible_removed == ["v1"]
    assert d.facts_added == ["f2"] and d.facts_removed == []
    assert d.score_delta == 2
    assert diff_states(pre, pre).empty


def test_state_predicates_prefers_facts_else_derives_location_and_inventory() -> None:
    assert state_predicates(EnvState(location="x", facts=["in(apple, fridge)"])) == ["in(apple, fridge)"]
    derived = state_predicates(EnvState(location="Kitchen", inventory=["Old Knife", "key"]))
    assert derived == ["at(kitchen)", "has(old knife)", "has(key)"]
    assert state_predicates(EnvState()) == []


# --------------------------------------------------------------------------- detectors


def test_stagnation_detector_fires_once_per_window_and_resets_on_progress() -> None:
    det = StagnationDetector(window=3)
    fired = [det.update(False) for _ in range(7)]
    assert fired == [False, False, True, False, False, True, False]
    assert det.active and det.steps_since_progress == 7
    assert "no progress for 6 steps" in det.evidence
    assert det.update(True) is False and not det.active and det.steps_since_progress == 0
    det.update(False)
    det.reset()
    assert det.steps_since_progress == 0


def test_loop_detector_finds_two_cycle_and_same_state_revisit() -> None:
    det = LoopDetector(window=8, min_repeats=2)
    moves = [("go north", "A"), ("go south", "B"), ("go north", "A"), ("go south", "B")]
    fired = [det.update(a, s) for a, s in moves]
    # Step 3 revisits A with the same action; step 4 completes the period-2 cycle.
    assert fired == [False, False, True, True]
    assert det.period == 2
    assert det.evidence == "cycle of period 2 repeated 2x: go north -> go south"

    det.reset()
    assert [det.update("look", "A"), det.update("look", "A")] == [False, True]
    assert det.period == 1


def test_loop_detector_ignores_same_action_in_new_states_and_respects_min_repeats() -> None:
    det = LoopDetector(window=8, min_repeats=2)
    assert not any(det.update("go east", f"room{i}") for i in range(6))
    det = LoopDetector(window=9, min_repeats=3)
    fired = [det.update(a, s) for a, s in [("n", "A"), ("s", "B")] * 3]
    assert fired == [False, False, False, False, True, True]
    assert det.period == 2
    with pytest.raises(ValueError):
        LoopDetector(window=4, min_repeats=1)


def test_loop_detector_forgets_keys_outside_window() -> None:
    det = LoopDetector(window=3, min_repeats=2)
    det.update("look", "A")
    for i in range(3):
        det.update("wait", f"S{i}")
    assert det.update("look", "A") is False


# --------------------------------------------------------------------------- rule diagnoser: one cause each


def diagnose_one(step: Step, **kw: object) -> list[FailureCause]:
    return [c.cause for c in RuleDiagnoser(**kw).observe(step).causes]


S = obs(KITCHEN)


@pytest.mark.parametrize(
    ("feedback", "expected"),
    [
        ("I don't understand that.", FailureCause.invalid_action),
        ("You can't see any such thing.", FailureCause.invalid_action),
        ("No known action matches that input.", FailureCause.invalid_action),
        ("That's not something you can eat.", FailureCause.invalid_action),
        ("It's not clear how to use an axe with that.", FailureCause.invalid_action),
        ("That's not a verb I recognise.", FailureCause.invalid_action),
        ("You can't go that way.", FailureCause.invalid_action),
        ("That's fixed in place.", FailureCause.invalid_action),
        ("What do you want to take?", FailureCause.invalid_action),
        (
            "Ambiguous request: Please enter the number for the action you intended",
            FailureCause.invalid_action,
        ),
        ("The door is locked.", FailureCause.precondition_unmet),
        ("The fridge is closed.", FailureCause.precondition_unmet),
        ("The door is not open.", FailureCause.precondition_unmet),
        ("The refrigerator isn't open.", FailureCause.precondition_unmet),
        ("You need to open the fridge first.", FailureCause.precondition_unmet),
        ("You can't slice the carrot without a knife.", FailureCause.precondition_unmet),
        ("Nothing happens.", FailureCause.no_effect),
        ("That's already open.", FailureCause.no_effect),
        ("The stove is already deactivated.", FailureCause.no_effect),
    ],
)
def test_feedback_text_gives_its_cause(feedback: str, expected: FailureCause) -> None:
    step = mk_step(0, S, "do it", obs(feedback))
    d = RuleDiagnoser().observe(step)
    assert d.cause_names() == [expected.value]
    assert feedback.split(".")[0][:20] in d.causes[0].evidence


def test_invalid_action_from_admissible_list() -> None:
    pre = obs(KITCHEN, admissible_actions=["go north", "open fridge", "look"])
    d = RuleDiagnoser().observe(mk_step(0, pre, "fly away", obs("You flap your arms.")))
    assert d.cause_names() == ["invalid_action"]
    assert d.causes[0].evidence == "'fly away' is not among the 3 admissible actions"
    # Case and spacing do not make an admissible action invalid.
    ok = RuleDiagnoser().observe(mk_step(0, pre, "Open  Fridge", obs("You open the fridge.", vis=("apple",))))
    assert ok.causes == []


def test_successful_actions_with_flavour_text_are_not_failures() -> None:
    # TextWorld room descriptions contain "need", "without" and "can't"; the move itself worked.
    assert diagnose_one(mk_step(0, S, "go east", obs(PANTRY, loc="pantry"))) == []
    # Inform's implicit action "(first taking the apple)" is no precondition failure.
    took = obs("(first taking the apple)\nYou eat the apple.", inv=(), score=1)
    assert diagnose_one(mk_step(0, obs(KITCHEN, inv=("apple",)), "eat apple", took)) == []
    # Failure words far down a long description are not the env's verdict on the action.
    long = "You open the box. Inside is a note. It says: you need to be brave. The door is locked."
    assert diagnose_one(mk_step(0, S, "open box", obs(long, vis=("note",)))) == []
    # Describing a closed thing is what examine is for.
    looks = obs("The refrigerator looks strong. It is closed.")
    assert diagnose_one(mk_step(0, S, "examine refrigerator", looks)) == []


def test_no_effect_rules_for_plain_and_information_actions() -> None:
    rules = RuleDiagnoser()
    first = rules.observe(mk_step(0, S, "look", obs(KITCHEN)))
    again = rules.observe(mk_step(1, obs(KITCHEN), "look", obs(KITCHEN)))
    assert first.causes == []  # an information action is no failure the first time
    assert again.cause_names() == ["no_effect", "loop"]
    # A plain action whose only answer repeats something already seen changed nothing.
    rules = RuleDiagnoser()
    rules.observe(mk_step(0, S, "push button", obs("Click.")))
    d = rules.observe(mk_step(1, obs("Click."), "pull lever", obs("Click.")))
    assert d.cause_names() == ["no_effect"]
    assert "seen before" in d.causes[0].evidence
    # A new answer is information, not a failure.
    assert diagnose_one(mk_step(0, S, "smell air", obs("It smells of bread."))) == []


def test_regression_lost_and_errors() -> None:
    pre = obs(KITCHEN, score=5)
    d = RuleDiagnoser().observe(mk_step(0, pre, "drop gem", obs("Dropped.", score=3, vis=("gem",))))
    assert d.cause_names() == ["regression"]
    assert d.causes[0].evidence == "score 5 -> 3 after 'drop gem'"
    assert d.progress == -2

    died = obs("You fall into the pit. *** You have died ***", loc="pit", lost=True, done=True)
    d = RuleDiagnoser().observe(mk_step(0, S, "jump", died))
    assert d.cause_names() == ["lost"] and "You have died" in d.causes[0].evidence

    crash = mk_step(0, S, "open fridge", obs(""), error="EnvCrashed: java.lang.NullPointerException")
    d = RuleDiagnoser().observe(crash)
    assert d.cause_names() == ["env_error"] and "NullPointerException" in d.causes[0].evidence

    down = mk_step(0, S, "look", obs(KITCHEN), error="PolicyError: endpoint http://x unreachable")
    assert diagnose_one(down) == [FailureCause.policy_error]
    fallback = mk_step(0, S, "look", obs(KITCHEN), source=ActionSource.fallback)
    assert diagnose_one(fallback) == [FailureCause.policy_error]


def test_guardrail_block_is_reported_alone() -> None:
    blocked = obs(
        "Action blocked by guardrail.",
        info={"guardrail_blocked": "guard-1: never eat raw chicken"},
    )
    d = RuleDiagnoser().observe(mk_step(0, S, "eat raw chicken", blocked))
    assert d.cause_names() == ["guardrail_blocked"]
    assert d.causes[0].evidence == "guardrail blocked 'eat raw chicken': guard-1: never eat raw chicken"


def test_stagnation_cause_every_window_and_flags() -> None:
    rules = RuleDiagnoser(stagnation_window=3)
    diags = []
    for i in range(7):
        pre, post = obs(f"Room {i}.", loc=f"r{i}"), obs(f"Room {i + 1}.", loc=f"r{i + 1}")
        diags.append(rules.observe(mk_step(i, pre, "go east", post)))
    assert [d.cause_names() for d in diags] == [[], [], ["stagnation"], [], [], ["stagnation"], []]
    assert [d.stagnating for d in diags] == [False, False, True, True, True, True, True]
    assert [d.steps_since_progress for d in diags] == [1, 2, 3, 4, 5, 6, 7]


# --------------------------------------------------------------------------- whole episodes


def test_kitchen_episode_step_causes_progress_and_segments() -> None:
    out = diagnose_trajectory(kitchen_episode(), step_limit=11)
    got = [s.diagnosis.cause_names() for s in out.steps if s.diagnosis]
    assert got == [
        [],
        [],
        ["precondition_unmet"],
        ["invalid_action"],
        [],
        ["no_effect", "loop"],
        [],
        [],
        [],
        ["loop"],
        ["loop"],
    ]
    diags = [s.diagnosis for s in out.steps if s.diagnosis]
    assert [d.segment for d in diags] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2]
    assert diags[1].progress == pytest.approx(1 / 3)
    assert diags[6].cumulative_progress == pytest.approx(2 / 3)
    assert [d.steps_since_progress for d in diags][:8] == [1, 0, 1, 2, 3, 4, 0, 1]
    assert [d.looping for d in diags].count(True) == 3
    assert diags[10].causes[0].evidence == "cycle of period 2 repeated 2x: go east -> go west"
    assert diags[1].diff.inventory_added == ["apple"]

    ep = out.diagnosis
    assert ep is not None and ep.step_index == -1
    assert ep.cause_names() == ["loop", "invalid_action", "precondition_unmet", "step_limit"]
    assert ep.causes[0].evidence.startswith("3x, first at step 5: ")
    assert ep.causes[-1].evidence == "ran 11/11 steps without winning (score 2)"
    assert ep.root_cause is not None and ep.root_cause.startswith("loop: 3x")
    assert ep.looping and not ep.stagnating
    assert ep.cumulative_progress == pytest.approx(2 / 3)
    assert ep.segment == 2


def test_won_episode_has_no_episode_causes_and_no_step_limit() -> None:
    s0 = obs(KITCHEN, max_score=1)
    steps = chain(
        s0,
        [
            ("xyzzy", obs("I don't understand that.", max_score=1)),
            ("win", obs("Won!", score=1, max_score=1, won=True, done=True)),
        ],
    )
    traj = Trajectory(task_id="t", env="e", outcome=Outcome.success, steps=steps)
    out = diagnose_trajectory(traj, step_limit=2)
    assert out.steps[0].diagnosis is not None and out.steps[0].diagnosis.cause_names() == ["invalid_action"]
    assert out.diagnosis is not None and out.diagnosis.causes == [] and not out.diagnosis.failed
    assert out.diagnosis.progress == 1.0


def test_episode_keeps_terminal_causes_beyond_top_three() -> None:
    s0 = obs(KITCHEN)
    moves = [
        ("a", obs("I don't understand that.")),
        ("b", obs("I don't understand that.")),
        ("go north", obs("The door is locked.")),
        ("take key", obs("Nothing happens.")),
        ("jump", obs("You die.", loc="pit", lost=True, done=True)),
    ]
    out = diagnose_trajectory(
        Trajectory(task_id="t", env="e", outcome=Outcome.failure, steps=chain(s0, moves))
    )
    assert out.diagnosis is not None
    names = out.diagnosis.cause_names()
    assert names == ["invalid_action", "precondition_unmet", "no_effect", "lost"]
    assert out.diagnosis.root_cause is not None and out.diagnosis.root_cause.startswith("lost: 1x")


def test_diagnose_trajectory_is_pure_deterministic_and_round_trips() -> None:
    traj = kitchen_episode()
    before = traj.model_dump_json()
    a = diagnose_trajectory(traj, step_limit=11)
    b = diagnose_trajectory(traj, step_limit=11)
    assert traj.model_dump_json() == before  # input untouched
    assert all(s.diagnosis is None for s in traj.steps)
    assert a.model_dump_json() == b.model_dump_json()
    back = Trajectory.model_validate_json(a.model_dump_json())
    assert back == a
    assert back.diagnosis is not None and back.diagnosis.causes[0].cause is FailureCause.loop


def test_segments_cut_at_progress_with_unsucceeded_tail() -> None:
    segs = segments(kitchen_episode())
    assert [(s.index, s.start, s.end, s.succeeded) for s in segs] == [
        (0, 0, 2, True),
        (1, 2, 7, True),
        (2, 7, 11, False),
    ]
    assert segs[0].actions == ["open fridge", "take apple"]
    assert segs[0].pre_facts == ["at(kitchen)"]
    assert segs[0].post_facts == ["at(kitchen)", "has(apple)"]
    assert segs[0].diff.inventory_added == ["apple"]
    assert segs[0].progress == pytest.approx(1 / 3)
    assert segs[1].pre_facts == ["at(kitchen)", "has(apple)"] and segs[1].post_facts == ["at(kitchen)"]
    assert segs[2].progress == 0 and segs[2].diff.empty
    assert all(s.trajectory_id == "traj-kitchen" for s in segs)
    assert segs[0].summary == summarize_segment(segs[0])
    assert segs[0].summary.startswith("Segment 0 (steps 0-1): reached subgoal")
    assert "no subgoal reached" in segs[2].summary


def test_segments_use_facts_and_count_a_win_without_score_as_progress() -> None:
    s0 = obs("Start.", facts=["closed(box)"])
    opened = obs("Opened.", facts=["open(box)"])
    won = obs("You win.", facts=["open(box)", "has(gem)"], won=True, done=True)
    traj = Trajectory(task_id="t", env="e", steps=chain(s0, [("open box", opened), ("take gem", won)]))
    segs = segments(traj)
    assert len(segs) == 1 and segs[0].succeeded and (segs[0].start, segs[0].end) == (0, 2)
    assert segs[0].pre_facts == ["closed(box)"] and segs[0].post_facts == ["open(box)", "has(gem)"]
    assert segs[0].diff.facts_added == ["open(box)", "has(gem)"]
    assert segments(Trajectory(task_id="t", env="e")) == []


def test_summarize_episode_names_goal_outcome_score_and_causes() -> None:
    text = summarize_episode(kitchen_episode())
    assert text.startswith("Goal: Eat the apple and leave through the north door.")
    assert "Outcome: failure after 11 steps, score 2/3, 2 subgoal(s) reached." in text
    assert "Causes: loop x3, invalid_action x1, precondition_unmet x1, no_effect x1." in text
    assert "Root cause: loop:" in text
    assert text == summarize_episode(kitchen_episode())
