"""`evolve run`: the stages of a job wired from a JobConfig. A recipe: read it top to bottom.

collect -> diagnose -> distill -> synth -> train -> eval

Every stage writes its outputs keyed by (run id, stage) in DuckDB transactions and marks itself
done last, so a rerun after a crash or ``kill -9`` skips finished stages and, inside collect and
eval, skips finished episodes: nothing is lost and nothing is recorded twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from evolve.config import JobConfig, TrainStage
from evolve.envs import build_env
from evolve.errors import ConfigError, EvolveError
from evolve.eval import Episodes, Memory, ProbationRunner, record_usage, task_ids
from evolve.eval.metrics import compare
from evolve.schema import Checkpoint, CheckpointStatus, Knowledge, Outcome, Split, TrainingExample, Trajectory
from evolve.specs import EnvSpec, PolicySpec
from evolve.stores import ExperienceStore, make_embedder
from evolve.train.trainer import ON_POLICY_METHODS

log = logging.getLogger("evolve.pipeline")


def memory_for(
    store: ExperienceStore,
    namespace: str,
    embedder: str,
    *,
    env: str | None = None,
    config: Any = None,
    raw_kwargs: dict[str, Any] | None = None,
    reranker: str | None = None,
) -> Memory:
    """The skills package wired into the eval harness: evolve / raw-trajectory hooks, snapshots
    distilled from trajectories alone (items the store retired left out), usage per item;
    ``reranker`` (a trained reranker's directory) reranks/filters the evolve arm's retrievals.

    The context-only ablations are the same memories with their acting switched off: evolve with
    ``propose=False`` (guardrails and the loop guard still enforced), raw retrieval with
    ``propose=False`` (excerpts shown, nothing replayed)."""
    from evolve.skills import (
        EvolveMemory,
        MemoryConfig,
        RawTrajectoryMemory,
        distill_snapshot,
        usage_from_trajectories,
    )

    evolve_kw: dict[str, Any] = {"embedder": embedder}
    if reranker is not None:
        evolve_kw["reranker"] = reranker
    if env is not None:
        evolve_kw["env"] = env
    context_config = (config if config is not None else MemoryConfig()).model_copy(update={"propose": False})
    if config is not None:
        evolve_kw["config"] = config
    raw_kw = dict(raw_kwargs or {})
    return Memory(
        evolve=lambda knowledge: EvolveMemory.factory(list(knowledge), **evolve_kw),
        raw=lambda trajs: RawTrajectoryMemory.factory(list(trajs), embedder=embedder, **raw_kw),
        distill=lambda trajs: list(distill_snapshot(trajs, store, namespace)),
        usage=usage_from_trajectories,
        evolve_context=lambda knowledge: EvolveMemory.factory(
            list(knowledge), **{**evolve_kw, "config": context_config}
        ),
        raw_exemplars=lambda trajs: RawTrajectoryMemory.factory(
            list(trajs), embedder=embedder, **{**raw_kw, "propose": False}
        ),
    )


def active_knowledge(store: ExperienceStore, namespace: str) -> list[Knowledge]:
    return [*store.skills(namespace, status="active"), *store.guardrails(namespace, status="active")]


class Ctx:
    """What every stage needs: the job, the store, the run id, where to write, how to talk."""

    def __init__(self, cfg: JobConfig, store: ExperienceStore, run_id: str, console: Console):
        self.cfg = cfg
        self.store = store
        self.run_id = run_id
        self.console = console
        self.ns = cfg.store.namespace
        self.run_dir = cfg.run_path
        self.memory = memory_for(store, self.ns, cfg.store.embedder, reranker=self.trained_reranker())

    def trained_reranker(self) -> str | None:
        """The reranker this job's train stage wrote (``method: reranker``), once it exists."""
        st = self.cfg.stages.train
        if st is None or st.method != "reranker":
            return None
        d = _output_dir(self, st) / "reranker"
        return str(d) if (d / "evolve_reranker.json").is_file() else None

    @property
    def env_spec(self) -> EnvSpec:
        return EnvSpec(name=self.cfg.env.name, kwargs=dict(self.cfg.env.kwargs))

    def policy(self, key: str) -> dict[str, Any]:
        return self.cfg.policies[key].model_dump(exclude_none=True)

    def trajs(self, arm: str | None = None, split: str | None = None) -> list[Trajectory]:
        return self.store.trajectories(self.ns, run_id=self.run_id, arm=arm, split=split)

    def episodes(
        self,
        policy_key: str | dict[str, Any],
        *,
        split: str,
        seeds: list[int],
        max_steps: int,
        workers: int,
    ) -> Episodes:
        """Episodes of this run with the policy ``policy_key`` (or a policy spec); finished ones
        are never rerun."""

        def announce(arm: str, n: int, seed: int) -> None:
            self.console.print(f"[cyan]{arm}[/]: {n} episodes on {split} (seed {seed})")

        return Episodes(
            self.store,
            self.env_spec,
            self.policy(policy_key) if isinstance(policy_key, str) else policy_key,
            namespace=self.ns,
            run_id=self.run_id,
            split=split,
            seeds=seeds,
            max_steps=max_steps,
            workers=workers,
            announce=announce,
        )


# --------------------------------------------------------------------------------------- stages
def stage_collect(ctx: Ctx) -> dict[str, Any]:
    st = ctx.cfg.stages.collect
    assert st is not None
    ids = task_ids(ctx.env_spec, st.split, st.episodes)
    out: dict[str, Any] = {}
    for key in [st.policy, *st.also]:
        episodes = ctx.episodes(
            key, split=st.split, seeds=st.seeds, max_steps=st.max_steps, workers=st.workers
        )
        trajs = episodes.run(f"collect:{key}", ids)
        out[key] = {"episodes": len(trajs), "success": sum(t.success for t in trajs)}
    return out


def _collected(ctx: Ctx) -> list[Trajectory]:
    return [t for t in ctx.trajs() if t.arm.startswith("collect:")]


def stage_diagnose(ctx: Ctx) -> dict[str, Any]:
    from evolve.diagnose import diagnose_trajectory

    st = ctx.cfg.stages.diagnose
    step_limit = ctx.cfg.stages.collect.max_steps if ctx.cfg.stages.collect else None
    trajs = [diagnose_trajectory(t, step_limit=step_limit) for t in _collected(ctx)]
    if st is not None and st.llm is not None:
        from evolve.diagnose import LLMDiagnoser

        llm = LLMDiagnoser(st.llm.model or "", st.llm.base_url, api_key_env=st.llm.api_key_env)
        trajs = [llm.diagnose_trajectory(t, step_limit=step_limit) if not t.success else t for t in trajs]
    ctx.store.add_trajectories(trajs)  # replaces by id, in one transaction
    causes: dict[str, int] = {}
    for t in trajs:
        if t.diagnosis and not t.success:
            for c in t.diagnosis.cause_names():
                causes[c] = causes.get(c, 0) + 1
    return {"episodes": len(trajs), "failed": sum(not t.success for t in trajs), "causes": causes}


def _distill(ctx: Ctx, trajs: list[Trajectory], tag: str) -> dict[str, Any]:
    """Distill knowledge from ``trajs`` into the store, run probation on held-out tasks, and write
    the probation episodes' usage back to the store."""
    from evolve.skills import distill_knowledge, run_probation

    st = ctx.cfg.stages.distill
    assert st is not None
    skills, guards = distill_knowledge(trajs, store=ctx.store, namespace=ctx.ns, min_support=st.min_support)
    info: dict[str, Any] = {"skills": len(skills), "guardrails": len(guards)}
    if st.probation.enabled and (skills or guards):
        ev = ctx.cfg.stages.eval
        episodes = ctx.episodes(
            ev.policy if ev else "student",
            split=st.probation.split,
            seeds=st.probation.seeds,
            max_steps=ev.max_steps if ev else 40,
            workers=ev.workers if ev else 1,
        )
        runner = ProbationRunner(episodes, ctx.memory, label=lambda arm, _k: f"probation:{tag}:{arm}")
        ids = task_ids(ctx.env_spec, st.probation.split, st.probation.episodes)
        info["probation"] = run_probation(ctx.store, [*skills, *guards], runner, ids, namespace=ctx.ns)
        info["usage_written"] = record_usage(
            ctx.store,
            ctx.memory,
            runner.trajectories,
            run_id=ctx.run_id,
            label=f"probation:{tag}",
            namespace=ctx.ns,
        )
    return info


def stage_distill(ctx: Ctx) -> dict[str, Any]:
    return _distill(ctx, [t for t in _collected(ctx) if t.split == Split.train], tag="main")


def stage_synth(ctx: Ctx) -> dict[str, Any]:
    from evolve.synth import privileged_examples, sft_examples

    st = ctx.cfg.stages.synth
    assert st is not None
    trajs = _collected(ctx)
    opts = _student_prompt(ctx)  # train on the layout the student will see at act time
    examples = []
    if "sft" in st.kinds:
        examples += sft_examples(trajs, namespace=ctx.ns, options=opts)
    if "privileged" in st.kinds:
        skills = ctx.store.skills(ctx.ns, status="active")
        examples += privileged_examples(
            [t for t in trajs if not t.success],
            _privileged(ctx, trajs),
            skills,
            namespace=ctx.ns,
            options=opts,
        )
    ctx.store.add_examples(examples)
    kinds: dict[str, int] = {}
    for e in examples:
        kinds[e.kind.value] = kinds.get(e.kind.value, 0) + 1
    return {"examples": kinds}


def _privileged(ctx: Ctx, trajs: list[Trajectory]) -> dict[str, Any]:
    env = build_env(ctx.env_spec)
    out = {}
    try:
        for tid in sorted({t.task_id for t in trajs if not t.success}):
            env.reset(tid)
            out[tid] = env.privileged()
    finally:
        env.close()
    return out


# ------------------------------------------------------------------ train: weights, with probation
def stage_train(ctx: Ctx) -> dict[str, Any]:
    """Train what ``stages.train.method`` names: the student's weights on the namespace's examples
    (sft, distill) or the memory's reranker on its retrieval logs (reranker)."""
    st = ctx.cfg.stages.train
    assert st is not None
    if st.method == "reranker":
        return _train_reranker(ctx, st)
    return _train_student(ctx, st)


def _train_reranker(ctx: Ctx, st: TrainStage) -> dict[str, Any]:
    """``evolve.train.reranker.train_reranker`` on the namespace's retrieval decisions."""
    from evolve.train.reranker import RerankerSettings, train_reranker

    fields = {"namespace": ctx.ns, "out_dir": str(_output_dir(ctx, st) / "reranker"), **st.reranker}
    if st.student:
        fields.setdefault("base_model", st.student)
    try:
        settings = RerankerSettings.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(
            f"stages.train.reranker.{loc}: {err['msg'].removeprefix('Value error, ')}"
        ) from None
    result = train_reranker(ctx.store, settings, log=lambda m: ctx.console.print(f"[dim]{m}[/]"))
    ctx.console.print(f"reranker -> {result.model_dir}")
    # the later stages' evolve arm retrieves through it (filter by its calibrated threshold)
    ctx.memory = memory_for(ctx.store, ctx.ns, ctx.cfg.store.embedder, reranker=result.model_dir)
    return result.model_dump(mode="json")


def _train_student(ctx: Ctx, st: TrainStage) -> dict[str, Any]:
    """Train the student on the namespace's examples, record the checkpoint with its lineage, then
    probation for weights: the checkpoint becomes the run's student only if it beats the current
    one on the probation split (same tasks and seeds); otherwise it stays a candidate."""
    on_policy = st.method in ON_POLICY_METHODS
    knowledge = active_knowledge(ctx.store, ctx.ns) if st.method == "skill_sd" else []
    examples = [] if on_policy else _train_examples(ctx, st)
    base = _student_path(ctx, st)
    student = _student_weights(ctx, base)
    fields = st.trainer_fields()
    # on-policy: the env and (skill_sd) the knowledge are the data
    fp = _fingerprint(
        {**fields, "env": ctx.env_spec.model_dump(), "knowledge": sorted(k.id for k in knowledge)}
        if on_policy
        else fields,
        base,
        examples,
    )
    ckpt_id = f"ckpt-{ctx.run_id}-{fp}"
    ckpt = next((c for c in ctx.store.checkpoints(ctx.ns, run_id=ctx.run_id) if c.id == ckpt_id), None)
    if ckpt is not None and Path(ckpt.path).exists():
        ctx.console.print(f"[dim]{ckpt_id}: trained earlier on the same examples and settings, reused[/]")
    else:
        out_dir = _output_dir(ctx, st) / fp
        if on_policy:
            ctx.console.print(
                f"training ({st.method}) {student} on its own rollouts in {ctx.env_spec.name} -> {out_dir}"
            )
            loss, result = _train_on_policy(ctx, fields, student, out_dir, knowledge)
        else:
            ctx.console.print(f"training ({st.method}) {student} on {len(examples)} examples -> {out_dir}")
            loss, result = _train(fields, student, out_dir, examples)
        ckpt = ctx.store.add_checkpoint(
            Checkpoint(
                id=ckpt_id,
                namespace=ctx.ns,
                run_id=ctx.run_id,
                policy=st.policy,
                path=str(result.merged_dir),
                adapter_dir=str(result.adapter_dir) if result.adapter_dir else None,
                base_model=base,
                method=st.method,
                loss=loss,
                metrics={"train": _train_metrics(result)},
                example_ids=list(result.examples),
                trajectory_ids=list(result.trajectories),
            )
        )
    dev = _weights_probation(ctx, st, ckpt)
    ckpt = ctx.store.get_checkpoint(ckpt.id, ctx.ns)
    ctx.console.print(f"[bold]{ckpt.id}[/]: {ckpt.reason}")
    return {
        "checkpoint": ckpt.id,
        "status": ckpt.status.value,
        "reason": ckpt.reason,
        "path": ckpt.path,
        "examples": len(ckpt.example_ids),
        "trajectories": len(ckpt.trajectory_ids),
        "steps": ckpt.metrics.get("train", {}).get("steps"),
        "dev": dev,
    }


def _train_examples(ctx: Ctx, st: TrainStage) -> list[TrainingExample]:
    examples = [e for kind in st.kinds for e in ctx.store.examples(ctx.ns, kind=kind)]
    if not examples:
        raise ConfigError(
            f"stage train: no training examples of kind {', '.join(st.kinds)} in namespace '{ctx.ns}'; "
            "run the synth stage first (stages.synth) or change stages.train.kinds"
        )
    return examples


def _student_path(ctx: Ctx, st: TrainStage) -> str:
    base = ctx.cfg.policies.get(st.policy)
    path = st.student or (base.path if base is not None else None) or ""
    if not Path(path).expanduser().exists():
        raise ConfigError(
            f"stages.train.student: model path '{path}' does not exist; set it to a local model "
            "directory or .gguf file"
        )
    return path


def _student_weights(ctx: Ctx, path: str) -> str:
    """``path`` itself, or for a ``.gguf`` file a plain transformers directory converted from it
    once per run (``<run_dir>/models/``): training and every episode's worker process then load
    it in a second instead of dequantising the GGUF again."""
    src = Path(path).expanduser()
    if src.suffix != ".gguf":
        return path
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = ctx.run_dir / "models" / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    from evolve.llm.hf import load_causal_lm
    from evolve.train.trainer import _serializable

    ctx.console.print(f"converting {src.name} to a transformers checkpoint -> {out}")
    model, tok = load_causal_lm(src, device="cpu", dtype="float32")
    tmp = out.with_name(out.name + ".tmp")
    _serializable(model).save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    tmp.rename(out)  # whole or absent: a crash mid-write leaves only the .tmp directory
    return str(out)


def _output_dir(ctx: Ctx, st: TrainStage) -> Path:
    p = Path(st.output_dir).expanduser()
    return p if p.is_absolute() else ctx.run_dir / p


def _fingerprint(fields: dict[str, Any], student: str, examples: Sequence[TrainingExample]) -> str:
    """Same settings, student and examples -> same id and directory: a rerun after a crash resumes
    the trainer's own checkpoints there, and a finished one is reused instead of trained again."""
    h = hashlib.sha256(json.dumps([fields, student], sort_keys=True, default=str).encode())
    for e in sorted(examples, key=lambda e: e.id):
        h.update(
            e.model_dump_json(include={"id", "kind", "messages", "privileged_context", "weight"}).encode()
        )
    return h.hexdigest()[:10]


def _train_config(fields: dict[str, Any], student: str, out_dir: Path) -> Any:
    """The stage's ``TrainConfig``; a bad setting is one :class:`ConfigError` line."""
    from evolve.train.trainer import TrainConfig

    try:
        config = TrainConfig.model_validate({**fields, "student": student, "output_dir": str(out_dir)})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"stages.train.{loc}: {err['msg'].removeprefix('Value error, ')}") from None
    return config


