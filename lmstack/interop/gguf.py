"""GGUF files (llama.cpp's format) in and out for the llama-style decoder.

Reading: :func:`gguf_model_section` turns a file's metadata into ``config.model`` keys,
:func:`load_gguf_params` fills a sharded parameter tree from its tensors (dequantized to
float32 one tensor at a time), and :func:`gguf_tokenizer_parts` / :func:`build_gguf_tokenizer`
rebuild its byte-level BPE tokenizer. Writing: :func:`export_gguf` streams a
llama-architecture file that llama.cpp loads. Tensor names and metadata keys are
llama.cpp's (``gguf-py/gguf/constants.py``); q/k rows are stored in llama.cpp's order
(:mod:`lmstack.interop.qk`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np
from flax import nnx

from lmstack.config import ConfigError
from lmstack.data.sources import DataError
from lmstack.interop import qk

Q = gguf.GGMLQuantizationType
DEQUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
# export qtype -> (type of 2-D tensors, general.file_type)
EXPORT_QTYPES = {
    "F32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
ARCHITECTURES = ("llama",)
PRE_TOKENIZERS = ("gpt2", "smollm")


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter of ours and its GGUF tensor.

    ``gguf`` holds ``{i}`` for parameters stacked over layers (``blocks``). Our layout is
    ``in_dims + out_dims`` with ``n_in`` input dims (GGUF stores ``(out, in)`` flattened,
    like HF ``nn.Linear``); ``n_in=None`` means the same layout. ``permuted``: q/k rows in
    llama.cpp's order, with as many heads as the first output dim.
    """

    ours: tuple[str, ...]
    gguf: str
    n_in: int | None
    permuted: bool = False

    def gguf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Row-major (numpy) shape of the GGUF tensor for our per-layer ``shape``."""
        if self.n_in is None:
            return shape
        outs = math.prod(shape[self.n_in:])
        return (outs,) if self.n_in == 0 else (outs, math.prod(shape[: self.n_in]))

    def from_gguf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.permuted:
            w = qk.unpermute(w, shape[self.n_in])
        if self.n_in:
            w = w.T
        return w.reshape(shape)

    def to_gguf(self, x: np.ndarray) -> np.ndarray:
        shape = self.gguf_shape(x.shape)
        w = x.reshape(shape[::-1]).T if self.n_in else x.reshape(shape)
        if self.permuted:
            w = qk.permute(w, x.shape[self.n_in])
        return np.ascontiguousarray(w)


# llama.cpp LLM_ARCH_LLAMA tensors <-> lmstack Decoder(style="llama") parameters.
LLAMA_TENSORS = (
    TensorMap(("embed",), "token_embd.weight", None),
    TensorMap(("blocks", "attn_norm", "scale"), "blk.{i}.attn_norm.weight", None),
    TensorMap(("blocks", "attn", "q", "weight"), "blk.{i}.attn_q.weight", 1, permuted=True),
    TensorMap(("blocks", "attn", "k", "weight"), "blk.{i}.attn_k.weight", 1, permuted=True),
    TensorMap(("blocks", "attn", "v", "weight"), "blk.{i}.attn_v.weight", 1),
    TensorMap(("blocks", "attn", "o", "weight"), "blk.{i}.attn_output.weight", 2),
    TensorMap(("blocks", "attn", "q", "bias"), "blk.{i}.attn_q.bias", 0, permuted=True),
    TensorMap(("blocks", "attn", "k", "bias"), "blk.{i}.attn_k.bias", 0, permuted=True),
    TensorMap(("blocks", "attn", "v", "bias"), "blk.{i}.attn_v.bias", 0),
    TensorMap(("blocks", "attn", "o", "bias"), "blk.{i}.attn_output.bias", None),
    TensorMap(("blocks", "mlp_norm", "scale"), "blk.{i}.ffn_norm.weight", None),
    TensorMap(("blocks", "mlp", "gate", "weight"), "blk.{i}.ffn_gate.weight", 1),
    TensorMap(("blocks", "mlp", "up", "weight"), "blk.{i}.ffn_up.weight", 1),
    TensorMap(("blocks", "mlp", "down", "weight"), "blk.{i}.ffn_down.weight", 1),
    TensorMap(("blocks", "mlp", "up", "bias"), "blk.{i}.ffn_up.bias", None),
    TensorMap(("blocks", "mlp", "down", "bias"), "blk.{i}.ffn_down.bias", None),
    TensorMap(("final_norm", "scale"), "output_norm.weight", None),
    TensorMap(("lm_head",), "output.weight", 1),
)
_BY_PATH = {m.ours: m for m in LLAMA_TENSORS}


def _reader(path: str | Path) -> gguf.GGUFReader:
    """The parsed file. Parsing a vocabulary's metadata takes seconds, and a run reads the
    model section, the tokenizer and the tensors of one file in turn, so the last file's
    reader is kept (keyed by its path, size and modification time)."""
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such GGUF file: check the path") from None
    try:
        return _open(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    except ValueError as e:
        raise ConfigError(f"{path}: not a readable GGUF file ({e}): give a .gguf file written by llama.cpp") from None


@functools.lru_cache(maxsize=1)
def _open(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _required(reader: gguf.GGUFReader, path: str | Path, key: str) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ConfigError(f"{path}: metadata key {key} is missing: the file is incomplete; "
                          "re-convert it with llama.cpp's convert_hf_to_gguf.py")
    return value


def _f32(value: float) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def gguf_model_section(path: str | Path) -> dict[str, Any]:
    """``config.model`` keys for the decoder described by a GGUF file's metadata.

    Reads llama.cpp's ``{arch}.*`` keys (``block_count``, ``embedding_length``,
    ``attention.head_count[_kv]``, ...); the vocabulary size is the row count of
    ``token_embd.weight`` and the head is tied when the file has no ``output.weight``.
    Raises ConfigError for an architecture other than llama, rope scaling, partial RoPE or a
    missing key, naming the file and the key.
    """
    reader = _reader(path)
    arch = _required(reader, path, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{path}: general.architecture is {arch!r}, but lmstack reads only "
                          f"{', '.join(ARCHITECTURES)} GGUF files: use a llama-architecture model (Llama, SmolLM2)")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ConfigError(f"{path}: {arch}.rope.scaling.type is {scaling!r}; lmstack's decoder has no RoPE scaling "
                          "yet: use a model without it")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConfigError(f"{path}: tensor token_embd.weight is missing: the file is incomplete")
    d_model = int(_required(reader, path, f"{arch}.embedding_length"))
    n_heads = int(_required(reader, path, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", d_model // n_heads))
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ConfigError(f"{path}: {arch}.rope.dimension_count is {rope_dims} but heads are {head_dim} wide; "
                          "lmstack rotates whole heads: use a model with full-width RoPE")
    return {
        "name": "decoder",
        "style": "llama",
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "d_model": d_model,
        "n_layers": int(_required(reader, path, f"{arch}.block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "d_ff": int(_required(reader, path, f"{arch}.feed_forward_length")),
        "max_seq_len": int(_required(reader, path, f"{arch}.context_length")),
        "tie_embeddings": "output.weight" not in tensors,
        "use_bias": "blk.0.attn_q.bias" in tensors,
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "norm_eps": _f32(_required(reader, path, f"{arch}.attention.layer_norm_rms_epsilon")),
    }


def _ne(shape: tuple[int, ...]) -> list[int]:
    """A numpy shape in GGUF's order (ne0, the contiguous axis, first), as gguf-dump prints it."""
    return [int(s) for s in shape[::-1]]


