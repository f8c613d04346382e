"""On-policy distillation in real TextWorld games with tiny from-config models: rollouts, OPD (local and
API teachers), OPSD, Skill-SD, pi-Distill, teacher-turn mixing, the depth curriculum, the teacher cache
and the refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from evolve.agents.recorder import Recorder
from evolve.agents.rollout import next_gold, rollout
from evolve.envs import build_env
from evolve.llm import hf
from evolve.llm.prompts import PromptOptions, add_privileged, build_messages
from evolve.schema import Skill, Split
from evolve.specs import EnvSpec
from evolve.stores import ExperienceStore
from evolve.train.onpolicy import depth_at, gold_context, kl_to_teacher, train_on_policy
from evolve.train.teachers import APITeacher, LocalTeacher, TeacherError, answer_ids
from evolve.train.trainer import TrainConfig, TrainError, train
from tests.tiny_models import build_tiny_causal_lm
from tests.vllm_peer import VLLMPeer

JSON = PromptOptions(action_format="json")


@pytest.fixture(scope="module")
def tw(tmp_path_factory: pytest.TempPathFactory) -> EnvSpec:
    cache = tmp_path_factory.mktemp("tw-games")
    return EnvSpec(name="textworld", kwargs={"n_train": 3, "n_dev": 2, "n_test": 0, "cache_dir": str(cache)})


def _scaled(path: Path, factor: float) -> Path:
    """Embeddings scaled so logits have a useful range (a few steps can move them)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(factor)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scaled(build_tiny_causal_lm(tmp_path_factory.mktemp("student"), seed=0), 10)


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose answers depend on its context: attention weights scaled x8 (at init a
    2-layer 32-wide model all but ignores everything but the last tokens: its answer distributions
    with and without a privileged block differ by a KL of 2e-6; scaled, by 0.04)."""
    from transformers import AutoModelForCausalLM

    path = _scaled(build_tiny_causal_lm(tmp_path_factory.mktemp("reader"), seed=0), 10)
    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
                proj.weight.mul_(8)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _scaled(build_tiny_causal_lm(tmp_path_factory.mktemp("teacher"), seed=1), 10)


def cfg(student: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "student": str(student),
        "output_dir": str(out),
        "lora": {"r": 8, "alpha": 16},
        "lr": 1e-2,
        "schedule": "constant",
        "max_grad_norm": None,
        "save_merged": False,
        "max_length": 4096,
        "on_policy": {"envs": 2, "max_turns": 2, "max_new_tokens": 12, "temperature": 1.0},
    }
    op = base["on_policy"] | kw.pop("on_policy", {})
    return TrainConfig.model_validate(base | kw | {"on_policy": op})


def store_at(tmp_path: Path) -> ExperienceStore:
    return ExperienceStore(tmp_path / "store.duckdb", namespace="op", embedder="hash")


def held_out(tw: EnvSpec, model: Any, tok: Any, n_turns: int = 3) -> tuple[list, list]:
    """States along the oracle's path in the dev games, and the student's greedy answers there."""
    env = build_env(tw)
    prompts = []
    try:
        for task in env.tasks(Split.dev):
            obs, history = env.reset(task), []
            for _ in range(n_turns):
                prompts.append(build_messages(task.goal, obs, history, None, JSON))
                gold = next_gold(env)
                if gold is None:
                    break
                obs = env.step(gold)
                history = []  # one-state prompts: what matters is the state, not the history
                if obs.done:
                    break
    finally:
        env.close()
    gens = hf.generate(model, tok, prompts, max_new_tokens=12)
    return prompts, [g.token_ids for g in gens]


# --------------------------------------------------------------------------- rollouts


def test_rollout_steps_envs_in_lockstep_and_records_them(
    tw: EnvSpec, student_dir: Path, tmp_path: Path
) -> None:
    model, tok = hf.load_causal_lm(student_dir, device="cpu")
    envs = [build_env(tw) for _ in range(2)]
    tasks = envs[0].tasks(Split.train)[:2]
    with store_at(tmp_path) as store:
        rec = Recorder(store, namespace="op", run_id="r1")
        rolls = rollout(model, tok, envs, tasks, rec, max_turns=3, temperature=1.0, seed=3, gold=True)
        trajs = store.trajectories("op", run_id="r1")
    for e in envs:
        e.close()
    assert len(rolls) == 2 and len(trajs) == 2
    assert {t.arm for t in trajs} == {"onpolicy"}
    by_id = {t.id: t for t in trajs}
    for r in rolls:
        assert 1 <= len(r.turns) <= 3
        assert len(by_id[r.trajectory_id].steps) == len(r.turns)
        for turn in r.turns:
            # the prompt is the one layout, rendered by the chat template; the answer its sampled tokens
            assert turn.prompt_ids == hf.chat_prompt_ids(tok, turn.messages)
            assert turn.token_ids and len(turn.logprobs) == len(turn.token_ids)
            assert turn.gold  # TextWorld tells the next winning command
            # the student's log-probs at sampling time are the model's own (teacher forcing agrees)
            again = hf.score(model, tok, [turn.prompt_ids], [turn.token_ids])[0]
            assert max(abs(a - b) for a, b in zip(again, turn.logprobs, strict=True)) < 1e-3
    # same seed, same rollouts (generation is seeded per step)
    envs = [build_env(tw) for _ in range(2)]
    with store_at(tmp_path / "b") as store:
        again = rollout(model, tok, envs, tasks, Recorder(store, "op"), max_turns=3, temperature=1.0, seed=3)
    for e in envs:
        e.close()
    assert [[t.token_ids for t in r.turns] for r in again] == [[t.token_ids for t in r.turns] for r in rolls]


def test_depth_curriculum_grows_the_horizon(student_dir: Path, tmp_path: Path) -> None:
    c = cfg(
        student_dir, tmp_path, method="opd", on_policy={"max_turns": 10, "depth_start": 2, "depth_ramp": 0.5}
    )
    assert [depth_at(c, s, 10) for s in (0, 1, 3, 5, 9)] == [2, 3, 6, 10, 10]
    assert depth_at(cfg(student_dir, tmp_path, method="opd"), 0, 10) == 2  # no curriculum: max_turns


# --------------------------------------------------------------------------- OPD, local teacher


def test_opd_lowers_the_kl_to_the_teacher_on_held_out_states(
    tw: EnvSpec, student_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    student, tok = hf.load_causal_lm(student_dir, device="cpu")
    teacher = LocalTeacher.load(str(teacher_dir), tok)
    prompts, completions = held_out(tw, student, tok)
    before = kl_to_teacher(student, teacher, tok, prompts, completions)
    c = cfg(
        student_dir,
        tmp_path / "opd",
        method="opd",
        teacher=str(teacher_dir),
        max_steps=6,
        lora=None,
        lr=3e-3,
        save_merged=True,
    )
    with store_at(tmp_path) as store:
        result = train_on_policy(c, tw, store, run_id="opd", progress=False)
        assert len(store.trajectories("op", run_id="opd")) == 12  # 6 steps x 2 envs, recorded
    assert result.loss == "reverse_kl" and result.steps == 6 and len(result.on_policy_stats) == 6
    assert all(s["trained_turns"] > 0 and s["teacher_s"] >= 0 for s in result.on_policy_stats)
    trained, _ = hf.load_causal_lm(result.merged_dir, device="cpu")
    after = kl_to_teacher(trained, teacher, tok, prompts, completions)
    assert after < 0.7 * before, (before, after)


def test_a_teacher_with_another_vocabulary_is_refused(tw: EnvSpec, student_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = build_tiny_causal_lm(tmp_path / "other")
    t = AutoTokenizer.from_pretrained(str(other))
    t.add_tokens(["<extra-token>"])
    t.save_pretrained(str(other))
    m = AutoModelForCausalLM.from_pretrained(str(other))
    m.resize_token_embeddings(len(t))
    m.save_pretrained(str(other))
    with store_at(tmp_path) as store, pytest.raises(TrainError, match="different vocabulary") as e:
        train_on_policy(
            cfg(student_dir, tmp_path / "o", method="opd", teacher=str(other)), tw, store, progress=False
        )
    assert "\n" not in str(e.value)


def test_offline_train_refuses_on_policy_methods(student_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="rollouts in an env"):
        train(cfg(student_dir, tmp_path, method="opsd"), [])


# --------------------------------------------------------------------------- self-distillation


def oracle_states(tw: EnvSpec, split: Split, n_turns: int = 3) -> tuple[list, list]:
    """Student-view and privileged-view prompts at states along the oracle's path in ``split``."""
    env = build_env(tw)
    plain, privileged = [], []
    try:
        for task in env.tasks(split):
            obs = env.reset(task)
            for _ in range(n_turns):
                gold = next_gold(env)
                if gold is None:
                    break
                msgs = build_messages(task.goal, obs, [], None, JSON)
                plain.append(msgs)
                privileged.append(add_privileged(msgs, gold_context(env, task, obs, [])))
                obs = env.step(gold)
                if obs.done:
                    break
    finally:
        env.close()
    return plain, privileged


