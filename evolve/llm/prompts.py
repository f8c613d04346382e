"""The one chat layout of evolve, and the parsing of answers to it.

Used by the LLM policies at act time, by synth to render training examples, and by the trainer
to render a teacher's view: a training example for step k is *byte for byte* the messages the
policy sent at step k (:func:`step_messages`), plus the answer in the policy's format
(:func:`answer_text`).

Layout (a list of chat dicts)::

    [system]    instructions + action format                      <- never changes
    [user]      task goal + first observation (+ one-line summary of dropped turns)
    [assistant] command 1
    [user]      observation after command 1
    ...                                                            <- grows turn by turn
    [assistant] command t
    [user]      observation after command t
                + state line + memory block (+ privileged block)
                + admissible actions + answer format               <- the only part that changes

Everything before the last user message is identical from one step to the next, so an
inference server's prompt (KV) cache is reused across the whole episode. The last user message
even starts with the same text its plain history form will have at the next step. Old turns
are dropped only when the history gets long, and then in chunks, so the prefix stays stable for
many steps after each cut.

A prompt depends only on what a trajectory records: the goal, the steps before k (actions and
observations), step k's pre-state and the memory block shown (``Step.memory_prompt``); the
ranking of a long admissible list reads the skills from that block, not from live objects.
"""

from __future__ import annotations

import difflib
import heapq
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from evolve.schema import BLOCKED_TITLE, Action, EnvState, MemoryContext, Observation, Step
from evolve.text import clip, extract_json_object, normalise_command, tokenize

ActionFormat = Literal["json", "command"]

SYSTEM_INSTRUCTIONS = (
    "You are an agent acting in a text environment to complete a task. "
    "Each turn you see the latest observation and choose exactly one command to execute next. "
    "Prefer commands that make progress toward the goal; do not repeat commands that had no effect. "
    "Follow the rules learned from past failures, and use the listed skills when they apply."
)
JSON_FORMAT = (
    'Answer with one JSON object and nothing else: {"thought": "<one short sentence>", '
    '"command": "<the command>"}. When admissible actions are listed, "command" must be '
    "exactly one of them."
)
COMMAND_FORMAT = (
    "Answer with the command only, exactly as written in the list of admissible actions, with no explanation."
)
PRIVILEGED_OPEN = "<privileged>"
PRIVILEGED_CLOSE = "</privileged>"
PRIVILEGED_TITLE = "Privileged information (reference knowledge; use it to choose the best command):"

# The section titles of ``MemoryContext.prompt_text``: the skills section is the ranking context.
_SKILLS_TITLE = "Skills that worked before in similar states:"
_OTHER_TITLES = (
    "Rules learned from past failures",
    "Excerpts of past episodes:",
    "Notes:",
    BLOCKED_TITLE,
)


@dataclass(frozen=True)
class PromptOptions:
    """Knobs of the layout. The defaults fit a 4-8k-token context."""

    max_turns: int = 30
    """Turns (command + observation) kept verbatim before older ones are summarised."""
    max_history_chars: int = 12_000
    """Character budget of the verbatim history; exceeding it also triggers a cut."""
    max_obs_chars: int = 1_500
    """Each past observation is clipped to this many characters."""
    max_current_obs_chars: int = 4_000
    max_actions: int = 60
    """Admissible actions shown in the prompt; a longer list is ranked and cut (any stays allowed)."""
    action_format: ActionFormat = "json"


def words(text: str) -> set[str]:
    """The set of lower-cased content words of a text (stop words dropped)."""
    return set(tokenize(text))


_PARTICLES = frozenset({"to", "on", "up", "at", "around", "down", "in", "into", "off", "out"})
_NAMED_SPLIT = re.compile(r"->|\n|[:;]\s|\.\s|\.$")
_GOAL_BOILERPLATE = frozenset({"task", "first", "then", "when", "done", "find", "determine"})
"""Words of how goals are phrased ("Your task is to ..."), not of what they ask: an action named
``task`` or ``reset task`` is not relevant because the goal says "task"."""
_SAME_VERB_COST = 0.25
"""Per action of a verb already shown, the next one of that verb costs this many goal words times
log2(1 + the verb's number of actions): a verb of object pairs (hundreds) fills up fast, one of
single places or objects (ten or so: where to go) slowly."""