def load_gguf_params(path: str | Path, abstract_params: nnx.State) -> nnx.State:
    """The parameters stored in a GGUF file, as float32 arrays placed like ``abstract_params``.

    ``abstract_params``: the ``params`` subtree of ``lmstack.trainstate.abstract_state(...)[1]``
    for a llama-style decoder (ShapeDtypeStruct leaves carrying ``.sharding``), e.g. built
    from :func:`gguf_model_section`. Tensors stored as F32, F16, BF16, Q8_0, Q4_0 or Q4_1
    are dequantized one at a time, q/k rows are returned to rotate-half order
    (:func:`lmstack.interop.qk.unpermute`) and each parameter goes to its devices with
    ``jax.device_put`` before the next is read, so host memory holds the file's mapping plus
    one stacked parameter. Everything is checked before anything is placed; raises
    ConfigError naming the file and tensor for a missing, unexpected or misshapen tensor or
    an unsupported quantisation type.
    """
    reader = _reader(path)
    tensors = {t.name: t for t in reader.tensors}
    flat = list(nnx.to_flat_state(abstract_params))
    for key, _ in flat:
        if tuple(key) not in _BY_PATH:
            raise ConfigError(f"{path}: model parameter {'.'.join(map(str, key))} has no GGUF tensor in the llama "
                              "tensor map: load GGUF files into a decoder with style='llama'")
    plan = []
    for key, var in flat:
        leaf = var.get_value() if isinstance(var, nnx.Variable) else var
        where = ".".join(map(str, key))
        m = _BY_PATH[tuple(key)]
        stacked = key[0] == "blocks"
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        names = [m.gguf.format(i=i) for i in range(leaf.shape[0])] if stacked else [m.gguf]
        for name in names:
            t = tensors.get(name)
            if t is None:
                raise ConfigError(f"{path}: tensor {name} is missing (the model needs it for params.{where}): "
                                  "build the model config from this file with gguf_model_section")
            got, want = [int(n) for n in t.shape], _ne(m.gguf_shape(shape))
            if got != want:
                raise ConfigError(f"{path}: tensor {name} has shape {got} but the model needs {want} (GGUF order, "
                                  "ne0 first): build the model config from this file with gguf_model_section")
            if t.tensor_type not in DEQUANTIZABLE:
                raise ConfigError(f"{path}: tensor {name} is stored as {t.tensor_type.name}, which lmstack cannot "
                                  f"dequantize (supported: {', '.join(q.name for q in DEQUANTIZABLE)}): "
                                  "re-quantize the file with llama-quantize to one of these")
        plan.append((key, var, leaf, m, shape, names, stacked))
    unexpected = sorted(set(tensors) - {n for *_, names, _ in plan for n in names})
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise ConfigError(f"{path}: tensors {shown} have no parameter in the model: build the model config "
                          "from this file with gguf_model_section")

    def read(name: str, m: TensorMap, shape: tuple[int, ...]) -> np.ndarray:
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(m.gguf_shape(shape))
        return m.from_gguf(w.astype(np.float32, copy=False), shape)

    loaded = []
    for key, var, leaf, m, shape, names, stacked in plan:
        if stacked:
            host = np.empty(leaf.shape, np.float32)
            for i, name in enumerate(names):
                host[i] = read(name, m, shape)
        else:
            host = read(names[0], m, shape)
            if np.may_share_memory(host, tensors[names[0]].data):  # an F32 tensor: a view of the file
                host = host.copy()
        arr = jax.device_put(host, leaf.sharding)
        del host
        loaded.append((key, var.replace(arr) if isinstance(var, nnx.Variable) else arr))
    return nnx.from_flat_state(loaded)