def test_opsd_moves_the_plain_view_towards_the_privileged_view(
    tw: EnvSpec, reader_dir: Path, tmp_path: Path
) -> None:
    """OPSD's objective: without the privileged block, the student comes to answer as its privileged
    view (at the start of training) does, measured on the oracle path's states of the training games
    (the student's own rollouts visit other states; on unseen games a 2-layer model moves less:
    0.043 -> 0.039). (That this raises gold actions needs a
    model that reads its context; a from-config tiny model does not, so that is measured with
    Qwen2.5-Coder-0.5B in bench/distill.py.)"""
    model, tok = hf.load_causal_lm(reader_dir, device="cpu")
    plain, privileged = oracle_states(tw, Split.train)
    completions = [g.token_ids for g in hf.generate(model, tok, plain, max_new_tokens=12)]
    pi_prompts = [hf.chat_prompt_ids(tok, m) for m in privileged]
    initial = LocalTeacher(model, tok)  # the privileged view, weights as training starts
    before = kl_to_teacher(model, initial, tok, plain, completions, teacher_prompts=pi_prompts)
    assert before > 1e-3  # the premise: the privileged block changes the answer distribution
    c = cfg(reader_dir, tmp_path / "opsd", method="opsd", max_steps=8, save_merged=True)
    with store_at(tmp_path) as store:
        result = train_on_policy(c, tw, store, progress=False)
    assert result.teacher == "self:initial" and result.loss == "reverse_kl"
    assert all(s["trained_turns"] > 0 for s in result.on_policy_stats)
    trained, _ = hf.load_causal_lm(result.merged_dir, device="cpu")
    after = kl_to_teacher(trained, initial, tok, plain, completions, teacher_prompts=pi_prompts)
    assert after < 0.7 * before, (before, after)