def _train(
    fields: dict[str, Any], student: str, out_dir: Path, examples: Sequence[TrainingExample]
) -> tuple[str, Any]:
    """``evolve.train.trainer.train`` on the examples; a bad setting is one :class:`ConfigError` line."""
    from evolve.train.trainer import train

    config = _train_config(fields, student, out_dir)
    result = train(config, examples)
    # The loss the trainer used: its resolved default when the job left it unset.
    return getattr(result, "loss", None) or config.loss or "ce", result


def _train_on_policy(
    ctx: Ctx, fields: dict[str, Any], student: str, out_dir: Path, knowledge: Sequence[Knowledge]
) -> tuple[str, Any]:
    """``evolve.train.onpolicy.train_on_policy`` in the job's env; episodes recorded under the run."""
    from evolve.train.onpolicy import train_on_policy

    config = _train_config(fields, student, out_dir)
    hooks = None
    if config.method == "skill_sd":
        if not knowledge:
            raise ConfigError(
                f"stages.train: method 'skill_sd' needs active skills or guardrails in namespace '{ctx.ns}'; "
                "run the distill stage first"
            )
        hooks = ctx.memory.evolve(knowledge)  # the evolve arm's memory: what the eval shows the agent
    result = train_on_policy(
        config, ctx.env_spec, ctx.store, namespace=ctx.ns, run_id=ctx.run_id, knowledge_hooks=hooks
    )
    return result.loss or "reverse_kl", result