# --- tokenizer ---

TOKEN_TYPE_CONTROL = int(gguf.TokenType.CONTROL)
TOKEN_TYPE_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)


def gguf_tokenizer_parts(path: str | Path) -> dict[str, Any]:
    """The tokenizer stored in a GGUF file's ``tokenizer.*`` metadata, as plain values.

    Keys: ``path``, ``model`` (``tokenizer.ggml.model``), ``pre`` (``tokenizer.ggml.pre``),
    ``tokens`` (list[str]), ``merges`` (list[str], ``"a b"``), ``token_types`` (list[int],
    llama.cpp ``TokenType``), ``bos_id`` / ``eos_id`` / ``pad_id`` / ``unk_id`` (int or None),
    ``add_bos`` (bool) and ``chat_template`` (str or None). Raises DataError if the file
    holds no tokenizer.
    """
    reader = _reader(path)
    if reader.get_field("tokenizer.ggml.tokens") is None:
        raise DataError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.tokens): "
                        "give the tokenizer separately")

    def ids(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return {
        "path": str(path),
        "model": _field(reader, "tokenizer.ggml.model", "gpt2"),
        "pre": _field(reader, "tokenizer.ggml.pre", "default"),
        "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
        "merges": list(_field(reader, "tokenizer.ggml.merges", [])),
        "token_types": [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [])],
        "bos_id": ids("bos_token_id"),
        "eos_id": ids("eos_token_id"),
        "pad_id": ids("padding_token_id"),
        "unk_id": ids("unknown_token_id"),
        "add_bos": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }


