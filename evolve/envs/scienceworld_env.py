"""ScienceWorld adapter: 30 science-experiment task types run by one JVM per adapter instance.

Task ids are ``sw-<task name>-v<variation>`` (``sw-use-thermometer-v3``); the split of a
variation is ScienceWorld's own (``get_variations_train/dev/test``).

``scienceworld`` is imported lazily, so importing this module is cheap; the JVM starts on first
use and is reused across episodes (start ~2 s, ~1.8 GB), and restarted by the next ``reset``
when it dies.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from typing import Any

from evolve.errors import EnvCrashed, EnvError, UnknownTaskError
from evolve.schema import EnvState, Observation, Privileged, Split, Task

# Quick to load (< ~1 s once the JVM is warm) and short gold paths (5-25 steps), spanning
# finding, classifying, measuring and building circuits. Mendelian tasks load in ~23 s.
DEFAULT_TASKS = (
    "find-living-thing",
    "find-non-living-thing",
    "find-plant",
    "lifespan-longest-lived",
    "lifespan-shortest-lived",
    "use-thermometer",
    "power-component",
    "test-conductivity",
)

_TASK_ID = re.compile(r"sw-(?P<name>[a-z0-9-]+)-v(?P<var>\d+)")
_ARTICLE = re.compile(r"^(?:a|an|the|some)\s+", re.IGNORECASE)

# ScienceWorld's object classes live in packages that say what an object is
# (``scienceworld.objects.livingthing.animals.Bee``): these packages become class facts.
_CATEGORIES = {
    "livingthing": "living thing",
    "animals": "animal",
    "plant": "plant",
    "containers": "container",
    "furniture": "furniture",
    "devices": "device",
    "document": "document",
    "electricalcomponent": "electrical component",
    "substance": "substance",
    "food": "food",
    "paint": "paint",
    "portal": "portal",
    "location": "location",
}
# Referents every object of a category shares ("living thing", "organism"): no object's name.
_GENERIC_REFERENTS = frozenset([*_CATEGORIES.values(), "organism", "adult plant", "thing", "object", "room"])


def _words_of_class(name: str) -> str:
    """``BeeHive`` -> ``bee hive``."""
    return " ".join(w.lower() for w in re.findall(r"[A-Z][a-z0-9]*|[a-z0-9]+", name))


def class_predicates(class_name: str) -> list[str]:
    """The class facts' predicate names of an object of ScienceWorld class ``class_name``.

    ``scienceworld.objects.livingthing.animals.Bee`` -> ``["is_living_thing", "is_animal",
    "type_bee"]``: ``is_<category>`` for each package that names a category, ``type_<class>`` for
    the class itself (``type_answer_box`` for a task's answer box; the agent gets none). They are what an object
    *is*, so they never change; memory binds skills and generalises fatal-action guardrails over
    them (``evolve.skills.predicates.KIND_PREFIXES``) instead of over the object's name.
    """
    parts = class_name.split(".")
    if len(parts) < 3 or parts[0] != "scienceworld" or parts[2] == "agent":
        return []
    cats = [_CATEGORIES[p] for p in parts[2:-1] if p in _CATEGORIES]
    out = [f"is_{c.replace(' ', '_')}" for c in dict.fromkeys(cats)]
    leaf = _words_of_class(parts[-1])
    if leaf and leaf not in cats:
        out.append(f"type_{leaf.replace(' ', '_')}")
    return out


def known_task_names() -> list[str]:
    """The 30 ScienceWorld task names, read from the package data (no JVM needed)."""
    from scienceworld.constants import ID2TASK
    from scienceworld.utils import infer_task

    return sorted(infer_task(name) for name in ID2TASK.values())


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    out: list[str] = []
    for part in (p.strip() for p in parts):
        # "a drain, which is closed, water": the "which ..." clause belongs to the item before it.
        if out and re.match(r"(which|currently|that) ", part):
            out[-1] += ", " + part
        elif part:
            out.append(part)
    return out


def _name(phrase: str) -> str:
    """``a substance called air`` -> ``air``; ``A door to the kitchen (that is open)`` -> ``door to kitchen``."""
    phrase = phrase.strip().rstrip(".").strip()
    phrase = re.split(r"\s\(|\.\s|, which|, currently", phrase, maxsplit=1)[0]
    phrase = _ARTICLE.sub("", phrase)
    phrase = re.sub(r"^substance called\s+", "", phrase)
    phrase = re.sub(r"^door to the\s+", "door to ", phrase)
    return phrase.strip()


def _parse_item(phrase: str, facts: set[str], names: list[str]) -> None:
    """Collect the item named by one entry of a ScienceWorld listing, its contents and its state."""
    name = _name(phrase)
    if not name or name in ("agent", "nothing"):
        return
    names.append(name)
    # "a counter. On the counter is: a bowl (containing ...), a drawer." -> head / listed contents.
    tail = re.search(r"\.\s+(?:On|In) the [^:]*? is:\s*(.*)$", phrase)
    head = phrase[: tail.start()] if tail else phrase
    contents = _split_top(tail.group(1).rstrip(". ")) if tail else []
    inner = re.search(r"\((?:containing|that contains)\s+(.*)\)", head)
    if inner:
        contents += _split_top(inner.group(1))
        head = head[: inner.start()] + head[inner.end() :]
    if re.search(r"that is open|door is open|which is open", head):
        facts.add(f"open({name})")
    elif re.search(r"that is closed|door is closed|which is closed", head):
        facts.add(f"closed({name})")
    if re.search(r"(turned on|activated)\b", head) and not re.search(r"deactivated", head):
        facts.add(f"on({name})")
    elif re.search(r"turned off|deactivated", head):
        facts.add(f"off({name})")
    for child in contents:
        child_names: list[str] = []
        _parse_item(child, facts, child_names)
        if child_names:
            facts.add(f"in({child_names[0]}, {name})")
        names.extend(child_names)


def parse_look(look: str) -> tuple[str | None, list[str], list[str]]:
    """Location, visible item names and cheap predicates from a ``look around`` text."""
    facts: set[str] = set()
    m = re.search(r"called the ([^.]+)\.", look)
    location = m.group(1).strip() if m else None
    if location:
        facts.add(f"at({location})")
    names: list[str] = []
    for line in look.splitlines():
        if line.startswith("\t"):
            try:
                _parse_item(line.strip(), facts, names)
            except re.error:  # pragma: no cover - a malformed line must never break a step
                continue
    visible = list(dict.fromkeys(names))
    return location, visible, sorted(facts)


def _mentioned(name: str, joined_actions: str | None) -> bool:
    """Does ``name`` occur in some valid action (``focus on <name>``)? True without a list.

    ``joined_actions``: the valid actions joined by newlines, with a newline at both ends (one
    substring search per name instead of a scan of ScienceWorld's thousands of actions)."""
    if joined_actions is None:
        return True
    return f" {name}\n" in joined_actions or f" {name} " in joined_actions


def parse_inventory(inv: str) -> list[str]:
    """Top-level item names from an ``inventory`` text."""
    return [n for n in (_name(line) for line in inv.splitlines() if line.startswith("\t")) if n]


def split_variations(n: int) -> dict[Split, list[int]]:
    """ScienceWorld's train/dev/test variation split for a task with ``n`` variations.

    A port of ``PythonInterface.getSets`` (Scala) so that listing tasks needs no task load (a load
    is 0.1-8 s); the conformance test checks it against the engine.
    """
    special = {
        0: ([], [], []),
        1: ([0], [], [0]),
        2: ([0], [], [1]),
        3: ([0], [1], [2]),
        4: ([0, 1], [2], [3]),
    }
    if n in special:
        train, dev, test = special[n]
    else:
        size = n // 4
        groups = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        train, dev, test = (
            groups[0] + groups[1],
            groups[2],
            groups[3] + (groups[4] if len(groups) > 4 else []),
        )
    return {Split.train: train, Split.dev: dev, Split.test: test}


class ScienceWorldEnv:
    """ScienceWorld behind the ``Env`` protocol; one JVM per instance, reused across episodes.

    ``simplification`` defaults to ``"easy"`` (teleport, doors and containers open, self-watering
    pots, no electrical actions except on electrical tasks): it is the setting most published agent
    results use, it cuts navigation so episodes are 5-60 steps, and the gold path generated under it
    replays to 100 on every non-mendelian task (measured). Pass ``""`` for the full game.

    ``gold_path="lazy"`` (default) loads tasks without ScienceWorld's gold-path search, which costs
    0.3-15 s per load; ``privileged()`` then reloads with it and replays the episode's actions (the
    engine is deterministic) to get back to the same state. ``"eager"`` searches on every reset.
    ``admissible=False`` skips the valid-action list, the slowest part of a step (0.1-0.7 s).
    """

    name = "scienceworld"

    def __init__(
        self,
        task_names: Sequence[str] | None = None,
        max_variations: int | None = 10,
        simplification: str = "easy",
        gold_path: str = "lazy",
        admissible: bool = True,
        env_step_limit: int = 10_000,
    ) -> None:
        known = known_task_names()
        names = list(task_names) if task_names else list(DEFAULT_TASKS)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise EnvError(f"unknown scienceworld task names {unknown}; known: {', '.join(known)}")
        if max_variations is not None and max_variations < 1:
            raise EnvError(f"max_variations must be >= 1 or None, got {max_variations}")
        if gold_path not in ("lazy", "eager"):
            raise EnvError(f"gold_path must be 'lazy' or 'eager', got {gold_path!r}")
        self.task_names = names
        self.max_variations = max_variations
        self.simplification = simplification
        self.gold_path = gold_path
        self.admissible = admissible
        # ScienceWorld ends an episode itself after this many moves; the agent harness keeps its own
        # (smaller) limit, so by default this one is out of the way.
        self.env_step_limit = env_step_limit
        self._known = set(known)
        self._sw: Any = None
        self._n_var: dict[str, int] = {}
        self._gold: dict[tuple[str, int, str], list[str]] = {}
        self._task: Task | None = None
        self._goal_text = ""
        self._history: list[str] = []
        self._last_score = 0
        self._last_look = ""
        self._last: Observation | None = None
        self._types: dict[int, str] | None = None

    # ------------------------------------------------------------------ engine

    def _engine(self) -> Any:
        """The live ScienceWorld engine, starting the JVM if it is not running."""
        if self._sw is not None and not self._alive():
            self._shutdown()
        if self._sw is None:
            if shutil.which("java") is None:
                raise EnvError(
                    "scienceworld needs Java 11+: install one (apt-get install openjdk-17-jre-headless)"
                )
            from scienceworld import ScienceWorldEnv as _SW

            try:
                self._sw = _SW("", envStepLimit=self.env_step_limit)
            except Exception as e:  # noqa: BLE001 - report any launch failure as one line
                raise EnvCrashed(f"scienceworld JVM failed to start: {type(e).__name__}: {e}") from e
        return self._sw

    def _alive(self) -> bool:
        proc = getattr(getattr(self._sw, "_gateway", None), "java_process", None)
        return proc is not None and proc.poll() is None

    def _shutdown(self) -> None:
        if self._sw is None:
            return
        alive = self._alive()
        sw, self._sw = self._sw, None
        self._types = None
        gateway = sw._gateway
        try:
            if alive:
                sw.close()  # tells the JVM to exit
            else:
                gateway.shutdown_callback_server()  # a dead JVM: only the Python side is left
        except Exception:  # noqa: BLE001 - stopping a broken engine must not raise
            pass
        # The old JVM's py4j proxies are freed later by the cyclic GC. Marked disconnected, their
        # finalizers do nothing instead of trying to reach a gone JVM (which logs connection errors
        # and, on CPython 3.11, can break an ast.parse that the GC interrupts). ScienceWorld's own
        # __del__ calls close() again, so its shutdown is made a no-op too.
        gateway._gateway_client.is_connected = False
        gateway.shutdown = lambda *args, **kwargs: None
        proc = gateway.java_process
        try:
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a JVM that ignores the request is killed
            proc.kill()

    def _crashed(self, what: str, e: Exception | None = None) -> EnvCrashed:
        dead = not self._alive()
        if dead:
            self._shutdown()  # the next reset() starts a fresh JVM
        self._last = None
        state = "JVM died" if dead else "engine raised"
        first = str(e).strip().splitlines()[0] if e is not None and str(e).strip() else ""
        cause = f": {type(e).__name__}: {first}" if e is not None else " (the java process exited)"
        return EnvCrashed(f"scienceworld {state} during {what}{cause}"[:300])

    def _valid_actions(self) -> list[str]:
        sw = self._sw
        # One joined string instead of a py4j round trip per list element (~2x faster).
        joined = sw._gateway.jvm.java.lang.String.join("\n", sw.server.getValidActionObjectCombinations())
        return list(dict.fromkeys(a for a in joined.split("\n") if a))

    def _raw_step(self, action: str, valid: bool = True) -> tuple[str, dict[str, Any]]:
        """One engine step; mirrors ``scienceworld.ScienceWorldEnv.step`` minus the work not asked for."""
        server = self._sw.server
        text = server.step(action)
        score = int(round(100 * server.getScore()))
        moves = int(server.getNumMoves())
        # Failure (score < 0) and the engine's own step limit also end an episode.
        completed = bool(server.getCompleted()) or score < 0 or moves > self.env_step_limit
        info = {
            "score": score,
            "reward": score - self._last_score,
            "completed": completed,
            "moves": moves,
            "look": server.freeActionLook(),
            "inv": server.freeActionInventory(),
            "valid": self._valid_actions() if self.admissible and valid else None,
            "kinds": self._kinds() if valid else {},
        }
        self._last_score = score
        return text, info

    def _kinds(self) -> dict[str, list[str]]:
        """Class predicates per name of every object: all the names the engine accepts for it
        (actions say ``focus on dove`` while the room lists a "dove egg"). The observation keeps
        the names in view (listed, carried, or in a valid action). Two JSON calls to the engine
        (~10-50 ms on a busy machine, against 0.1-0.7 s for the step itself)."""
        server = self._sw.server
        objects = json.loads(server.getAllObjectIdsTypesReferentsLUTJSON())
        # Doors list no usable referent there ("error: should use override for portal."): the
        # in-view table has the name actions use.
        in_view = json.loads(server.getPossibleObjectReferentLUTJSON())
        types = self._type_names()
        out: dict[str, list[str]] = {}
        for oid, obj in objects.items():
            preds = class_predicates(types.get(int(obj.get("type_id", -1)), ""))
            if not preds:
                continue
            for name in {*obj.get("referents", []), in_view.get(oid, "")}:
                n = name.strip().lower()
                if n and n not in _GENERIC_REFERENTS:
                    out.setdefault(n, [])
                    out[n] += [p for p in preds if p not in out[n]]
        return out

    def _type_names(self) -> dict[int, str]:
        """Object type id -> class name (the engine's table; read once per JVM)."""
        if self._types is None:
            lut = json.loads(self._sw.server.getObjectTypesLUTJSON())
            self._types = {int(v): k for k, v in lut.items()}
        return self._types

    def _load(self, name: str, variation: int, gold: bool) -> None:
        self._sw.load(name, variation, self.simplification, generateGoldPath=gold)
        self._last_score = 0

    # ------------------------------------------------------------------ tasks

    def _n_variations(self, name: str) -> int:
        if name not in self._n_var:
            sw = self._engine()
            try:
                self._n_var[name] = int(sw.get_max_variations(name))  # needs no task load
            except Exception as e:  # noqa: BLE001
                raise self._crashed(f"counting variations of {name}", e) from e
        return self._n_var[name]

    def _variations_of(self, name: str, split: Split) -> list[int]:
        return split_variations(self._n_variations(name))[split]

    def _replay_history(self) -> dict[str, Any]:
        """After a reload, replay this episode's actions to get back to its state.

        The engine is deterministic (the same actions reach the same state; only the order in which
        a room's objects are listed may differ between loads).
        """
        _, info = self._raw_step("look around", valid=False)
        for action in self._history:
            _, info = self._raw_step(action, valid=False)
        return info

    def tasks(self, split: Split | str) -> list[Task]:
        """The first ``max_variations`` variations of each chosen task in ScienceWorld's split."""
        split = Split(split)
        out = []
        for name in self.task_names:
            variations = self._variations_of(name, split)[: self.max_variations]
            out += [self._make_task(name, v, split) for v in variations]
        return out

    def _make_task(self, name: str, variation: int, split: Split) -> Task:
        return Task(
            id=f"sw-{name}-v{variation}",
            env=self.name,
            split=split,
            params={"task_name": name, "variation": variation, "simplification": self.simplification},
        )

    def parse_task_id(self, task_id: str) -> tuple[str, int]:
        """``sw-use-thermometer-v3`` -> (``use-thermometer``, 3); raises ``UnknownTaskError``."""
        m = _TASK_ID.fullmatch(task_id)
        if not m or m.group("name") not in self._known:
            raise UnknownTaskError(
                f"unknown scienceworld task id {task_id!r}: expected sw-<task name>-v<variation>"
                " with one of ScienceWorld's 30 task names"
            )
        return m.group("name"), int(m.group("var"))

    # ------------------------------------------------------------------ episode

    def reset(self, task: Task | str) -> Observation:
        """Load a task variation and observe the starting room."""
        task_id = task.id if isinstance(task, Task) else task
        name, variation = self.parse_task_id(task_id)
        n_var = self._n_variations(name)
        if not 0 <= variation < n_var:
            raise UnknownTaskError(
                f"unknown scienceworld task id {task_id!r}: {name} has variations 0..{n_var - 1}"
            )
        sw = self._engine()
        self._last = None
        try:
            key = (name, variation, self.simplification)
            eager = self.gold_path == "eager" and key not in self._gold
            self._load(name, variation, gold=eager)
            if eager:
                self._gold[key] = list(sw.get_gold_action_sequence())
            self._goal_text = re.sub(r"^\s*Task Description:\s*", "", sw.taskdescription()).strip()
            # load() builds the start state; sw.reset() would build it a second time.
            text, info = self._raw_step("look around")
        except Exception as e:  # noqa: BLE001
            raise self._crashed(f"reset of {task_id}", e) from e
        if not isinstance(task, Task):
            splits = split_variations(n_var)
            split = next((s for s in Split if variation in splits[s]), Split.train)
            task = self._make_task(name, variation, split)
        self._task = task.model_copy(update={"goal": self._goal_text})
        self._history = []
        info["reward"] = 0  # no step was taken; the start state may already score (e.g. an open door)
        self._last = self._observation(text, info, extra={})
        return self._last

    def step(self, action: str) -> Observation:
        """Apply one action; after the episode ends, returns the terminal observation unchanged."""
        if self._last is None:
            raise EnvError("scienceworld: call reset() before step() (also needed after a crash)")
        if self._last.state.done:
            return self._last.model_copy(update={"reward": 0.0, "info": {"episode_over": True}})
        valid = self._last.admissible_actions
        if not self._alive():  # checked first: py4j logs a traceback when it cannot connect
            raise self._crashed(f"step {action!r}")
        try:
            text, info = self._raw_step(action)
        except Exception as e:  # noqa: BLE001
            raise self._crashed(f"step {action!r}", e) from e
        self._history.append(action)
        extra = {"admissible": action.strip() in set(valid)} if valid is not None else {}
        self._last = self._observation(text, info, extra=extra)
        return self._last

    def _observation(self, text: str, info: dict[str, Any], extra: dict[str, Any]) -> Observation:
        self._last_look = info["look"]
        location, visible, facts = parse_look(info["look"] or "")
        inventory = parse_inventory(info["inv"] or "")
        # Class facts for the names the agent can see or use: the listing's, the inventory's, and
        # the engine's action referents (``focus on dove`` while the room lists a "dove egg").
        shown = {n.lower() for n in [*visible, *inventory]}
        kinds: dict[str, list[str]] = info.get("kinds") or {}
        valid = info.get("valid")
        joined = None if valid is None else "\n" + "\n".join(valid) + "\n"
        names = sorted(shown | {n for n in kinds if _mentioned(n, joined)})
        facts = [*facts, *(f"{p}({n})" for n in names for p in kinds.get(n, []))]
        score = float(info["score"])
        won = score >= 100
        lost = score < 0  # ScienceWorld reports -100 when the task is failed (e.g. wrong focus)
        return Observation(
            text=text.strip(),
            state=EnvState(
                location=location,
                inventory=inventory,
                visible=visible,
                score=score,
                max_score=100.0,
                done=info["completed"] or won or lost,
                won=won,
                lost=lost,
                moves=info["moves"],
                facts=sorted(set(facts) | {f"has({item})" for item in inventory}),
            ),
            goal=self._goal_text,
            admissible_actions=info["valid"],
            reward=float(info["reward"]),
            info=extra,
        )

    def privileged(self) -> Privileged:
        """The gold action sequence from the start of the episode, and the subgoals still open."""
        if self._task is None or self._last is None:
            raise EnvError("scienceworld: call reset() before privileged()")
        name, variation = self._task.params["task_name"], self._task.params["variation"]
        key = (name, variation, self.simplification)
        notes = ""
        if key not in self._gold:
            try:
                self._load(name, variation, gold=True)
                self._gold[key] = list(self._sw.get_gold_action_sequence())
                info = self._replay_history()
            except Exception as e:  # noqa: BLE001
                raise self._crashed(f"gold path of {self._task.id}", e) from e
            # Compare as line sets: the engine lists a room's objects in no fixed order across loads.
            if sorted(info["look"].splitlines()) != sorted(self._last_look.splitlines()):
                notes = "warning: replaying the episode after the gold-path search reached a different state"
        facts: list[str] = []
        try:
            progress = self._sw.get_goal_progress()
        except Exception:  # noqa: BLE001 - progress is a nicety; never fail the oracle for it
            progress = ""
        for line in progress.splitlines():
            m = re.match(r"^\d+\t(true|false)\t\s*\S+\t(.+)$", line)
            if m:
                facts.append(f"{'done' if m.group(1) == 'true' else 'todo'}({m.group(2).strip()})")
        return Privileged(gold_actions=list(self._gold[key]), facts=facts, notes=notes)

    @property
    def current_task(self) -> Task | None:
        return self._task

    def close(self) -> None:
        """Stop the JVM (a later ``reset`` starts a new one)."""
        self._shutdown()
        self._last = None