def _train_metrics(result: Any) -> dict[str, Any]:
    losses = list(result.losses)
    return {
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "eval_losses": list(result.eval_losses),
        "wall_s": result.wall_s,
        "tokens_per_s": result.tokens_per_s,
        "peak_rss_mb": result.peak_rss_mb,
        "output_dir": str(result.output_dir),
    }


def _base_spec(ctx: Ctx, st: TrainStage) -> dict[str, Any]:
    """The configured student (before any training): ``policies[st.policy]``, else the base model;
    a GGUF one runs from its converted weights (:func:`_student_weights`)."""
    spec = ctx.policy(st.policy) if st.policy in ctx.cfg.policies else {"kind": "hf", "path": st.student}
    if spec.get("kind") == "hf" and spec.get("path"):
        spec["path"] = _student_weights(ctx, spec["path"])
    return spec


def trained_spec(cfg: JobConfig, key: str, ckpt: Checkpoint) -> dict[str, Any]:
    """The policy spec that runs ``ckpt``: ``policies[key]``'s settings when it is an hf policy."""
    upd = {"path": ckpt.path, "name": f"{key}@{ckpt.id}"}
    base = cfg.policies.get(key)
    if base is not None and base.kind == "hf":
        return base.model_copy(update=upd).model_dump(exclude_none=True)
    return PolicySpec(kind="hf", **upd).model_dump(exclude_none=True)