def action_verb(action: str) -> str:
    """A command's verb: its first word, with the particle after it (``go to``, ``pick up``)."""
    w = action.lower().split()
    if not w:
        return ""
    return f"{w[0]} {w[1]}" if len(w) > 1 and w[1] in _PARTICLES else w[0]


def select_actions(
    actions: Sequence[str],
    goal: str = "",
    observation: str = "",
    skills: str = "",
    *,
    cap: int = 60,
    recent: Sequence[str] = (),
) -> list[str]:
    """At most ``cap`` admissible actions: every kind of command, the relevant ones first.

    A short list comes back unchanged (its order may carry meaning). A long one (ScienceWorld's
    100-1,000+, most of them ``move X to Y`` pairs) is cut in two passes:

    1. *coverage*: the best action of every verb (``go to``, ``teleport to``, ``focus on``,
       ``pick up``, ``look around``, ...), so the model always sees how to move and what it can
       do, however many pairs one verb spans;
    2. *relevance*: the rest by relevance, each action already shown of the same verb costing
       the next one ``_SAME_VERB_COST * log2(1 + that verb's count)`` goal words, so one verb
       cannot fill the list and a verb of a few places fills up slower than one of many pairs.

    Relevance: words shared with the goal and with the skills section (1 each), a command the
    skills spell out (+3), words of the observation (0.1, a tie-break), over ``1 + 0.1 x`` the
    action's length; actions just taken lose 0.5 (discourages loops); ties keep the list's order.
    The result is ordered by relevance. (Ranking by overlap with goal + observation alone filled
    ScienceWorld prompts with 30 ``move ... to cup containing nothing in table``: the
    observation names every object, and pairs name two.)
    """
    unique = list(dict.fromkeys(actions))
    if len(unique) <= cap:
        return unique
    goal_w, skill_w, obs_w = words(goal) - _GOAL_BOILERPLATE, words(skills), words(observation)
    named = {normalise_command(f) for f in _NAMED_SPLIT.split(skills.lower()) if f.strip()}
    recent_set = {normalise_command(r) for r in recent}

    groups: dict[str, list[tuple[float, int, str]]] = {}
    for i, a in enumerate(unique):
        aw = words(a)
        rel = len(aw & goal_w) + len(aw & skill_w) + 0.1 * len(aw & obs_w)
        norm = normalise_command(a)
        if norm in named:
            rel += 3.0
        rel /= 1 + 0.1 * len(aw)
        if norm in recent_set:
            rel -= 0.5
        groups.setdefault(action_verb(a), []).append((rel, i, a))
    for g in groups.values():
        g.sort(key=lambda x: (-x[0], x[1]))

    # 1. coverage: each verb's best, the verbs by that action's relevance
    verbs = sorted(groups, key=lambda v: (-groups[v][0][0], groups[v][0][1]))[:cap]
    chosen = [groups[v][0] for v in verbs]
    taken = dict.fromkeys(verbs, 1)
    # 2. relevance with a cost per action of the same verb already shown (a lazy greedy heap)
    cost = {v: _SAME_VERB_COST * math.log2(1 + len(groups[v])) for v in verbs}
    heap = [(-(groups[v][1][0] - cost[v]), groups[v][1][1], v, 1) for v in verbs if len(groups[v]) > 1]
    heapq.heapify(heap)
    while heap and len(chosen) < cap:
        _, _, v, j = heapq.heappop(heap)
        chosen.append(groups[v][j])
        taken[v] += 1
        if j + 1 < len(groups[v]):
            nxt = groups[v][j + 1]
            heapq.heappush(heap, (-(nxt[0] - cost[v] * taken[v]), nxt[1], v, j + 1))
    chosen.sort(key=lambda x: (-x[0], x[1]))
    return [a for _, _, a in chosen]


def skills_text(memory_prompt: str) -> str:
    """The skills section of a memory block (what ranks a long admissible list), '' when none."""
    if _SKILLS_TITLE not in memory_prompt:
        return ""
    section = memory_prompt.split(_SKILLS_TITLE, 1)[1]
    for title in _OTHER_TITLES:
        section = section.split("\n" + title, 1)[0]
    return section.strip()