def test_skill_sd_shows_the_stores_skills_to_the_teacher(
    tw: EnvSpec, student_dir: Path, tmp_path: Path
) -> None:
    from evolve.skills.memory import EvolveMemory
    from evolve.train.onpolicy import _MemoryContexts

    env = build_env(tw)
    task = env.tasks(Split.train)[0]
    obs = env.reset(task)
    gold = next_gold(env)
    assert gold
    skill = Skill(namespace="op", env="textworld", name="first step", steps=[gold], status="active")
    factory = EvolveMemory.factory([skill], namespace="op")
    text = _MemoryContexts(factory)(env, task, obs, [])
    env.close()
    assert f"Steps: {gold}" in text  # the retrieved skill is the privileged block
    c = cfg(student_dir, tmp_path / "ssd", method="skill_sd", max_steps=2)
    with store_at(tmp_path) as store:
        result = train_on_policy(c, tw, store, knowledge_hooks=factory, progress=False)
        with pytest.raises(TrainError, match="skill_sd.*skills"):
            train_on_policy(c, tw, store, progress=False)
    assert result.steps == 2 and all(x > 0 for x in result.losses)  # the context changes the teacher


def test_pi_distill_trains_the_privileged_view_jointly(
    tw: EnvSpec, student_dir: Path, tmp_path: Path
) -> None:
    c = cfg(student_dir, tmp_path / "pi", method="pi_distill", max_steps=2, on_policy={"pi_weight": 0.5})
    with store_at(tmp_path) as store:
        result = train_on_policy(c, tw, store, progress=False)
    assert all(s["aux_loss"] is not None and s["aux_loss"] > 0 for s in result.on_policy_stats)