def _current_student(ctx: Ctx, st: TrainStage, exclude: str) -> tuple[str, dict[str, Any]]:
    """The run's student for ``st.policy`` now: its active checkpoint, else the configured policy."""
    for c in reversed(ctx.store.checkpoints(ctx.ns, run_id=ctx.run_id, policy=st.policy, status="active")):
        if c.id != exclude:
            return c.id, trained_spec(ctx.cfg, st.policy, c)
    return st.policy, _base_spec(ctx, st)


def weights_verdict(
    before: Sequence[Trajectory], after: Sequence[Trajectory], n_boot: int = 1000
) -> tuple[bool, dict[str, Any]]:
    """Does ``after`` (the trained student) beat ``before`` (the current one)? Paired on the
    episodes both ran (task, seed): a higher success rate, or the same and a higher score."""
    from evolve.eval.metrics import arm_metrics

    c = compare("after", after, "before", before, n_boot)
    keys = {(t.task_id, t.seed) for t in after} & {(t.task_id, t.seed) for t in before}
    b = arm_metrics("before", [t for t in before if (t.task_id, t.seed) in keys], n_boot)
    a = arm_metrics("after", [t for t in after if (t.task_id, t.seed) in keys], n_boot)
    ds, dg = c.success_delta.mean, c.score_delta.mean
    wins = c.paired_episodes > 0 and (ds > 1e-12 or (abs(ds) <= 1e-12 and dg > 1e-9))
    return wins, {
        "paired_episodes": c.paired_episodes,
        "before": {"success": round(b.success.mean, 4), "score": round(b.score.mean, 2)},
        "after": {"success": round(a.success.mean, 4), "score": round(a.score.mean, 2)},
        "success_delta": [round(ds, 4), round(c.success_delta.lo, 4), round(c.success_delta.hi, 4)],
        "score_delta": [round(dg, 2), round(c.score_delta.lo, 2), round(c.score_delta.hi, 2)],
    }


