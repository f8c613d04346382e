"""TextWorld adapter: procedurally generated text games, compiled offline and cached on disk.

Task ids encode everything needed to regenerate a game, so a cache miss on another
machine rebuilds the same game:

- ``tw-custom-s<seed>-q<quest length>-w<world size>-o<nb objects>``
- ``tw-treasure_hunter-s<seed>-l<level 1-30>``
- ``tw-cooking-s<seed>-r<recipe>-t<take>-g<go: 1|6|9|12>[-open][-cook][-cut][-drop][-f<food split>]``

``textworld`` is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evolve.errors import EnvCrashed, EnvError, UnknownTaskError
from evolve.schema import EnvState, Observation, Privileged, Split, Task

GAME_TYPES = ("custom", "treasure_hunter", "cooking")

# Seeds of different splits live in disjoint ranges, so no game is shared across splits.
_SPLIT_SEED_OFFSET = {Split.train: 0, Split.dev: 10_000, Split.test: 20_000}
_MAX_PER_SPLIT = 10_000

# The food split of tw-cooking that matches each of our splits (unseen foods in dev/test).
_COOKING_FOOD_SPLIT = {Split.train: "train", Split.dev: "valid", Split.test: "test"}

# Quest generation fails for a few seeds/options; retry with seeds derived from the task seed so
# the game a task id names stays deterministic.
_GEN_ATTEMPTS = 8
_RETRY_SEED_STRIDE = 1_000_003

_INT_FIELDS = {
    "custom": {"q": "quest_length", "w": "world_size", "o": "nb_objects"},
    "treasure_hunter": {"l": "level"},
    "cooking": {"r": "recipe", "t": "take", "g": "go"},
}
_COOKING_FLAGS = ("open", "cook", "cut", "drop")
_FOOD_SPLITS = ("train", "valid", "test")


def default_cache_dir() -> Path:
    """``$EVOLVE_CACHE/textworld`` or ``~/.cache/evolve/textworld``."""
    root = os.environ.get("EVOLVE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "evolve") / "textworld"


@dataclass(frozen=True)
class GameSpec:
    """Everything needed to (re)generate one game; ``task_id`` and ``parse`` are inverses."""

    game_type: str
    seed: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        o = self.options
        parts = ["tw", self.game_type, f"s{self.seed}"]
        if self.game_type == "custom":
            parts += [f"q{o['quest_length']}", f"w{o['world_size']}", f"o{o['nb_objects']}"]
        elif self.game_type == "treasure_hunter":
            parts += [f"l{o['level']}"]
        else:
            parts += [f"r{o['recipe']}", f"t{o['take']}", f"g{o['go']}"]
            parts += [flag for flag in _COOKING_FLAGS if o.get(flag)]
            if o.get("split"):
                parts.append(f"f{o['split']}")
        return "-".join(parts)

    @classmethod
    def parse(cls, task_id: str) -> GameSpec:
        """Parse a task id; raises ``UnknownTaskError`` when it is not a valid TextWorld id."""
        tokens = task_id.split("-")
        if len(tokens) < 3 or tokens[0] != "tw" or tokens[1] not in GAME_TYPES:
            raise UnknownTaskError(
                f"unknown textworld task id {task_id!r}: expected tw-<{'|'.join(GAME_TYPES)}>-s<seed>-..."
            )
        game_type = tokens[1]
        seed_m = re.fullmatch(r"s(\d+)", tokens[2])
        if not seed_m:
            raise UnknownTaskError(f"unknown textworld task id {task_id!r}: third part must be s<seed>")
        # Cooking skills absent from the id are off: start from all-off so parsed specs equal listed ones.
        options: dict[str, Any] = {flag: False for flag in _COOKING_FLAGS} if game_type == "cooking" else {}
        int_fields = _INT_FIELDS[game_type]
        for tok in tokens[3:]:
            m = re.fullmatch(r"([a-z])(\d+)", tok)
            if m and m.group(1) in int_fields:
                options[int_fields[m.group(1)]] = int(m.group(2))
            elif game_type == "cooking" and tok in _COOKING_FLAGS:
                options[tok] = True
            elif game_type == "cooking" and tok[:1] == "f" and tok[1:] in _FOOD_SPLITS:
                options["split"] = tok[1:]
            else:
                raise UnknownTaskError(f"unknown textworld task id {task_id!r}: bad part {tok!r}")
        missing = [f for f in int_fields.values() if f not in options]
        if missing:
            raise UnknownTaskError(f"unknown textworld task id {task_id!r}: missing {', '.join(missing)}")
        spec = cls(game_type, int(seed_m.group(1)), options)
        spec.validate()
        return spec

    def validate(self) -> None:
        o = self.options
        bad = ""
        if self.game_type == "custom":
            if o["world_size"] < 1 or o["quest_length"] < 1 or o["nb_objects"] < 0:
                bad = "world size and quest length must be >= 1"
        elif self.game_type == "treasure_hunter":
            if not 1 <= o["level"] <= 30:
                bad = "treasure_hunter level must be in 1..30"
        elif self.game_type == "cooking":
            if o["go"] not in (1, 6, 9, 12):
                bad = "cooking go must be 1, 6, 9 or 12"
            elif not 1 <= o["recipe"] <= 5 or not 0 <= o["take"] <= o["recipe"]:
                bad = "cooking needs 1 <= recipe <= 5 and 0 <= take <= recipe"
        if bad:
            raise UnknownTaskError(f"invalid textworld task {self.task_id!r}: {bad}")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence Jericho's "unsupported game" warnings on every call, not only at import.

    TextWorld games have no Jericho walkthrough or action generator (TextWorld supplies both), and
    TextWorld's import-time ``simplefilter`` is lost wherever filters are reset (pytest, notebooks).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unable to (retrieve walkthrough|find valid actions)")
        yield


def _clean_feedback(text: str) -> str:
    """Drop the ASCII-art banner, the ``>`` prompt/status line and runs of blank lines."""
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">") or stripped.startswith("Would you like to RESTART"):
            continue
        if stripped and re.fullmatch(r"[_$|\\/<>\s]+", stripped):
            continue
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _fact_str(prop: Any) -> str:
    return f"{prop.name}({', '.join(v.name for v in prop.arguments)})"


def _state_from_facts(facts: list[Any]) -> tuple[str | None, list[str], list[str]]:
    """Location, inventory and visible entities, derived from the game's true state facts."""
    location: str | None = None
    holder: dict[str, tuple[str, str]] = {}  # entity -> (relation, what holds it)
    opened: set[str] = set()
    links: list[tuple[str, str]] = []
    for p in facts:
        args = [v.name for v in p.arguments]
        if p.name == "at" and args[0] == "P":
            location = args[1]
        elif p.name in ("at", "in", "on") and len(args) == 2:
            holder[args[0]] = (p.name, args[1])
        elif p.name == "open" and len(args) == 1:
            opened.add(args[0])
        elif p.name == "link" and len(args) == 3:
            links.append((args[0], args[1]))
    inventory = sorted(name for name, (_, h) in holder.items() if h == "I")
    visible: set[str] = set()
    if location is not None:
        for name in holder:
            node = name
            for _ in range(16):  # bounded walk up the containment tree
                rel, h = holder.get(node, ("", ""))
                if not h or h in ("I", "P"):
                    break
                if h == location:
                    visible.add(name)
                    break
                if rel == "in" and h not in opened:
                    break  # a closed container hides what is inside it
                node = h
        visible.update(door for room, door in links if room == location)
    return location, inventory, sorted(visible)