def test_teacher_turn_mixing_writes_turns_with_the_teacher(
    tw: EnvSpec, student_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    c = cfg(
        student_dir,
        tmp_path / "mix",
        method="opd",
        teacher=str(teacher_dir),
        max_steps=1,
        on_policy={"mix": 1.0},
    )
    with store_at(tmp_path) as store:
        result = train_on_policy(c, tw, store, progress=False)
    s = result.on_policy_stats[0]
    assert s["teacher_turns"] == s["turns"] > 0 and s["generated_tokens"] == 0


# --------------------------------------------------------------------------- API teacher (vLLM protocol)


@pytest.fixture
def peer(teacher_dir: Path):
    model, tok = hf.load_causal_lm(teacher_dir, device="cpu")
    servers: list[VLLMPeer] = []

    def start(**kw: Any) -> VLLMPeer:
        servers.append(VLLMPeer(model, tok, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_api_teacher_top_k_matches_the_model_and_is_cached(
    peer: Any, teacher_dir: Path, tmp_path: Path
) -> None:
    server = peer()
    model, tok = hf.load_causal_lm(teacher_dir, device="cpu")
    prompt = hf.chat_prompt_ids(tok, [{"role": "user", "content": "open the fridge"}])
    completion = answer_ids(
        tok, [{"role": "user", "content": "open the fridge"}], '{"command": "open fridge"}'
    )
    with store_at(tmp_path) as store:
        t = APITeacher("tiny", base_url=server.url, tokenizer=tok, top_k=5, store=store)
        t.self_test()
        first = t.score([prompt], [completion])[0]
        full = hf.score(model, tok, [prompt], [completion])[0]
        assert first.topk_ids.shape == (len(completion), 5)
        # the top-1 log-prob is the model's max; the student's own token's log-prob is there when in top k
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        best = torch.log_softmax(logits.float(), -1).max(-1).values
        assert torch.allclose(first.topk_logprobs[:, 0], best, atol=1e-4)
        assert max(full) <= float(best.max()) + 1e-4
        calls = server.scoring_calls()
        second = t.score([prompt], [completion])[0]  # a second epoch: from the store, no request
        assert server.scoring_calls() == calls and t.cache_hits == 1
        assert torch.allclose(second.topk_logprobs, first.topk_logprobs, atol=1e-2)  # float16 in the store


def test_api_teacher_refuses_servers_it_cannot_trust(peer: Any, teacher_dir: Path) -> None:
    _, tok = hf.load_causal_lm(teacher_dir, device="cpu")
    for server, words in ((peer(prompt_logprobs=False), "sampled"), (peer(noise=0.5), "different log-probs")):
        with pytest.raises(TeacherError, match=words) as e:
            APITeacher("tiny", base_url=server.url, tokenizer=tok, top_k=5).self_test()
        assert "\n" not in str(e.value)


def test_opd_from_an_api_teacher_hits_its_cache_on_the_second_epoch(
    peer: Any, tw: EnvSpec, student_dir: Path, tmp_path: Path
) -> None:
    server = peer()
    c = cfg(
        student_dir, tmp_path / "api", method="opd", max_steps=2, lr=1e-9,
        on_policy={"teacher_url": server.url, "teacher_model": "tiny", "top_k": 8, "temperature": 0.0, "envs": 3},
    )  # fmt: skip
    # 3 train games, 3 envs: step 2 replays step 1's games greedily with unchanged weights
    with store_at(tmp_path) as store:
        calls: list[int] = []
        result = train_on_policy(
            c, tw, store, progress=False, on_step=lambda s, _loss: calls.append(server.scoring_calls())
        )
    assert result.loss == "topk_forward_kl" and result.teacher.startswith("api:tiny@")
    assert calls[0] > 0 and calls[1] == calls[0]  # the second epoch cost no teacher call


def test_sampled_teacher_trains_on_teacher_written_turns(
    peer: Any, tw: EnvSpec, student_dir: Path, tmp_path: Path
) -> None:
    server = peer(prompt_logprobs=False)
    c = cfg(
        student_dir, tmp_path / "sampled", method="opd", max_steps=1,
        on_policy={"teacher_url": server.url, "teacher_model": "tiny", "teacher_mode": "sampled", "mix": 1.0},
    )  # fmt: skip
    with store_at(tmp_path) as store:
        result = train_on_policy(c, tw, store, progress=False)
    s = result.on_policy_stats[0]
    assert result.loss == "ce" and s["trained_turns"] == s["teacher_turns"] > 0
    assert any(r["path"].endswith("chat/completions") for r in server.requests)


# --------------------------------------------------------------------------- in a job


def test_evolve_run_trains_on_policy_as_the_train_stage(tmp_path: Path, student_dir: Path) -> None:
    from evolve.config import parse_job
    from evolve.pipeline import run_job
    from tests.test_train_pipeline import _train_job

    job = _train_job(tmp_path, student_dir, method="pi_distill", max_steps=2, lora={"r": 4},
                     on_policy={"envs": 2, "max_turns": 2, "max_new_tokens": 8})  # fmt: skip
    job["stages"]["train"]["probation"] = {"split": "train", "max_steps": 2}
    del job["stages"]["synth"], job["stages"]["eval"]
    cfg = parse_job(job)
    result = run_job(cfg)
    tr = result["stages"]["train"]
    with ExperienceStore(cfg.store_path, namespace="tt", read_only=True) as st:
        (ckpt,) = st.checkpoints(run_id="tt")
        rollouts = st.trajectories(arm="onpolicy")
    assert tr["checkpoint"] == ckpt.id and ckpt.method == "pi_distill" and ckpt.loss == "reverse_kl"
    assert len(rollouts) == 4 and sorted(ckpt.trajectory_ids) == sorted(t.id for t in rollouts)
    assert ckpt.metrics["train"]["steps"] == 2 and Path(ckpt.path, "config.json").is_file()