def _weights_probation(ctx: Ctx, st: TrainStage, ckpt: Checkpoint) -> dict[str, Any]:
    pr = st.probation
    if ckpt.status == CheckpointStatus.rejected:
        return {"skipped": "the checkpoint was rejected by hand"}
    if not pr.enabled:
        ctx.store.update_checkpoint(
            ckpt.id,
            ctx.ns,
            reason="candidate: probation is disabled (stages.train.probation.enabled), nothing replaced",
        )
        return {"skipped": "probation disabled"}
    label, current = _current_student(ctx, st, exclude=ckpt.id)
    ev, co = ctx.cfg.stages.eval, ctx.cfg.stages.collect
    max_steps = pr.max_steps or (ev.max_steps if ev else co.max_steps if co else 40)
    ids = task_ids(ctx.env_spec, pr.split, pr.episodes)
    episodes = ctx.episodes(
        current, split=pr.split, seeds=pr.seeds, max_steps=max_steps, workers=ev.workers if ev else 1
    )
    before = episodes.run(f"probation:weights:{label}", ids)
    after = episodes.run(f"probation:weights:{ckpt.id}", ids, policy=trained_spec(ctx.cfg, st.policy, ckpt))
    wins, dev = weights_verdict(before, after, ev.bootstrap if ev else 1000)
    dev = {"split": pr.split, "current": label, **dev}
    b, a = dev["before"], dev["after"]
    what = (
        f"on {pr.split} ({dev['paired_episodes']} paired episodes) success {100 * b['success']:.0f}% -> "
        f"{100 * a['success']:.0f}%, score {b['score']:.1f} -> {a['score']:.1f}"
    )
    with ctx.store.transaction():
        if wins:
            for old in ctx.store.checkpoints(ctx.ns, run_id=ctx.run_id, policy=st.policy, status="active"):
                if old.id != ckpt.id:
                    ctx.store.update_checkpoint(
                        old.id, ctx.ns, status=CheckpointStatus.retired, reason=f"retired: {ckpt.id} beat it"
                    )
            reason = f"active: beat the current student '{label}' {what}"
            status = CheckpointStatus.active
        else:
            reason = (
                f"candidate: did not beat the current student '{label}' {what} (needs a higher success "
                "rate, or the same and a higher score); the student is unchanged"
            )
            status = CheckpointStatus.candidate
        ctx.store.update_checkpoint(ckpt.id, ctx.ns, status=status, reason=reason, metrics={"dev": dev})
    return dev


def _student_prompt(ctx: Ctx) -> Any:
    """The prompt options of the student the train stage trains (as ``make_policy`` builds them),
    so its examples are rendered exactly as it will be prompted; None = the default layout."""
    tr = ctx.cfg.stages.train
    spec = ctx.cfg.policies.get(tr.policy) if tr is not None else None
    if spec is None or spec.kind not in ("hf", "openai"):
        return None
    from evolve.llm.prompts import PromptOptions

    fmt = "command" if spec.kind == "hf" and spec.mode == "rank" else "json"
    return PromptOptions(max_actions=spec.max_actions, max_turns=spec.max_turns, action_format=fmt)


def stage_eval(ctx: Ctx) -> dict[str, Any]:
    """Every configured arm on the eval split (resumably), the learning curve, usage written back,
    then report.md + plots."""
    from evolve.eval import (
        EvalReport,
        arm_metrics,
        compare_arms,
        knowledge_counts,
        learning_curve,
        print_report,
        run_arms,
        write_report,
    )

    st = ctx.cfg.stages.eval
    assert st is not None
    ids = task_ids(ctx.env_spec, st.split, st.episodes)
    train = [t for t in ctx.trajs() if t.arm.startswith("collect:") and t.split == Split.train]
    episodes = ctx.episodes(
        st.policy, split=st.split, seeds=st.seeds, max_steps=st.max_steps, workers=st.workers
    )
    oracle = next((k for k, p in ctx.cfg.policies.items() if p.kind == "oracle"), None)
    knowledge = active_knowledge(ctx.store, ctx.ns)
    results = run_arms(
        episodes,
        ctx.memory,
        st.arms,
        ids,
        knowledge=knowledge,
        train=train,
        policies={"oracle": ctx.policy(oracle)} if oracle else {},
    )
    # The student after training: the same arms (with and without memory) with the checkpoint.
    ckpt = _eval_checkpoint(ctx)
    trained_arms = [a for a in st.arms if a != "oracle"] if ckpt is not None else []
    if ckpt is not None:
        spec = trained_spec(ctx.cfg, st.policy, ckpt)
        after = run_arms(
            episodes,
            ctx.memory,
            trained_arms,
            ids,
            knowledge=knowledge,
            train=train,
            policies={a: spec for a in trained_arms},
            label=lambda arm: f"eval:{ckpt.id}:{arm}",
        )
        results.update({f"trained:{a}": ts for a, ts in after.items()})
    student_results, student_comparisons, student_notes = _student_arms(ctx, knowledge, train)
    results.update(student_results)
    used = record_usage(
        ctx.store,
        ctx.memory,
        [t for trajs in results.values() for t in trajs],
        run_id=ctx.run_id,
        label="eval",
        namespace=ctx.ns,
    )
    curve = []
    if st.learning_curve:
        order = sorted(train, key=lambda t: (t.created_at, t.id))
        curve = learning_curve(episodes, ctx.memory, order, st.learning_curve, ids, n_boot=st.bootstrap)
    arms = [arm_metrics(a, ts, st.bootstrap) for a, ts in results.items()]
    distill = ctx.cfg.stages.distill
    report = EvalReport(
        title=f"evolve eval: {ctx.cfg.name}",
        env=ctx.cfg.env.name,
        split=st.split,
        policy=f"{st.policy} ({ctx.cfg.policies[st.policy].kind})",
        arms=arms,
        comparisons=[
            *compare_arms(results, st.bootstrap),
            *(
                compare(f"trained:{a}", results[f"trained:{a}"], a, results[a], st.bootstrap)
                for a in trained_arms
            ),
            *student_comparisons,
        ],
        curve=curve,
        knowledge={"counts": knowledge_counts(ctx.store, ctx.ns), "train_episodes": len(train)},
        notes=[
            f"Held-out tasks: {len(ids)} x seeds {st.seeds}; knowledge distilled from train episodes only, "
            f"activated by probation on {distill.probation.split if distill else '-'} tasks.",
            *([_checkpoint_note(st.policy, ckpt)] if ckpt is not None else []),
            *student_notes,
            f"Run id {ctx.run_id}; trajectories are in {ctx.cfg.store_path} (namespace {ctx.ns}).",
        ],
    )
    files = write_report(report, ctx.run_dir)
    print_report(report, ctx.console)
    return {
        "report": str(files["report"]),
        "success": {m.arm: round(m.success.mean, 3) for m in arms},
        "episodes_per_arm": len(ids) * len(st.seeds),
        "usage_written": used,
        **({"checkpoint": ckpt.id, "checkpoint_status": ckpt.status.value} if ckpt is not None else {}),
    }


