"""Export a trained student (a merged HF checkpoint) to GGUF, on top of the GGUF it started from.

Why: so a trained student is served by llama.cpp exactly like its base model
(``bench/local_llm.py serve --gguf``) and played through the ``openai`` policy. Students start from a quantised GGUF (dequantised by
transformers) and LoRA changes only a few matrices, so the export is a *patch* of the base file:

- every metadata key/value of the base is copied, so the architecture, hyper-parameters,
  tokenizer and chat template are the base's (same keys, types and values);
- each base tensor whose checkpoint counterpart still equals the dequantised base tensor (the
  checkpoint was itself dequantised from this file) is byte-copied in its original quantisation;
  only the tensors training changed are written again, in ``changed_type`` (f16 | q8_0 | f32;
  1-D norms and biases always f32). The file stays ~the base's size and untouched weights lose
  nothing to a second quantisation.

Layouts: transformers' GGUF loader un-permutes ``attn_q``/``attn_k`` of llama-arch files
(``LlamaTensorProcessor._reverse_permute_weights``: llama.cpp stores rotary pairs interleaved), so
those two are permuted back here before comparing or writing; qwen2 has no such step. Only the
architectures whose loader transform is mirrored here (llama, which SmolLM2 uses, and qwen2)
are accepted; others are refused rather than silently mis-laid out.

Equality is checked against the base rounded to the checkpoint's dtype and to bf16/f16 too: a
student trained in bf16 holds ``bf16(base)`` for every untouched weight, which still means "the
base's tensor" and should be byte-copied, not re-encoded.

Measured (2 CPU cores shared with other jobs, so wall times are upper bounds):

- OPSD-trained Qwen2.5-Coder-0.5B (LoRA on q/k/v/o, 6 steps; float32 merged checkpoint, 2.5 GB)
  on its Q4_K_M base (491.4 MB): 96 tensors rewritten (q/k/v/o of 24 layers, largest change
  3.9e-4), 195 byte-copied. f16: 548.7 MB (1.12x), 33-74 s; q8_0: 507.4 MB (1.03x), 33 s.
  Next-token logits on a 54-token chat prompt, llama.cpp (1 thread) vs transformers on the
  merged checkpoint: f16 export corr 0.99982, KL(hf||gguf) 0.00078, same top-5; the base GGUF
  KL 0.00233. q8_0 export KL 0.00128: its rounding (~max|block|/254) is as large as this
  LoRA's changes, so f16 is the default. llama.cpp tokenises the chat prompt exactly as HF.
- SmolLM2-135M Q4_1 (98.4 MB) with a rank-4 LoRA merged into 6 q/v matrices (the test):
  100.2 MB, ~9 s; llama.cpp on the export vs transformers: corr 0.9989, same top-1; the base
  GGUF: corr 0.856, another top-1.

About half an export is gguf-py parsing the base's vocabulary and dequantising it in numpy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from evolve.errors import EvolveError

ChangedType = Literal["f16", "q8_0", "f32"]

# GGUF architecture -> HF model_types it comes from, for the architectures whose transformers
# loader transform this module mirrors (llama: q/k permutation; qwen2: none).
_SUPPORTED: dict[str, tuple[str, ...]] = {"llama": ("llama", "mistral"), "qwen2": ("qwen2",)}
# GGUF tensors with no HF parameter by design (computed at load time in transformers).
_GGUF_ONLY = {"rope_freqs.weight"}


class GGUFExportError(EvolveError):
    """The checkpoint cannot be written on top of this base GGUF (wrong base, missing tensor, bad path)."""


@dataclass
class ExportReport:
    """What :func:`export_gguf` wrote: which tensors came from the base and which from training."""

    out_path: str
    changed_type: str
    copied: list[str] = field(default_factory=list)
    """Base tensors byte-copied unchanged (still in the base's quantisation)."""
    rewritten: dict[str, float] = field(default_factory=dict)
    """Tensors training changed -> the largest |checkpoint - dequantised base| in it."""
    base_bytes: int = 0
    out_bytes: int = 0
    seconds: float = 0.0


def export_gguf(
    checkpoint_dir: str | Path,
    base_gguf: str | Path,
    out_path: str | Path,
    *,
    changed_type: ChangedType = "f16",
    atol: float = 1e-6,
) -> ExportReport:
    """Write ``out_path``: ``base_gguf`` with the tensors that differ in ``checkpoint_dir`` replaced.

    ``checkpoint_dir`` is a merged HF checkpoint (``config.json`` and ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``), e.g. ``TrainResult.merged_dir``; ``base_gguf`` the
    GGUF its base model was loaded from (a path or ``pkg:<module>/<file>``). A tensor counts as
    unchanged when every element is within ``atol`` of the dequantised base (rounded to the
    checkpoint's dtype, or to bf16/f16). The file is written beside ``out_path`` and renamed into
    place at the end, so a failed export never leaves half a model. Raises
    :class:`GGUFExportError` (one line) on a base/checkpoint mismatch or a bad path.
    """
    import gguf
    import torch

    t0 = time.perf_counter()
    if changed_type not in ("f16", "q8_0", "f32"):
        raise GGUFExportError(f"changed_type {changed_type!r} is not one of f16, q8_0, f32")
    base = _resolve_base(base_gguf)
    out = Path(out_path).expanduser()
    if out.exists() and os.path.samefile(out, base):
        raise GGUFExportError(
            f"out path {str(out)!r} is the base GGUF itself; write the export to a new path"
        )
    if out.is_dir():
        raise GGUFExportError(f"out path {str(out)!r} is a directory; give a .gguf file path")
    try:
        reader = gguf.GGUFReader(str(base))
    except (ValueError, OSError) as e:
        raise GGUFExportError(
            f"could not read base GGUF {str(base)!r}: {' '.join(str(e).split())[:160]}"
        ) from None

    arch = _field(reader, "general.architecture")
    if arch not in _SUPPORTED:
        raise GGUFExportError(
            f"base GGUF architecture {arch!r} is not supported by the exporter (supported: {', '.join(_SUPPORTED)})"
        )
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    n_layers = int(_field(reader, f"{arch}.block_count"))

    with _open_checkpoint(Path(checkpoint_dir).expanduser()) as ckpt:
        _check_config(ckpt.config, reader, arch, n_head, n_kv, n_layers, base)
        plan = _plan(ckpt, reader, arch, n_layers, base)

        report = ExportReport(out_path=str(out), changed_type=changed_type, base_bytes=base.stat().st_size)
        rewrite: dict[str, tuple[str, bool, Any]] = {}  # gguf name -> (hf name, permute, GGML type)
        for t in reader.tensors:
            hf = plan[t.name]
            if hf is None:
                report.copied.append(t.name)
                continue
            permute = arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name)
            value = _to_gguf_layout(ckpt.get(hf), t.name, permute, n_head, n_kv)
            # A plain view of the memmap: gguf slices it per row group, and memmap slices cost a
            # Python-level __array_finalize__ each (a third of the dequantisation time).
            deq = gguf.dequantize(np.asarray(t.data), t.tensor_type)
            ref = torch.from_numpy(deq if deq.flags.writeable else deq.copy())
            if _same(value, ref, atol):
                report.copied.append(t.name)
            else:
                report.rewritten[t.name] = float((value.float() - ref).abs().max())
                rewrite[t.name] = (hf, permute, _encoded_type(value, changed_type))

        part = out.with_name(out.name + ".part")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write(reader, arch, part, rewrite, ckpt, n_head, n_kv)
            os.replace(part, out)
        finally:
            part.unlink(missing_ok=True)
    report.out_bytes = out.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report


