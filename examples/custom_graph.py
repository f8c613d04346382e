"""Record YOUR OWN LangGraph agent into an evolve store.

A small user-written graph (not evolve's agent) plays TextWorld games by picking a random
admissible command. One ``Recorder.node`` wired after the reset and after every env step turns
each run into a diagnosed trajectory in a DuckDB store, ready for skill distillation.

    python examples/custom_graph.py --store /tmp/mine.duckdb --games 3
"""

from __future__ import annotations

import argparse
import random
from typing import TypedDict

from langgraph.graph import END, START, StateGraph

from evolve.agents.recorder import Recorder
from evolve.envs import make_env
from evolve.schema import Observation
from evolve.stores import ExperienceStore


class GameState(TypedDict, total=False):
    task_id: str
    observation: Observation
    action: str | None
    done: bool
    steps: int


def build_graph(env, recorder: Recorder, rng: random.Random, max_steps: int):
    def reset(state: GameState) -> dict:
        return {"observation": env.reset(state["task_id"]), "action": None, "done": False, "steps": 0}

    def choose(state: GameState) -> dict:
        return {"action": rng.choice(state["observation"].admissible_actions)}

    def act(state: GameState) -> dict:
        obs = env.step(state["action"])
        return {"observation": obs, "done": obs.state.done, "steps": state["steps"] + 1}

    def next_node(state: GameState) -> str:
        return END if state["done"] or state["steps"] >= max_steps else "choose"

    g = StateGraph(GameState)
    g.add_node("reset", reset)
    # Records nothing after the reset (no action yet), then one step after every env step.
    g.add_node("record", recorder.node(env="textworld", policy="my-random-agent"))
    g.add_node("choose", choose)
    g.add_node("act", act)
    g.add_edge(START, "reset")
    g.add_edge("reset", "record")
    g.add_conditional_edges("record", next_node)
    g.add_edge("choose", "act")
    g.add_edge("act", "record")
    return g.compile()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="custom_graph.duckdb")
    ap.add_argument("--games", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    env = make_env("textworld", n_train=args.games)
    rng = random.Random(args.seed)
    with Recorder(args.store, namespace="custom", run_id="custom-graph") as recorder:
        app = build_graph(env, recorder, rng, args.max_steps)
        for task in env.tasks("train"):
            # Each game is one run; the recursion limit bounds the graph's super-steps.
            app.invoke({"task_id": task.id}, {"recursion_limit": 4 * args.max_steps + 10})
    env.close()

    with ExperienceStore(args.store, namespace="custom") as store:
        for t in store.trajectories(run_id="custom-graph"):
            causes = ", ".join(t.diagnosis.cause_names()) if t.diagnosis else ""
            print(f"{t.task_id}: {t.outcome.value} in {len(t.steps)} steps  {causes}")


if __name__ == "__main__":
    main()