def _eval_checkpoint(ctx: Ctx, policy: str | None = None) -> Checkpoint | None:
    """The checkpoint of ``policy`` (default: the eval policy) this run trained that the eval shows
    "after training" (``stages.eval.trained``: the latest, only an active one, or none)."""
    st = ctx.cfg.stages.eval
    assert st is not None
    if st.trained == "none":
        return None
    status = "active" if st.trained == "active" else None
    found = ctx.store.checkpoints(ctx.ns, run_id=ctx.run_id, policy=policy or st.policy, status=status)
    return found[-1] if found else None


def _student_arms(
    ctx: Ctx, knowledge: Sequence[Knowledge], train: Sequence[Trajectory]
) -> tuple[dict[str, list[Trajectory]], list[Any], list[str]]:
    """A student trained for another policy than the eval's (``stages.train.policy``), shown
    beside the eval's arms: the arms of ``stages.train.eval`` with the configured student
    (rows ``<key>:<arm>``) and with its checkpoint (``<key>+<method>:<arm>``), on the eval split.
    Returns the rows, their comparisons (after vs before, evolve vs no_memory) and a note."""
    from evolve.eval import run_arms

    ev, tr = ctx.cfg.stages.eval, ctx.cfg.stages.train
    assert ev is not None
    if tr is None or not tr.trains_policy or tr.policy == ev.policy:
        return {}, [], []
    sa, key = tr.eval, tr.policy
    seeds = sa.seeds or ev.seeds
    max_steps = sa.max_steps or ev.max_steps
    ids = task_ids(ctx.env_spec, ev.split, sa.episodes or ev.episodes)
    base = _base_spec(ctx, tr)
    episodes = ctx.episodes(
        base, split=ev.split, seeds=seeds, max_steps=max_steps, workers=sa.workers or ev.workers
    )
    mem = {"knowledge": knowledge, "train": train}
    before = run_arms(episodes, ctx.memory, sa.arms, ids, **mem, label=lambda arm: f"eval:{key}:{arm}")
    rows = {f"{key}:{a}": ts for a, ts in before.items()}
    ckpt = _eval_checkpoint(ctx, key)
    if ckpt is not None:
        spec = trained_spec(ctx.cfg, key, ckpt)
        after = run_arms(
            episodes,
            ctx.memory,
            sa.arms,
            ids,
            **mem,
            policies={a: spec for a in sa.arms},
            label=lambda arm: f"eval:{ckpt.id}:{arm}",
        )
        rows.update({f"{key}+{ckpt.method}:{a}": ts for a, ts in after.items()})
    n_boot = ev.bootstrap
    comparisons = []
    names = [key, *([f"{key}+{ckpt.method}"] if ckpt is not None else [])]
    if ckpt is not None:
        comparisons += [
            compare(f"{names[1]}:{a}", rows[f"{names[1]}:{a}"], f"{key}:{a}", rows[f"{key}:{a}"], n_boot)
            for a in sa.arms
        ]
    if "evolve" in sa.arms and "no_memory" in sa.arms:
        comparisons += [
            compare(f"{n}:evolve", rows[f"{n}:evolve"], f"{n}:no_memory", rows[f"{n}:no_memory"], n_boot)
            for n in names
        ]
    note = (
        f"Student rows: policies.{key} ({base.get('mode', 'generate')} mode) on {len(ids)} tasks x seeds "
        f"{seeds}, at most {max_steps} steps: '{key}:<arm>' before training"
    )
    if ckpt is not None:
        stale = ", STALE: a trajectory it was trained on has been deleted since" if ckpt.stale else ""
        note += (
            f", '{names[1]}:<arm>' after: checkpoint {ckpt.id} ({ckpt.path}), "
            f"{ckpt.reason or ckpt.status.value}{stale}"
        )
    return rows, comparisons, [note + "."]


def _checkpoint_note(key: str, ckpt: Checkpoint) -> str:
    stale = " It is STALE: a trajectory it was trained on has been deleted since." if ckpt.stale else ""
    return (
        f"Student before training: policies.{key}; after training (the 'trained:' arms): checkpoint "
        f"{ckpt.id} ({ckpt.method}, {ckpt.path}), {ckpt.reason or ckpt.status.value}.{stale}"
    )