def blocked_actions(memory: MemoryContext | str | None) -> list[str]:
    """The actions a memory block refuses in this state (:attr:`MemoryContext.blocked`).

    Read from the rendered block, so that a prompt re-rendered from a recorded step
    (``Step.memory_prompt``) drops exactly the actions the live prompt dropped.
    """
    if isinstance(memory, MemoryContext):
        return list(dict.fromkeys(memory.blocked))
    text = memory or ""
    if BLOCKED_TITLE not in text:
        return []
    section = text.split(BLOCKED_TITLE, 1)[1]
    return list(dict.fromkeys(ln[2:].strip() for ln in section.splitlines() if ln.startswith("- ")))


def allowed_actions(admissible: Sequence[str] | None, memory: MemoryContext | str | None) -> list[str] | None:
    """The admissible actions minus those the memory refuses in this state (None stays None).

    Refused actions are matched normalised; when every admissible action is refused the full list
    is kept, since an empty list would leave the policy nothing to answer with.
    """
    if admissible is None:
        return None
    refused = {normalise_command(a) for a in blocked_actions(memory)}
    if not refused:
        return list(admissible)
    kept = [a for a in admissible if normalise_command(a) not in refused]
    return kept or list(admissible)


def memory_prompt_of(memory: MemoryContext | str | None) -> str:
    """The memory block shown to the model: ``memory.prompt_text()``, or the recorded string itself."""
    if memory is None:
        return ""
    if isinstance(memory, str):
        return memory
    return memory.prompt_text()


def state_line(state: EnvState) -> str:
    """One compact line: location, inventory, score."""
    parts: list[str] = []
    if state.location:
        parts.append(f"location: {state.location}")
    inv = ", ".join(state.inventory) if state.inventory else "nothing"
    parts.append(f"inventory: {clip(inv, 300)}")
    score = f"score: {state.score:g}"
    if state.max_score:
        score += f" of {state.max_score:g}"
    parts.append(score)
    if state.moves:
        parts.append(f"moves: {state.moves}")
    return "; ".join(parts)


def _plain(text: str, limit: int) -> str:
    return clip(text, limit) or "(no output)"


def format_instruction(action_format: ActionFormat = "json") -> str:
    return JSON_FORMAT if action_format == "json" else COMMAND_FORMAT


def system_message(action_format: ActionFormat = "json") -> dict[str, str]:
    return {"role": "system", "content": f"{SYSTEM_INSTRUCTIONS}\n\n{format_instruction(action_format)}"}