class TextWorldEnv:
    """TextWorld games behind the ``Env`` protocol.

    Games are generated lazily on first ``reset`` of a task (3-7 s) and cached on disk under
    ``cache_dir/tw<textworld version>/<task id>.z8``; two processes may generate the same game at
    once (each writes to a temp dir, then renames atomically).

    Default difficulties, measured with a random admissible-action agent (20 games, 5-10 episodes
    each): ``custom`` (5 rooms, 10 objects, quest length 5) walkthrough 3-5 steps, random wins 2% within
    30 steps, 6% within 50; ``treasure_hunter`` level 18: walkthrough 1-8 (mean 6.9), random wins 8% / 13%
    and loses 22% (picking up the wrong object); ``cooking`` (1 room, 1 ingredient to take, opening):
    walkthrough 5-6, random wins 0% / 2% and loses 28% (eats or spoils the food).
    """

    name = "textworld"

    def __init__(
        self,
        game_type: str = "custom",
        n_train: int = 20,
        n_dev: int = 5,
        n_test: int = 10,
        seed: int = 0,
        world_size: int = 5,
        nb_objects: int = 10,
        quest_length: int = 5,
        level: int = 18,
        recipe: int = 1,
        take: int = 1,
        go: int = 1,
        cooking_skills: Sequence[str] = ("open",),
        cooking_food_splits: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if game_type.startswith("tw-"):
            game_type = game_type[3:]
        if game_type not in GAME_TYPES:
            raise EnvError(
                f"unknown textworld game type {game_type!r}; choose one of "
                + ", ".join(f"tw-{g}" for g in GAME_TYPES)
            )
        for n in (n_train, n_dev, n_test):
            if not 0 <= n <= _MAX_PER_SPLIT:
                raise EnvError(f"textworld games per split must be in 0..{_MAX_PER_SPLIT}, got {n}")
        unknown_skills = set(cooking_skills) - set(_COOKING_FLAGS)
        if unknown_skills:
            raise EnvError(f"unknown cooking skills {sorted(unknown_skills)}; known: {list(_COOKING_FLAGS)}")
        self.game_type = game_type
        self.n = {Split.train: n_train, Split.dev: n_dev, Split.test: n_test}
        self.seed = seed
        self._difficulty: dict[str, Any] = {
            "custom": {"quest_length": quest_length, "world_size": world_size, "nb_objects": nb_objects},
            "treasure_hunter": {"level": level},
            "cooking": {"recipe": recipe, "take": take, "go": go}
            | {flag: flag in cooking_skills for flag in _COOKING_FLAGS},
        }[game_type]
        self.cooking_food_splits = cooking_food_splits
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._env: Any = None
        self._task: Task | None = None
        self._walkthrough: list[str] = []
        self._win_facts: list[str] = []
        self._last: Observation | None = None
        self._last_gs: Any = None
        self._split_of: dict[str, Split] = {}

    # ------------------------------------------------------------------ tasks

    def _spec(self, split: Split, index: int) -> GameSpec:
        options = dict(self._difficulty)
        if self.game_type == "cooking" and self.cooking_food_splits:
            options["split"] = _COOKING_FOOD_SPLIT[split]
        return GameSpec(self.game_type, self.seed + _SPLIT_SEED_OFFSET[split] + index, options)

    def tasks(self, split: Split | str) -> list[Task]:
        """A deterministic list of ``n_<split>`` games; seeds never overlap across splits."""
        split = Split(split)
        out = []
        for i in range(self.n[split]):
            spec = self._spec(split, i)
            self._split_of[spec.task_id] = split
            out.append(
                Task(
                    id=spec.task_id,
                    env=self.name,
                    split=split,
                    params={"game_type": spec.game_type, "seed": spec.seed, **spec.options},
                )
            )
        return out

    def _split_for(self, task_id: str) -> Split:
        if not self._split_of:
            for split in Split:
                self.tasks(split)
        return self._split_of.get(task_id, Split.train)

    # ------------------------------------------------------------------ generation

    def game_file(self, task: Task | str) -> Path:
        """Path of the compiled game for a task, generating and caching it on first use."""
        task_id = task.id if isinstance(task, Task) else task
        spec = GameSpec.parse(task_id)
        import textworld

        folder = self.cache_dir / f"tw{textworld.__version__}"
        target = folder / f"{spec.task_id}.z8"
        # The .z8 is renamed in last, so its presence means the .json beside it is complete too.
        if target.exists() and target.with_suffix(".json").exists():
            return target
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{spec.task_id}-", dir=folder))
        try:
            built = self._generate(spec, tmp)
            os.replace(built.with_suffix(".json"), target.with_suffix(".json"))
            os.replace(built, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def _generate(self, spec: GameSpec, out_dir: Path) -> Path:
        import textworld
        import textworld.challenges
        from textworld.generator import QuestGenerationError, compile_game, make_game

        last_err: Exception | None = None
        for attempt in range(_GEN_ATTEMPTS):
            options = textworld.GameOptions()
            options.seeds = spec.seed + attempt * _RETRY_SEED_STRIDE
            options.path = str(out_dir / f"{spec.task_id}.z8")
            options.force_recompile = True
            o = spec.options
            try:
                if spec.game_type == "custom":
                    options.nb_rooms = o["world_size"]
                    options.nb_objects = o["nb_objects"]
                    options.quest_length = o["quest_length"]
                    # tw-make's default breadth range: linear-to-branching quests of that length.
                    options.chaining.min_breadth, options.chaining.max_breadth = 1, 5
                    game = make_game(options)
                else:
                    _, make, _ = textworld.challenges.CHALLENGES[f"tw-{spec.game_type}"]
                    settings = dict(o)
                    settings.setdefault("split", None)
                    settings["recipe_seed"] = 0
                    game = make(settings=settings, options=options)
            except (QuestGenerationError, ValueError, AssertionError) as e:
                last_err = e
                continue
            return Path(compile_game(game, options))
        raise EnvError(f"textworld could not generate {spec.task_id} in {_GEN_ATTEMPTS} attempts: {last_err}")

    # ------------------------------------------------------------------ episode

    def _infos(self) -> Any:
        from textworld import EnvInfos

        # `location` is accepted by EnvInfos but not filled by TextWorld 1.7; we derive it from facts.
        return EnvInfos(
            feedback=True,
            description=True,
            inventory=True,
            facts=True,
            admissible_commands=True,
            policy_commands=True,
            intermediate_reward=True,
            objective=True,
            score=True,
            max_score=True,
            won=True,
            lost=True,
            moves=True,
            win_facts=True,
            extras=["walkthrough"],
        )

    def reset(self, task: Task | str) -> Observation:
        """Load (generating if needed) and start a game."""
        import textworld

        task_id = task.id if isinstance(task, Task) else task
        path = self.game_file(task_id)
        if isinstance(task, Task):
            self._task = task
        else:
            spec = GameSpec.parse(task_id)
            self._task = Task(
                id=task_id,
                env=self.name,
                split=self._split_for(task_id),
                params={"game_type": spec.game_type, "seed": spec.seed, **spec.options},
            )
        self.close()
        try:
            with _quiet():
                self._env = textworld.start(str(path), request_infos=self._infos())
                gs = self._env.reset()
        except Exception as e:  # noqa: BLE001 - any engine failure is reported as one error type
            self._env = None
            raise EnvCrashed(f"textworld failed to start {task_id}: {type(e).__name__}: {e}") from e
        self._walkthrough = list(gs.get("extra.walkthrough") or [])
        # One line per way of winning: the facts that must all hold (quest win conditions).
        self._win_facts = [
            "win: " + " & ".join(_fact_str(p) for p in event)
            for quest in gs.get("win_facts") or []
            for event in quest
        ]
        self._task = self._task.model_copy(update={"goal": gs.get("objective") or ""})
        self._last = self._observation(gs, reward=0.0, info={})
        return self._last

    def step(self, action: str) -> Observation:
        """Apply one command; after the episode ends, returns the terminal observation unchanged."""
        if self._env is None or self._last is None:
            raise EnvError("textworld: call reset() before step()")
        if self._last.state.done:
            # TextWorld would answer with its RESTART/QUIT prompt and report done=False again.
            return self._last.model_copy(update={"reward": 0.0, "info": {"episode_over": True}})
        admissible = set(self._last.admissible_actions or [])
        prev_score = self._last.state.score
        try:
            with _quiet():
                gs, _, _ = self._env.step(action)
        except Exception as e:  # noqa: BLE001
            self.close()
            raise EnvCrashed(f"textworld crashed on {action!r}: {type(e).__name__}: {e}") from e
        info = {"admissible": action.strip().lower() in admissible}
        obs = self._observation(gs, reward=0.0, info=info)
        obs.reward = obs.state.score - prev_score
        self._last = obs
        return obs

    def _observation(self, gs: Any, reward: float, info: dict[str, Any]) -> Observation:
        self._last_gs = gs
        facts = list(gs.get("facts") or [])
        location, inventory, visible = _state_from_facts(facts)
        won, lost = bool(gs.get("won")), bool(gs.get("lost"))
        state = EnvState(
            location=location,
            inventory=inventory,
            visible=visible,
            score=float(gs.get("score") or 0),
            max_score=float(gs["max_score"]) if gs.get("max_score") is not None else None,
            done=won or lost,
            won=won,
            lost=lost,
            moves=int(gs.get("moves") or 0),
            facts=sorted({_fact_str(p) for p in facts}),
        )
        return Observation(
            text=_clean_feedback(gs.get("feedback") or ""),
            state=state,
            goal=gs.get("objective") or "",
            admissible_actions=list(gs.get("admissible_commands") or []),
            reward=reward,
            info=info,
        )

    def privileged(self) -> Privileged:
        """The walkthrough from the start, plus the winning commands left from the current state."""
        if self._last_gs is None:
            raise EnvError("textworld: call reset() before privileged()")
        remaining = list(self._last_gs.get("policy_commands") or [])
        return Privileged(
            gold_actions=list(self._walkthrough),
            facts=list(self._win_facts),
            notes="Winning commands from the current state: " + " > ".join(remaining) if remaining else "",
        )

    @property
    def current_task(self) -> Task | None:
        return self._task

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            except Exception:  # noqa: BLE001 - closing a broken engine must not raise
                pass
            self._env = None