STAGE_FNS = {
    "collect": stage_collect,
    "diagnose": stage_diagnose,
    "distill": stage_distill,
    "synth": stage_synth,
    "train": stage_train,
    "eval": stage_eval,
}


def run_job(
    cfg: JobConfig,
    stages: list[str] | None = None,
    run_id: str | None = None,
    fresh: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the job's enabled stages in order, skipping stages this run already finished."""
    console = console or Console()
    enabled = cfg.stages.enabled()
    if stages:
        bad = [s for s in stages if s not in STAGE_FNS]
        if bad:
            raise ConfigError(f"unknown stage(s) {bad}; stages are: {', '.join(STAGE_FNS)}")
        missing = [s for s in stages if s not in enabled]
        if missing:
            raise ConfigError(
                f"stage(s) {missing} are not configured in this job (it has: {', '.join(enabled)})"
            )
        enabled = [s for s in enabled if s in stages]
    run_id = run_id or cfg.name
    run_dir = cfg.run_path
    preflight(cfg, enabled)  # before the first write: a mistake leaves the store as it was
    store = _open_store(cfg)
    result: dict[str, Any] = {"run_id": run_id, "stages": {}}
    current: str | None = None
    try:
        if fresh:
            store.reset_stages(run_id)
        store.upsert_run(run_id, cfg.model_dump(mode="json"), "running", cfg.store.namespace)
        ctx = Ctx(cfg, store, run_id, console)
        done = store.stages(run_id)
        console.rule(f"[bold]evolve run[/] {cfg.name}  (run id {run_id}, store {cfg.store_path})")
        for name in enabled:
            if done.get(name, {}).get("status") == "done" and not (stages and name in stages):
                console.print(f"[dim]{name}: done earlier, skipped[/]")
                result["stages"][name] = done[name]["data"]
                continue
            t0 = time.time()
            console.rule(f"[bold]{name}")
            log.info("stage %s start", name)
            current = name
            _forget_endpoint_failures(ctx)  # a rerun retries the episodes a failing endpoint cost
            store.set_stage(run_id, name, "running")
            data = STAGE_FNS[name](ctx)
            data["seconds"] = round(time.time() - t0, 1)
            failed = _endpoint_failures(ctx)
            if failed:
                store.set_stage(run_id, name, "failed", data)
                current = None
                raise RunFailed(
                    f"stage {name}: {len(failed)} episode(s) ended because the policy's model failed "
                    f"({failed[0]}); fix the endpoint, then rerun the same command (those episodes are retried)"
                )
            store.set_stage(run_id, name, "done", data)
            current = None
            log.info("stage %s done %s", name, data)
            result["stages"][name] = data
            console.print(f"[green]{name} done[/] in {data['seconds']} s: {_short(data)}")
        store.upsert_run(run_id, cfg.model_dump(mode="json"), "done", cfg.store.namespace)
        report = run_dir / "report.md"
        if report.exists():
            result["report"] = str(report)
    except BaseException as e:
        try:
            if current is not None:  # a stage that raised is failed, never left at "running"
                store.set_stage(run_id, current, "failed", {"error": f"{type(e).__name__}: {e}"[:500]})
            store.upsert_run(run_id, cfg.model_dump(mode="json"), "failed", cfg.store.namespace)
        except Exception:  # noqa: BLE001 - the store may be what failed; the first error is the one to see
            log.warning("could not mark run %s failed", run_id, exc_info=True)
        raise
    finally:
        store.close()
    return result


class RunFailed(EvolveError):
    """A stage finished, but some of its work failed for a reason the user must fix (an endpoint)."""


def _endpoint_errors(ctx: Ctx) -> list[Trajectory]:
    return [
        t
        for t in ctx.store.trajectories(ctx.ns, run_id=ctx.run_id, outcome="error")
        if str(t.metadata.get("error", "")).startswith("PolicyError")
    ]


def _endpoint_failures(ctx: Ctx) -> list[str]:
    """The error lines of this run's episodes that ended because the policy's endpoint failed."""
    return [str(t.metadata["error"]).removeprefix("PolicyError: ") for t in _endpoint_errors(ctx)]


def _forget_endpoint_failures(ctx: Ctx) -> None:
    """Delete this run's episodes that a failing endpoint ended, so they are run again."""
    for t in _endpoint_errors(ctx):
        ctx.store.delete_trajectory(t.id, ctx.ns)


def preflight(cfg: JobConfig, stages: Sequence[str]) -> None:
    """Check what can be checked before anything is written: the env and its keyword arguments,
    the tasks of every split a stage uses, local model paths and the embedder spec."""
    env = _check_env(cfg)
    try:
        splits = {
            getattr(cfg.stages, s).split
            for s in ("collect", "eval")
            if s in stages and getattr(cfg.stages, s)
        }
        if "distill" in stages and cfg.stages.distill and cfg.stages.distill.probation.enabled:
            splits.add(cfg.stages.distill.probation.split)
        for split in sorted(splits):
            if not env.tasks(Split(split)):
                raise ConfigError(f"env '{cfg.env.name}' has no tasks in split '{split}'; check env.kwargs")
    finally:
        env.close()
    for key, spec in cfg.policies.items():
        if spec.kind == "hf" and spec.path:
            _check_model_path(f"policies.{key}.path", spec.path)
    tr = cfg.stages.train
    if tr is not None and "train" in stages:
        for where, path in (("stages.train.student", tr.student), ("stages.train.teacher", tr.teacher)):
            if path:
                _check_model_path(where, path)
    emb = cfg.store.embedder
    if emb not in ("", "default", "minilm") and not emb.startswith("hash") and not Path(emb).exists():
        raise ConfigError(
            f"store.embedder '{emb}' is neither default, hash[:dim] nor an existing local model directory"
        )


def _check_env(cfg: JobConfig) -> Any:
    """The job's env, built once; unknown keyword arguments name the accepted ones."""
    import importlib
    import inspect

    from evolve.envs import env_factory

    name, kwargs = cfg.env.name, dict(cfg.env.kwargs)
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"env {name!r} cannot be imported: {e}") from None
    else:
        factory = env_factory(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        bad = [k for k in kwargs if k not in accepted]
        if bad:
            raise ConfigError(
                f"env.kwargs: unknown key(s) {', '.join(map(repr, bad))} for env '{name}'; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
    try:
        return factory(**kwargs)
    except EvolveError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"env.kwargs of env '{name}' rejected: {' '.join(str(e).split())[:200]}") from None


def _check_model_path(where: str, path: str) -> None:
    from evolve.specs import PACKAGE_PREFIX, resolve_package_path

    if path.startswith(PACKAGE_PREFIX):
        try:
            path = resolve_package_path(path)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    p = Path(path)
    if p.suffix == ".gguf" and p.is_file():
        return
    if not (p / "config.json").is_file():
        what = (
            "does not exist"
            if not p.exists()
            else "is not a model directory (no config.json) nor a .gguf file"
        )
        raise ConfigError(f"{where} '{path}' {what}; point it at a saved model")


def adapt_job(
    cfg: JobConfig,
    tasks: int,
    trials: int = 5,
    start: str = "empty",
    run_id: str | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """ADAPT (CLIN's protocol) on the job's eval split: the first ``tasks`` tasks, each over
    ``trials`` trials with the eval policy; before trial k, knowledge is distilled from that task's
    trials 1..k-1 only, on top of nothing (``start="empty"``) or the store's active knowledge
    (``"knowledge"``). Resumable; writes ``<run_dir>/adapt/report.md`` and ``adapt.png``."""
    from evolve.eval import EvalReport, adapt, print_report, write_report

    console = console or Console()
    st = cfg.stages.eval
    if st is None:
        raise ConfigError(
            "evolve eval --adapt needs stages.eval in the job (its policy, split and max_steps)"
        )
    if start not in ("empty", "knowledge"):
        raise ConfigError(f"--adapt-start must be 'empty' or 'knowledge', got {start!r}")
    if tasks < 1:
        raise ConfigError(f"--adapt needs at least one task, got {tasks}")
    run_id = run_id or cfg.name
    preflight(cfg, ["eval"])
    store = _open_store(cfg)
    try:
        ctx = Ctx(cfg, store, run_id, console)
        ids = task_ids(ctx.env_spec, st.split, tasks)
        base = active_knowledge(store, ctx.ns) if start == "knowledge" else []
        episodes = ctx.episodes(
            st.policy, split=st.split, seeds=st.seeds[:1], max_steps=st.max_steps, workers=1
        )
        console.rule(f"[bold]ADAPT[/] {cfg.name}: {len(ids)} tasks x {trials} trials, memory starts {start}")
        points = adapt(
            episodes,
            ctx.memory,
            ids,
            trials=trials,
            seed=st.seeds[0],
            base_knowledge=base,
            label=lambda k: f"adapt:{start}:{k}",
            n_boot=st.bootstrap,
            log=lambda msg: console.print(f"[dim]{msg}[/]"),
        )
        used = 0
        if base:
            trajs = [t for k in range(1, trials + 1) for t in ctx.trajs(arm=f"adapt:{start}:{k}")]
            used = record_usage(store, ctx.memory, trajs, run_id=run_id, label="adapt", namespace=ctx.ns)
        report = EvalReport(
            title=f"evolve ADAPT: {cfg.name}",
            env=cfg.env.name,
            split=st.split,
            policy=f"{st.policy} ({cfg.policies[st.policy].kind})",
            adapt=points,
            adapt_title=f"ADAPT: same task, {trials} trials, memory carried (start: {start})",
            notes=[f"Run id {run_id}; trajectories are in {cfg.store_path} (namespace {ctx.ns})."],
        )
        files = write_report(report, cfg.run_path / "adapt")
        print_report(report, console, detailed=True)
    finally:
        store.close()
    return {"report": str(files["report"]), "adapt": [p.model_dump() for p in points], "usage_written": used}


def _open_store(cfg: JobConfig) -> ExperienceStore:
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    _setup_log(cfg.run_path / "run.log")
    embedder = make_embedder(None if cfg.store.embedder == "default" else cfg.store.embedder)
    return ExperienceStore(cfg.store_path, namespace=cfg.store.namespace, embedder=embedder)


def _short(data: dict[str, Any]) -> str:
    s = ", ".join(f"{k}={v}" for k, v in data.items() if k != "seconds" and not isinstance(v, (dict, list)))
    return s or ", ".join(data)


def _setup_log(path: Path) -> None:
    root = logging.getLogger("evolve")
    if any(
        isinstance(h, logging.FileHandler) and h.baseFilename == str(path.resolve()) for h in root.handlers
    ):
        return
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(h)
    root.setLevel(logging.INFO)


__all__ = ["Ctx", "Outcome", "active_knowledge", "adapt_job", "memory_for", "run_job"]