def _history_start(history: Sequence[Step], opts: PromptOptions) -> int:
    """Index of the first step kept verbatim; moves in chunks so the prefix stays cache-stable."""
    n = len(history)
    sizes = [len(s.action.text) + min(len(s.post_state.text), opts.max_obs_chars) + 20 for s in history]
    if n <= opts.max_turns and sum(sizes) <= opts.max_history_chars:
        return 0
    chunk = max(1, opts.max_turns // 2)
    start = 0
    while start < n - 1 and (n - start > opts.max_turns or sum(sizes[start:]) > opts.max_history_chars):
        start += chunk
    return min(start, n - 1)


def summarise_steps(steps: Sequence[Step], limit: int = 400) -> str:
    """One line standing for dropped turns: their commands (newest kept) and the score reached."""
    if not steps:
        return ""
    cmds = [s.action.text for s in steps]
    text = " > ".join(cmds)
    if len(text) > limit:
        # Keep the most recent commands: they explain the state the verbatim history starts in.
        tail: list[str] = []
        for c in reversed(cmds):
            if len(" > ".join([*tail, c])) > limit - 10:
                break
            tail.insert(0, c)
        text = "... > " + " > ".join(tail)
    last = steps[-1].post_state.state
    return f"Earlier steps 1-{len(steps)} (summarised): {text}. Score then: {last.score:g}."


def privileged_block(context: str) -> str:
    """The delimited block a privileged teacher sees (gold actions, skills) and the student does not."""
    return f"{PRIVILEGED_TITLE}\n{PRIVILEGED_OPEN}\n{context.strip()}\n{PRIVILEGED_CLOSE}"


def add_privileged(messages: Sequence[dict[str, Any]], context: str | None) -> list[dict[str, Any]]:
    """The teacher view of a student prompt: the privileged block inserted in the last user message.

    It goes right before the closing answer-format line, so ``add_privileged(build_messages(...), c)
    == build_messages(..., privileged=c)``: the trainer renders a teacher view from a stored
    student-view example (``TrainingExample.messages`` + ``privileged_context``) with this.
    """
    out = [dict(m) for m in messages]
    if not context or not context.strip():
        return out
    i = max(j for j, m in enumerate(out) if m["role"] == "user")
    body, sep, fmt = out[i]["content"].rpartition("\n\n")
    if not sep:  # no format line to keep last: append
        body, fmt = out[i]["content"], ""
    parts = [body, privileged_block(context)] + ([fmt] if fmt else [])
    out[i] = {**out[i], "content": "\n\n".join(parts)}
    return out


def build_messages(
    goal: str,
    obs: Observation,
    history: Sequence[Step],
    memory: MemoryContext | str | None = None,
    options: PromptOptions | None = None,
    privileged: str | None = None,
) -> list[dict[str, str]]:
    """The chat messages for one step (see the module docstring for the layout).

    ``memory`` is the live :class:`MemoryContext` or the memory block as recorded on a step
    (``Step.memory_prompt``); both render identically. ``privileged`` (gold actions, skills)
    adds the teacher's block (:func:`add_privileged`).
    """
    opts = options or PromptOptions()
    goal = goal or obs.goal
    first_obs = history[0].pre_state.text if history else obs.text
    start = _history_start(history, opts)

    # At step 0 the first observation is the current one: show it unclipped (up to the larger cap).
    first_cap = opts.max_obs_chars if history else opts.max_current_obs_chars
    head = f"Task: {goal.strip() or '(no goal given)'}\n\nObservation: {clip(first_obs, first_cap)}"
    if start:
        head += "\n\n" + summarise_steps(history[:start])
    messages: list[dict[str, str]] = [system_message(opts.action_format), {"role": "user", "content": head}]
    for step in history[start:]:
        messages.append({"role": "assistant", "content": step.action.text})
        messages.append({"role": "user", "content": _plain(step.post_state.text, opts.max_obs_chars)})

    # The per-step block replaces the last user message, starting with the same text (the
    # observation), so that at the token level it extends what the next prompt will hold.
    last = messages.pop()["content"]
    if not history:
        current = last
    elif history[-1].post_state.text.strip() == obs.text.strip():
        current = _plain(obs.text, opts.max_current_obs_chars)
    else:  # the caller shows something else than the last step's result: keep both
        current = last + "\n\n" + _plain(obs.text, opts.max_current_obs_chars)
    block = [current, "", f"State: {state_line(obs.state)}"]
    mem = memory_prompt_of(memory)
    if mem:
        block += ["", mem]
    admissible = allowed_actions(obs.admissible_actions, mem)
    if admissible:
        recent = [s.action.text for s in history[-3:]]
        shown = select_actions(
            admissible, goal, obs.text, skills_text(mem), cap=opts.max_actions, recent=recent
        )
        total = len(set(admissible))
        title = "Admissible actions"
        if len(shown) < total:
            title += f" ({len(shown)} most relevant of {total}; any admissible command is accepted)"
        block += ["", title + ":", "\n".join(f"- {a}" for a in shown)]
    block += ["", format_instruction(opts.action_format)]
    messages.append({"role": "user", "content": "\n".join(block)})
    return add_privileged(messages, privileged) if privileged else messages


def step_messages(
    goal: str,
    steps: Sequence[Step],
    k: int,
    options: PromptOptions | None = None,
    privileged: str | None = None,
) -> list[dict[str, str]]:
    """The messages a policy sent at step ``k`` of a recorded trajectory (rebuilt from the record)."""
    step = steps[k]
    return build_messages(goal, step.pre_state, steps[:k], step.memory_prompt, options, privileged)


def answer_text(action: Action, action_format: ActionFormat = "json") -> str:
    """The assistant answer for ``action`` as the policy's format asks for it (the SFT target)."""
    if action_format == "json":
        return json.dumps({"thought": action.thought, "command": action.text}, ensure_ascii=False)
    return action.text


def repair_messages(messages: list[dict[str, str]], raw: str, problem: str) -> list[dict[str, str]]:
    """The messages for the one retry after an invalid answer: the bad answer plus an error note."""
    note = (
        f"Your answer was not usable: {problem}. Answer again with only the JSON object "
        '{"thought": "...", "command": "..."}, where "command" is one of the admissible actions.'
    )
    return [
        *messages,
        {"role": "assistant", "content": clip(raw, 500) or "(empty)"},
        {"role": "user", "content": note},
    ]


# --------------------------------------------------------------------------- parsing


def action_schema(admissible: Sequence[str] | None, enum_limit: int = 150) -> dict[str, Any]:
    """JSON schema of an answer; ``command`` is an enum of the admissible set when that is small."""
    command: dict[str, Any] = {"type": "string"}
    if admissible and len(set(admissible)) <= enum_limit:
        command["enum"] = list(dict.fromkeys(admissible))
    return {
        "type": "object",
        "properties": {"thought": {"type": "string"}, "command": command},
        "required": ["thought", "command"],
        "additionalProperties": False,
    }


def match_action(command: str, admissible: Sequence[str], threshold: float = 0.6) -> str | None:
    """The admissible action meant by ``command``: exact, then normalised, then the closest above threshold.

    Closeness mixes difflib's ratio with word overlap, so 'take the apple' finds 'take apple'
    and 'put apple into fridge' finds 'put apple in fridge'.
    """
    if not admissible or not command.strip():
        return None
    if command in admissible:
        return command
    norm = normalise_command(command)
    by_norm: dict[str, str] = {}
    for a in admissible:
        by_norm.setdefault(normalise_command(a), a)
    if norm in by_norm:
        return by_norm[norm]
    cw = words(norm)
    best, best_score = None, 0.0
    for key, a in by_norm.items():
        ratio = difflib.SequenceMatcher(None, norm, key).ratio()
        aw = words(key)
        jacc = len(cw & aw) / len(cw | aw) if (cw or aw) else 0.0
        s = max(ratio, 0.5 * ratio + 0.5 * jacc)
        if s > best_score:
            best, best_score = a, s
    return best if best_score >= threshold else None


@dataclass
class ParsedAnswer:
    command: str | None
    thought: str = ""
    problem: str | None = None
    """Why no usable command came out (None when ``command`` is set)."""


def parse_answer(text: str, admissible: Sequence[str] | None, threshold: float = 0.6) -> ParsedAnswer:
    """Turn a model's raw answer into an admissible command, repairing what can be repaired.

    Order: a JSON object's ``command`` (or ``action``), else the first non-empty line as a bare
    command, else an admissible action quoted verbatim in the text; each candidate is then
    matched to the admissible set (:func:`match_action`). Without an admissible set any
    non-empty command is accepted.
    """
    raw = text or ""
    obj = extract_json_object(raw)
    thought = ""
    candidates: list[str] = []
    if obj is not None:
        thought = str(obj.get("thought") or obj.get("reasoning") or "")[:500]
        cmd = obj.get("command", obj.get("action"))
        if isinstance(cmd, str):
            candidates.append(cmd)
    else:
        lines = [ln.strip() for ln in raw.strip().splitlines() if ln.strip()]
        if lines:
            first = re.sub(r"^(command|action|answer)\s*:\s*", "", lines[0], flags=re.I)
            candidates.append(first.strip("`\"' "))
    if not admissible:
        for c in candidates:
            if c.strip():
                return ParsedAnswer(command=c.strip(), thought=thought)
        return ParsedAnswer(command=None, thought=thought, problem="no command found in the answer")
    for c in candidates:
        hit = match_action(c, admissible, threshold)
        if hit is not None:
            return ParsedAnswer(command=hit, thought=thought)
    # Last repair: an admissible action named in the text ("I will OPEN THE FRIDGE"): its content
    # words appear in order and contiguously among the text's; the longest such action wins.
    text_words = tokenize(raw)
    for a in sorted(set(admissible), key=len, reverse=True):
        aw = tokenize(a)
        if aw and any(text_words[i : i + len(aw)] == aw for i in range(len(text_words) - len(aw) + 1)):
            return ParsedAnswer(command=a, thought=thought)
    if obj is None and not candidates:
        problem = "empty answer"
    elif obj is None:
        problem = f"no JSON object and {clip(candidates[0], 80)!r} is not an admissible action"
    elif not candidates:
        problem = 'the JSON object has no "command" string'
    else:
        problem = f"{clip(candidates[0], 80)!r} is not an admissible action"
    return ParsedAnswer(command=None, thought=thought, problem=problem)


def fallback_command(admissible: Sequence[str] | None) -> str:
    """A harmless action to take when the policy failed: 'look' if allowed, else the first admissible."""
    if not admissible:
        return "look"
    for a in admissible:
        if a.strip().lower() == "look":
            return a
    return admissible[0]