def build_gguf_tokenizer(parts: dict[str, Any]) -> "Any":
    """A ``tokenizers.Tokenizer`` equal to llama.cpp's for byte-level BPE vocabularies.

    ``parts`` as from :func:`gguf_tokenizer_parts`. Byte-level BPE over the GPT-2 split
    regex (``pre`` = ``gpt2``), with every digit split off first for ``pre`` = ``smollm``
    (llama.cpp ``LLAMA_VOCAB_PRE_TYPE_SMOLLM``, HF SmolLM2's ``Digits`` + ``ByteLevel``).
    CONTROL tokens become special tokens and USER_DEFINED tokens added tokens, both matched
    whole in the text; a BOS is prepended when ``add_bos``. Raises DataError for another
    tokenizer model or pre-tokenizer, naming the file and the value.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    where = parts.get("path", "tokenizer parts")
    if parts["model"] != "gpt2":
        raise DataError(f"{where}: tokenizer.ggml.model is {parts['model']!r}; lmstack rebuilds only byte-level "
                        "BPE ('gpt2') GGUF tokenizers: give the tokenizer separately")
    if parts["pre"] not in PRE_TOKENIZERS:
        raise DataError(f"{where}: tokenizer.ggml.pre is {parts['pre']!r}; lmstack knows the byte-level "
                        f"pre-tokenizers {', '.join(PRE_TOKENIZERS)}: give the tokenizer separately")
    tokens = parts["tokens"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in parts["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if parts["pre"] == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = parts["token_types"] or [0] * len(tokens)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED])
    if parts["add_bos"] and parts["bos_id"] is not None:
        bos = tokens[parts["bos_id"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, parts["bos_id"])])
    return tok


# --- export ---


def export_gguf(params: nnx.State, model_cfg: Any, out_path: str | Path, *, qtype: str = "F32",
                tokenizer_parts: dict[str, Any] | None = None) -> None:
    """Write a llama-architecture GGUF file that llama.cpp loads.

    ``params``: the decoder's parameter state (``nnx.state(model, nnx.Param)`` or the
    ``params`` of a train state); ``model_cfg``: its ``DecoderConfig`` (style llama).
    Matrices are stored as ``qtype`` (F32, F16 or Q8_0; a matrix whose rows do not split
    into Q8_0 blocks of 32 falls back to F16, as convert_hf_to_gguf.py does), 1-D tensors
    (norms, biases) always as F32; q/k rows are permuted into llama.cpp's order. Metadata:
    the ``llama.*`` keys llama.cpp requires, and the tokenizer from ``tokenizer_parts``
    (:func:`gguf_tokenizer_parts`) or ``tokenizer.ggml.model = "none"`` without one.
    Tensors are converted and written one at a time. Raises ConfigError for another model
    style or qtype.
    """
    c = model_cfg
    if c.style != "llama":
        raise ConfigError(f"GGUF export of {out_path}: model.style is {c.style!r}; lmstack writes llama-architecture "
                          "GGUF files only: export a style='llama' decoder")
    if qtype not in EXPORT_QTYPES:
        raise ConfigError(f"GGUF export of {out_path}: qtype {qtype!r} is not one of {', '.join(EXPORT_QTYPES)}")
    matrix_type, file_type = EXPORT_QTYPES[qtype]
    leaves = {tuple(k): (v.get_value() if isinstance(v, nnx.Variable) else v) for k, v in nnx.to_flat_state(params)}
    unknown = sorted(".".join(k) for k in leaves if k not in _BY_PATH)
    if unknown:
        raise ConfigError(f"GGUF export of {out_path}: parameters {', '.join(unknown)} have no llama GGUF tensor")

    # llama.cpp's order: token_embd, then each block's tensors, then output_norm and output
    top = [m for m in LLAMA_TENSORS if m.ours in leaves and m.ours[0] != "blocks"]
    blocks = [m for m in LLAMA_TENSORS if m.ours in leaves and m.ours[0] == "blocks"]
    order = [(m, None) for m in top[:1]] + [(m, i) for i in range(c.n_layers) for m in blocks]
    order += [(m, None) for m in top[1:]]

    def tensor_type(shape: tuple[int, ...]) -> Q:
        if len(shape) == 1:
            return Q.F32
        if matrix_type == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
            return Q.F16
        return matrix_type

    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_name(Path(out_path).stem)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.d_ff)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if c.head_dim != c.d_model // c.n_heads:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer_parts)

    for m, i in order:
        shape = m.gguf_shape(tuple(leaves[m.ours].shape[1:] if i is not None else leaves[m.ours].shape))
        q = tensor_type(shape)
        if q in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if q == Q.F32 else np.float16)
            writer.add_tensor_info(m.gguf.format(i=i), shape, dtype, math.prod(shape) * dtype.itemsize)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, q)
            writer.add_tensor_info(m.gguf.format(i=i), byte_shape, np.dtype(np.uint8), math.prod(byte_shape), q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for m, i in order:
        x = np.asarray(jax.device_get(leaves[m.ours][i] if i is not None else leaves[m.ours]), np.float32)
        w = m.to_gguf(x)
        q = tensor_type(w.shape)
        if q != Q.F32:
            w = w.astype(np.float16) if q == Q.F16 else gguf.quants.quantize(w, q)
        writer.write_tensor_data(w)
    writer.close()


def _add_tokenizer(writer: gguf.GGUFWriter, parts: dict[str, Any] | None) -> None:
    if parts is None:
        writer.add_tokenizer_model("none")  # llama.cpp: a model without a vocabulary
        return
    writer.add_tokenizer_model(parts["model"])
    writer.add_tokenizer_pre(parts["pre"])
    writer.add_token_list(parts["tokens"])
    if parts["token_types"]:
        writer.add_token_types(parts["token_types"])
    if parts["merges"]:
        writer.add_token_merges(parts["merges"])
    for key, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                     ("pad_id", writer.add_pad_token_id), ("unk_id", writer.add_unk_token_id)):
        if parts[key] is not None:
            add(parts[key])
    writer.add_add_bos_token(parts["add_bos"])
    if parts["chat_template"]:
        writer.add_chat_template(parts["chat_template"])