# --- the checkpoint -----------------------------------------------------------------------------


class _Checkpoint:
    """Tensors of a safetensors checkpoint by name, read one at a time (a 0.5B float32 checkpoint
    is 2.5 GB; only one tensor and its dequantised base are in memory at once)."""

    def __init__(self, config: dict[str, Any], handles: dict[str, Any]) -> None:
        self.config = config
        self._handles = handles  # tensor name -> open safe_open handle

    @property
    def names(self) -> list[str]:
        return list(self._handles)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[name].get_slice(name).get_shape())

    def get(self, name: str) -> Any:
        return self._handles[name].get_tensor(name)


@contextmanager
def _open_checkpoint(d: Path) -> Iterator[_Checkpoint]:
    from safetensors import safe_open

    if not (d / "config.json").is_file():
        raise GGUFExportError(
            f"checkpoint {str(d)!r} has no config.json; point it at a merged HF checkpoint dir"
        )
    config = json.loads((d / "config.json").read_text())
    index = d / "model.safetensors.index.json"
    if index.is_file():
        where = {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (d / "model.safetensors").is_file():
        where = None
    else:
        raise GGUFExportError(
            f"checkpoint {str(d)!r} has no model.safetensors (nor an index); an adapter-only dir? "
            "export the merged dir"
        )
    with ExitStack() as stack:
        opened: dict[Path, Any] = {}

        def handle(p: Path) -> Any:
            if p not in opened:
                if not p.is_file():
                    raise GGUFExportError(f"checkpoint shard {str(p)!r} named by the index does not exist")
                opened[p] = stack.enter_context(safe_open(str(p), framework="pt"))
            return opened[p]

        if where is None:
            h = handle(d / "model.safetensors")
            handles = dict.fromkeys(h.keys(), h)  # a safe_open handle is not iterable
        else:
            handles = {k: handle(p) for k, p in where.items()}
        yield _Checkpoint(config, handles)


def _check_config(
    config: dict[str, Any], reader: Any, arch: str, n_head: int, n_kv: int, n_layers: int, base: Path
) -> None:
    """Refuse a checkpoint of another model than the base before any tensor is read."""
    model_type = config.get("model_type")
    if model_type not in _SUPPORTED[arch]:
        raise GGUFExportError(
            f"checkpoint is a {model_type!r} model but base {base.name!r} is {arch!r}; "
            "pass the GGUF the student was trained from"
        )
    expect = {
        "num_hidden_layers": n_layers,
        "hidden_size": _field(reader, f"{arch}.embedding_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
    }
    for key, want in expect.items():
        have = config.get(key, config.get("num_attention_heads") if key == "num_key_value_heads" else None)
        if have is not None and int(have) != int(want):
            raise GGUFExportError(
                f"checkpoint {key}={have} but base {base.name!r} has {want}; pass the GGUF the student was trained from"
            )


def _plan(ckpt: _Checkpoint, reader: Any, arch: str, n_layers: int, base: Path) -> dict[str, str | None]:
    """Base tensor name -> checkpoint tensor name (None: a GGUF-only tensor, always copied).

    Checks names and shapes from the safetensors headers only, so every refusal comes before the
    minutes of dequantising a large base.
    """
    import gguf

    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)
    to_hf: dict[str, str] = {}
    unplaced: list[str] = []
    for hf in ckpt.names:
        g = name_map.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            unplaced.append(hf)
        else:
            to_hf[g] = hf
    base_names = {t.name for t in reader.tensors}
    embed = to_hf.get("token_embd.weight")
    if embed is not None:
        rows = ckpt.shape(embed)[0]
        base_rows = next(_np_shape(t) for t in reader.tensors if t.name == "token_embd.weight")[0]
        if rows != base_rows:
            raise GGUFExportError(
                f"vocab mismatch: checkpoint has {rows} token embeddings, base {base.name!r} has {base_rows}"
            )
    if "output.weight" not in base_names and "output.weight" in to_hf:
        # The base ties the output head to the token embedding; so must the checkpoint.
        lm_head = to_hf.pop("output.weight")
        if embed is None or not bool((ckpt.get(lm_head) == ckpt.get(embed)).all()):
            raise GGUFExportError(
                f"checkpoint has its own {lm_head} but base {base.name!r} ties the output head to the "
                "token embedding; a GGUF of this base cannot hold it"
            )
    plan: dict[str, str | None] = {}
    for t in reader.tensors:
        hf = to_hf.pop(t.name, None)
        if (
            hf is None
            and t.name == "output.weight"
            and embed is not None
            and ckpt.config.get("tie_word_embeddings")
        ):
            hf = embed  # the checkpoint ties, the base has a separate head: write the embedding there
        if hf is None:
            if t.name in _GGUF_ONLY:
                plan[t.name] = None
                continue
            raise GGUFExportError(
                f"checkpoint has no tensor for the base's {t.name!r}; is it a complete merged checkpoint?"
            )
        if ckpt.shape(hf) != _np_shape(t):
            raise GGUFExportError(
                f"shape mismatch: checkpoint {hf} is {list(ckpt.shape(hf))}, base {t.name} is {list(_np_shape(t))}"
            )
        plan[t.name] = hf
    extra = unplaced + sorted(to_hf.values())
    if extra:
        raise GGUFExportError(
            f"checkpoint tensor {extra[0]!r} (and {len(extra) - 1} more) has no place in the base GGUF; "
            "an unmerged LoRA adapter? export the merged dir"
        )
    return plan


# --- tensors -------------------------------------------------------------------------------------


def _np_shape(t: Any) -> tuple[int, ...]:
    """A GGUF tensor's logical shape in numpy/torch order (GGUF lists dimensions fastest first)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def _permute(w: Any, n_head: int) -> Any:
    """HF -> llama.cpp q/k layout: the inverse of transformers' ``_reverse_permute_weights``
    (llama.cpp ``convert_hf_to_gguf.LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_gguf_layout(value: Any, name: str, permute: bool, n_head: int, n_kv: int) -> Any:
    if not permute:
        return value
    return _permute(value, n_head if ".attn_q." in name else n_kv)


def _same(value: Any, ref: Any, atol: float) -> bool:
    """Whether the checkpoint tensor is the base's: equal to it in float32, or to it rounded to the
    checkpoint's dtype, bf16 or f16 (what a student trained in half precision holds)."""
    import torch

    v = value.float()
    for dt in dict.fromkeys((value.dtype, torch.float32, torch.bfloat16, torch.float16)):
        r = ref if dt == torch.float32 else ref.to(dt).float()
        if torch.equal(v, r) or float((v - r).abs().max()) <= atol:  # equal: the common case, cheap
            return True
    return False


def _encoded_type(value: Any, changed_type: str) -> Any:
    """The GGML type a rewritten tensor is written in: 1-D ones (norms, biases) f32, as llama.cpp
    expects; f16 falls back to f32 where a value would overflow it; q8_0 needs rows of 32."""
    import gguf

    q = gguf.GGMLQuantizationType
    if value.ndim == 1 or changed_type == "f32":
        return q.F32
    if changed_type == "q8_0":
        return q.Q8_0 if value.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0] == 0 else q.F16
    return q.F16 if float(value.float().abs().max()) <= float(np.finfo(np.float16).max) else q.F32


def _encode(value: Any, qtype: Any) -> np.ndarray:
    import gguf

    a = value.float().numpy()
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quantize(a, qtype)
    return np.ascontiguousarray(a, dtype=np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32)


def _write(
    reader: Any,
    arch: str,
    path: Path,
    rewrite: dict[str, tuple[str, bool, Any]],
    ckpt: _Checkpoint,
    n_head: int,
    n_kv: int,
) -> None:
    """Write the file: the base's metadata, then its tensors in order, rewritten ones re-encoded.

    The header needs every tensor's size first; rewritten ones are sized from their shape and type
    and encoded only when written, so at most one of them is in memory (a full fine-tune would
    otherwise hold the whole model).
    """
    import gguf

    writer = gguf.GGUFWriter(str(path), arch, endianess=reader.endianess)
    try:
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself / virtual header fields of the reader
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            if sub == gguf.GGUFValueType.ARRAY:
                raise GGUFExportError(
                    f"base metadata {f.name!r} is a nested array, which the exporter cannot copy"
                )
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        if gguf.Keys.General.ALIGNMENT in reader.fields:
            writer.data_alignment = int(reader.fields[gguf.Keys.General.ALIGNMENT].contents())

        for t in reader.tensors:
            if t.name in rewrite:
                qtype = rewrite[t.name][2]
                # Sized as bytes (uint8): the writer turns a byte shape back into the logical one.
                byte_shape = gguf.quant_shape_to_byte_shape(_np_shape(t), qtype)
                nbytes = int(np.prod(byte_shape))
                writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
            else:
                writer.add_tensor_info(
                    t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type
                )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            if t.name in rewrite:
                hf, permute, qtype = rewrite[t.name]
                data = _encode(_to_gguf_layout(ckpt.get(hf), t.name, permute, n_head, n_kv), qtype)
            else:
                data = t.data
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    finally:
        writer.close()


# --- small helpers -------------------------------------------------------------------------------


def _resolve_base(base_gguf: str | Path) -> Path:
    from evolve.specs import PACKAGE_PREFIX, resolve_package_path

    s = str(base_gguf)
    if s.startswith(PACKAGE_PREFIX):
        try:
            s = resolve_package_path(s)
        except ValueError as e:
            raise GGUFExportError(str(e)) from None
    p = Path(s).expanduser()
    if not p.is_file():
        raise GGUFExportError(
            f"base GGUF {str(p)!r} does not exist; pass the GGUF the student was trained from"
        )
    return p


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise GGUFExportError(f"base GGUF has no {key!r} metadata; is it a model GGUF?")
        return default
    return f.contents()
