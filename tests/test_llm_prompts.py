"""The one chat layout: recorded memory renders like live memory; the privileged block; answers."""

from __future__ import annotations

import json

from evolve.llm.prompts import (
    JSON_FORMAT,
    PRIVILEGED_OPEN,
    PromptOptions,
    add_privileged,
    answer_text,
    build_messages,
    skills_text,
    step_messages,
    words,
)
from evolve.schema import Action, EnvState, FailureCause, Guardrail, MemoryContext, Observation, Skill, Step

GOAL = "put the apple in the fridge"
SKILLS = [
    Skill(name="store food", description="cold keeps", preconditions=["has(apple)"], steps=["open fridge"]),
    Skill(name="find drawer", steps=["open drawer {n}"]),
]
MEMORY = MemoryContext(
    skills=SKILLS,
    guardrails=[Guardrail(root_cause=FailureCause.loop, forbidden_action="take knife", description="sharp")],
    examples=["took apple, won"],
    notes=["Notes: do not loop"],
)


def _obs(actions: list[str]) -> Observation:
    return Observation(
        text="A kitchen.", state=EnvState(location="kitchen"), goal=GOAL, admissible_actions=actions
    )


def test_recorded_memory_block_renders_and_ranks_like_live_memory() -> None:
    recorded = MEMORY.prompt_text()
    # The ranking context read back from the block is the skills' text (same words), nothing else.
    assert words(skills_text(recorded)) == words(" ".join(s.text() for s in SKILLS))
    assert "sharp" not in skills_text(recorded) and skills_text("") == ""
    many = [f"open drawer {i}" for i in range(100)] + ["take knife", "open fridge", "look"]
    opts = PromptOptions(max_actions=5)
    live = build_messages(GOAL, _obs(many), [], MEMORY, opts)
    assert live == build_messages(GOAL, _obs(many), [], recorded, opts)
    assert "- open fridge" in live[-1]["content"]  # ranked up by the skill's words


def test_privileged_block_sits_before_the_format_line_and_round_trips() -> None:
    obs = _obs(["look", "open fridge"])
    pre = Observation(text="A hall.", state=EnvState(), goal=GOAL, admissible_actions=["go east"])
    history = [Step(index=0, pre_state=pre, action=Action(text="go east"), post_state=obs)]
    student = build_messages(GOAL, obs, history, MEMORY)
    teacher = build_messages(GOAL, obs, history, MEMORY, privileged="Reference solution: open fridge")
    assert teacher[:-1] == student[:-1]
    assert teacher[-1]["content"].endswith("</privileged>\n\n" + JSON_FORMAT)
    assert PRIVILEGED_OPEN not in student[-1]["content"]
    assert add_privileged(student, "Reference solution: open fridge") == teacher
    assert add_privileged(student, "  ") == student
    recorded = [history[0], Step(index=1, pre_state=obs, action=Action(text="look"), post_state=obs,
                                 memory_prompt=MEMORY.prompt_text())]  # fmt: skip
    assert step_messages(GOAL, recorded, 1) == student


def test_answer_text_is_what_the_format_asks_for() -> None:
    a = Action(text="open fridge", thought="cold keeps food")
    assert json.loads(answer_text(a)) == {"thought": "cold keeps food", "command": "open fridge"}
    assert answer_text(a) == '{"thought": "cold keeps food", "command": "open fridge"}'
    assert answer_text(a, "command") == "open fridge"
