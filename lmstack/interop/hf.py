"""Hugging Face safetensors in and out for the decoder.

Four HF classes map onto :class:`lmstack.models.decoder.Decoder`:

- ``LlamaForCausalLM`` (also SmolLM), ``MistralForCausalLM`` and ``Qwen2ForCausalLM``: the
  ``llama`` style; Qwen2 adds q/k/v biases (``qkv_bias``), Mistral a ``sliding_window``.
  HF Llama's RoPE is the rotate-half form ours uses, so q/k need no permutation.
- ``GPT2LMHeadModel``: the ``gpt2`` style with biases; its ``Conv1D`` weights are stored
  ``[in, out]`` and its q/k/v projections fused in one ``c_attn``.

HF ``Linear`` weights are ``[out, in]``; ours are ``[in, *out]`` with heads split out
(``q``: ``(d, n, h)``, ``o``: ``(n, h, d)``) and every block parameter stacked on a leading
layers axis. Tensors are converted in float32 on the host, one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lmstack.config import ConfigError
from lmstack.models.decoder import Decoder, DecoderConfig

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"

# model_type -> (our style, the causal-LM class, the prefix of the base model's tensors)
FAMILIES = {
    "llama": ("llama", "LlamaForCausalLM", "model."),
    "mistral": ("llama", "MistralForCausalLM", "model."),
    "qwen2": ("llama", "Qwen2ForCausalLM", "model."),
    "gpt2": ("gpt2", "GPT2LMHeadModel", "transformer."),
}
# HF activation names (transformers ACT2FN) -> ours. gelu_new and gelu_pytorch_tanh are both
# the tanh approximation; gelu is the exact erf form.
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
# Buffers some checkpoints carry that are not parameters: RoPE tables, GPT-2's causal mask.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")
DTYPES = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}


# --- safetensors files ------------------------------------------------------------------------------


class SafetensorsDir:
    """The tensors of an HF model directory (one ``model.safetensors`` or an index and its
    shards), read lazily one at a time."""

    def __init__(self, path: str | Path):
        d = Path(path)
        index, single = d / SAFETENSORS_INDEX, d / SAFETENSORS
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConfigError(f"{index}: no 'weight_map' object: expected the HF sharded-checkpoint index")
            self.file_of = {name: d / shard for name, shard in weight_map.items()}
            for name, shard in self.file_of.items():
                if not shard.is_file():
                    raise ConfigError(f"{shard} is missing ({index} puts {name} there): copy every shard "
                                      f"the index lists into {d}")
        elif single.is_file():
            with _open(single) as f:
                self.file_of = {name: single for name in f.keys()}
        else:
            raise ConfigError(f"{d}: neither {SAFETENSORS} nor {SAFETENSORS_INDEX} found: "
                              f"point at a Hugging Face model directory")

    def shape(self, name: str) -> tuple[int, ...]:
        with _open(self.file_of[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16/fp16 files are upcast)."""
        with _open(self.file_of[name]) as f:
            return np.asarray(f.get_tensor(name), np.float32)


def _open(file: Path):
    from safetensors import safe_open

    return safe_open(file, framework="numpy")


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of an HF model directory by HF name, as float32 numpy arrays.

    Reads ``model.safetensors`` or the shards that ``model.safetensors.index.json`` lists.
    Raises ConfigError when neither file, or a listed shard, is there.
    """
    tensors = SafetensorsDir(path)
    return {name: tensors.read(name) for name in tensors.file_of}


# --- config.json ------------------------------------------------------------------------------------


def _read_config(path: str | Path) -> tuple[Path, dict[str, Any], str]:
    """(config.json path, its contents, model_type), the model type checked."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise ConfigError(f"{file} is missing: an HF model directory holds config.json beside its safetensors")
    hf = json.loads(file.read_text())
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"{file}: model_type={model_type!r} is not supported: lmstack imports "
                          f"{', '.join(FAMILIES)} decoders")
    expected = FAMILIES[model_type][1]
    for arch in hf.get("architectures") or [expected]:
        if arch != expected:
            raise ConfigError(f"{file}: architectures={hf['architectures']!r} is not supported: "
                              f"lmstack imports {expected} for model_type {model_type!r}")
    return file, hf, model_type


def _require(hf: dict[str, Any], key: str, file: Path) -> Any:
    if hf.get(key) is None:
        raise ConfigError(f"{file}: key {key!r} is missing: write the HF config.json of a {hf['model_type']} model")
    return hf[key]


def _unsupported(file: Path, key: str, value: Any, what: str) -> ConfigError:
    return ConfigError(f"{file}: {key}={value!r} is not supported: {what}")


def _rope_keys(hf: dict[str, Any], file: Path) -> dict[str, Any]:
    """rope_theta and the llama3 ``rope_scaling`` fields (HF ``_compute_llama3_parameters``)."""
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    keys: dict[str, Any] = {"rope_theta": float(hf.get("rope_theta", 10000.0)), "rope_scaling": ""}
    if rope_type == "llama3":
        keys.update(
            rope_scaling="llama3",
            rope_scaling_factor=float(scaling["factor"]),
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise _unsupported(file, "rope_scaling.rope_type", rope_type, "lmstack implements llama3 scaling or none")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(file, "partial_rotary_factor", hf["partial_rotary_factor"],
                           "lmstack rotates every head dimension")
    return keys


def hf_model_section(path: str | Path) -> dict[str, Any]:
    """lmstack ``config.model`` keys for the HF model in directory ``path`` (its config.json).

    Reads ``model_type`` llama / mistral / qwen2 (``llama`` style) and gpt2 (``gpt2`` style,
    with biases). Every size is explicit, so the section alone determines the parameter shapes.
    Raises ConfigError naming config.json, the key and its value for an unsupported
    architecture or option (a rope_scaling type other than llama3, attention biases on Llama,
    Qwen2's per-layer sliding window, ...).
    """
    file, hf, model_type = _read_config(path)
    style = FAMILIES[model_type][0]
    if style == "gpt2":
        d, n = _require(hf, "n_embd", file), _require(hf, "n_head", file)
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise _unsupported(file, "activation_function", act, f"use one of {', '.join(GPT2_ACTIVATIONS)}")
        if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
            raise ConfigError(f"{file}: scale_attn_by_inverse_layer_idx / scale_attn_weights other than "
                              f"False / True are not supported: attention logits are scaled by 1/sqrt(head_dim)")
        return {
            "name": "decoder", "style": "gpt2",
            "vocab_size": _require(hf, "vocab_size", file), "d_model": d,
            "n_layers": _require(hf, "n_layer", file), "n_heads": n, "n_kv_heads": n, "head_dim": d // n,
            "d_ff": hf.get("n_inner") or 4 * d, "max_seq_len": _require(hf, "n_positions", file),
            "tie_embeddings": hf.get("tie_word_embeddings", True), "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "use_bias": True, "qkv_bias": False, "activation": GPT2_ACTIVATIONS[act], "sliding_window": 0,
            "rope_theta": 10000.0, "rope_scaling": "",
        }
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported(file, "hidden_act", hf["hidden_act"], "Llama-family decoders use silu (SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _unsupported(file, key, hf[key], "lmstack's llama style has no biases (Qwen2's q/k/v ones aside)")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise _unsupported(file, "use_sliding_window", True, "Qwen2's per-layer sliding window is not implemented")
    d, n = _require(hf, "hidden_size", file), _require(hf, "num_attention_heads", file)
    section = {
        "name": "decoder", "style": "llama",
        "vocab_size": _require(hf, "vocab_size", file), "d_model": d,
        "n_layers": _require(hf, "num_hidden_layers", file), "n_heads": n,
        "n_kv_heads": hf.get("num_key_value_heads") or n, "head_dim": hf.get("head_dim") or d // n,
        "d_ff": _require(hf, "intermediate_size", file),
        "max_seq_len": _require(hf, "max_position_embeddings", file),
        "tie_embeddings": hf.get("tie_word_embeddings", False), "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "use_bias": False, "qkv_bias": model_type == "qwen2", "activation": "swiglu",
        "sliding_window": (hf.get("sliding_window") or 0) if model_type == "mistral" else 0,
    }
    section.update(_rope_keys(hf, file))
    return section


# --- tensor layouts ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One of our parameters and the HF tensor that holds it (per layer when ``hf`` has ``{i}``).

    ``layout``: ``same`` (embeddings), ``flat`` (HF keeps a 1-D vector: norms, biases),
    ``linear`` (HF ``nn.Linear``, ``[out, in]``), ``conv1d`` (GPT-2 ``Conv1D``, ``[in, out]``).
    ``in_dims``: how many leading dims of our (per-layer) array form the input side.
    ``part``: (index, count) of an equal slice along the HF tensor's last axis (GPT-2's
    fused ``c_attn`` holds q, k and v).
    """

    ours: str
    hf: str
    layout: str = "same"
    in_dims: int = 1
    part: tuple[int, int] = (0, 1)

    def hf_shape(self, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The whole HF tensor's shape for our per-layer shape."""
        count = self.part[1]
        if self.layout == "same":
            return ours_shape
        if self.layout == "flat":
            return (math.prod(ours_shape) * count,)
        n_in, n_out = math.prod(ours_shape[: self.in_dims]), math.prod(ours_shape[self.in_dims:])
        return (n_out * count, n_in) if self.layout == "linear" else (n_in, n_out * count)

    def to_ours(self, w: np.ndarray, ours_shape: tuple[int, ...]) -> np.ndarray:
        index, count = self.part
        size = w.shape[-1] // count
        w = w[..., index * size:(index + 1) * size]
        return (w.T if self.layout == "linear" else w).reshape(ours_shape)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """Our per-layer array as this tensor's part of the HF tensor."""
        if self.layout == "same":
            return x
        if self.layout == "flat":
            return x.reshape(-1)
        w = x.reshape(math.prod(x.shape[: self.in_dims]), -1)
        return w.T if self.layout == "linear" else w


def _llama_layout() -> list[_Tensor]:
    """HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM names."""
    layer = "model.layers.{i}."
    out = [
        _Tensor("embed", "model.embed_tokens.weight"),
        _Tensor("final_norm/scale", "model.norm.weight", "flat"),
        _Tensor("lm_head", "lm_head.weight", "linear"),
        _Tensor("blocks/attn_norm/scale", layer + "input_layernorm.weight", "flat"),
        _Tensor("blocks/mlp_norm/scale", layer + "post_attention_layernorm.weight", "flat"),
        _Tensor("blocks/attn/o/weight", layer + "self_attn.o_proj.weight", "linear", in_dims=2),
        _Tensor("blocks/mlp/gate/weight", layer + "mlp.gate_proj.weight", "linear"),
        _Tensor("blocks/mlp/up/weight", layer + "mlp.up_proj.weight", "linear"),
        _Tensor("blocks/mlp/down/weight", layer + "mlp.down_proj.weight", "linear"),
    ]
    for p in "qkv":
        out.append(_Tensor(f"blocks/attn/{p}/weight", layer + f"self_attn.{p}_proj.weight", "linear"))
        out.append(_Tensor(f"blocks/attn/{p}/bias", layer + f"self_attn.{p}_proj.bias", "flat"))
    return out


def _gpt2_layout() -> list[_Tensor]:
    """HF GPT2LMHeadModel names: Conv1D weights ``[in, out]``, q/k/v fused in ``c_attn``."""
    layer = "transformer.h.{i}."
    out = [
        _Tensor("embed", "transformer.wte.weight"),
        _Tensor("pos_embed", "transformer.wpe.weight"),
        _Tensor("final_norm/scale", "transformer.ln_f.weight", "flat"),
        _Tensor("final_norm/bias", "transformer.ln_f.bias", "flat"),
        _Tensor("lm_head", "lm_head.weight", "linear"),
        _Tensor("blocks/attn/o/weight", layer + "attn.c_proj.weight", "conv1d", in_dims=2),
        _Tensor("blocks/attn/o/bias", layer + "attn.c_proj.bias", "flat"),
        _Tensor("blocks/mlp/up/weight", layer + "mlp.c_fc.weight", "conv1d"),
        _Tensor("blocks/mlp/up/bias", layer + "mlp.c_fc.bias", "flat"),
        _Tensor("blocks/mlp/down/weight", layer + "mlp.c_proj.weight", "conv1d"),
        _Tensor("blocks/mlp/down/bias", layer + "mlp.c_proj.bias", "flat"),
    ]
    for ours, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        out.append(_Tensor(f"blocks/{ours}/scale", layer + f"{hf}.weight", "flat"))
        out.append(_Tensor(f"blocks/{ours}/bias", layer + f"{hf}.bias", "flat"))
    for j, p in enumerate("qkv"):
        out.append(_Tensor(f"blocks/attn/{p}/weight", layer + "attn.c_attn.weight", "conv1d", part=(j, 3)))
        out.append(_Tensor(f"blocks/attn/{p}/bias", layer + "attn.c_attn.bias", "flat", part=(j, 3)))
    return out


def _layout(style: str) -> list[_Tensor]:
    return _gpt2_layout() if style == "gpt2" else _llama_layout()


def _names(t: _Tensor, n_layers: int) -> list[str]:
    return [t.hf.format(i=i) for i in range(n_layers)] if "{i}" in t.hf else [t.hf]


def _path_key(path: tuple[Any, ...]) -> str:
    """``blocks/attn/q`` from a pytree path (dict keys; the Variable's ``.value`` dropped)."""
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


# --- import -----------------------------------------------------------------------------------------


def load_hf_params(path: str | Path, abstract_params: nnx.State) -> nnx.State:
    """The HF model in directory ``path`` as our parameters, placed on ``abstract_params``' shardings.

    ``abstract_params``: the ``params`` subtree of ``lmstack.trainstate.abstract_state(...)[1]``
    (``ShapeDtypeStruct`` leaves with ``.sharding``) for the model ``hf_model_section(path)``
    describes. Each tensor is read, converted in float32 (HF ``[out, in]`` Linear / GPT-2
    ``[in, out]`` Conv1D to ours, per-layer tensors stacked on the layers axis) and put with
    ``jax.device_put(array, leaf.sharding)`` one parameter at a time. ``lm_head.weight`` is
    ignored when embeddings are tied (as HF ties it to the embedding), and so are buffers
    (``rotary_emb.inv_freq``, GPT-2's ``attn.bias``). Raises ConfigError naming the file and
    tensor for a missing or unexpected tensor, or one whose shape differs from the expected.
    """
    cfg_file, _, model_type = _read_config(path)
    style, arch, prefix = FAMILIES[model_type]
    tensors = SafetensorsDir(path)
    # Checkpoints saved from the base model (OpenAI's gpt2) lack the base-model prefix.
    present = {n if n.startswith(prefix) or n.startswith("lm_head.") else prefix + n: n for n in tensors.file_of}

    leaves = {_path_key(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_params)}
    rules = {t.ours: t for t in _layout(style) if t.ours in leaves}
    uncovered = sorted(set(leaves) - set(rules))
    if uncovered:
        raise ConfigError(f"{cfg_file}: our parameters {', '.join(uncovered)} have no tensor in the {arch} layout: "
                          f"build the model from hf_model_section({str(path)!r})")
    n_layers = leaves["blocks/attn/q/weight"].shape[0]
    expected: dict[str, tuple[int, ...]] = {}
    for ours, t in rules.items():
        per_layer = "{i}" in t.hf
        for name in _names(t, n_layers):
            expected[name] = t.hf_shape(leaves[ours].shape[1:] if per_layer else leaves[ours].shape)

    missing = [n for n in expected if n not in present]
    if missing:
        raise ConfigError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all) for {arch}: "
                          f"the checkpoint does not match its config.json")
    tied = "lm_head" not in leaves
    unexpected = [n for n in present if n not in expected and not n.endswith(IGNORED_SUFFIXES)
                  and not (tied and n == "lm_head.weight")]
    if unexpected:
        raise ConfigError(f"{path}: unexpected tensor {present[unexpected[0]]} ({len(unexpected)} in all: "
                          f"{', '.join(present[n] for n in unexpected[:5])}) for {arch} as config.json describes it")
    for name, shape in expected.items():
        got = tensors.shape(present[name])
        if got != shape:
            raise ConfigError(f"{tensors.file_of[present[name]]}: tensor {present[name]} has shape {list(got)}, "
                              f"expected {list(shape)} from {cfg_file}")

    def place(p: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        t = rules[_path_key(p)]
        if "{i}" in t.hf:
            arr = np.stack([t.to_ours(tensors.read(present[n]), leaf.shape[1:]) for n in _names(t, n_layers)])
        else:
            arr = t.to_ours(tensors.read(present[t.hf]), leaf.shape)
        return jax.device_put(arr.astype(leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(place, abstract_params)


# --- export -----------------------------------------------------------------------------------------


def _export_family(cfg: DecoderConfig) -> str:
    """The HF model_type that represents ``cfg``; ConfigError naming the option that has none."""
    def refuse(option: str, why: str) -> ConfigError:
        return ConfigError(f"model.{option} has no HF equivalent for export: {why}")

    if cfg.style == "gpt2":
        if cfg.mlp_activation not in ("gelu", "gelu_tanh", "relu"):
            raise refuse(f"activation={cfg.mlp_activation!r}", "GPT2LMHeadModel takes gelu, gelu_tanh or relu")
        if cfg.n_kv_heads != cfg.n_heads or cfg.n_heads * cfg.head_dim != cfg.d_model:
            raise refuse("n_kv_heads/head_dim", "GPT-2 has n_kv_heads = n_heads and head_dim = d_model / n_heads")
        if cfg.sliding_window:
            raise refuse(f"sliding_window={cfg.sliding_window}", "GPT-2 attends to the whole context")
        return "gpt2"
    if cfg.use_bias or cfg.mlp_activation != "swiglu":
        raise refuse("use_bias/activation", "LlamaForCausalLM has a bias-free SwiGLU MLP")
    if cfg.qkv_bias and cfg.sliding_window:
        raise refuse("sliding_window", "Qwen2's sliding window applies per layer, not to every layer")
    return "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"


def _hf_config(cfg: DecoderConfig, model_type: str, dtype: str) -> dict[str, Any]:
    """config.json for ``cfg`` (HF LlamaConfig / MistralConfig / Qwen2Config / GPT2Config keys)."""
    base = {"architectures": [FAMILIES[model_type][1]], "model_type": model_type, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dtype}
    if model_type == "gpt2":
        act = {v: k for k, v in reversed(GPT2_ACTIVATIONS.items())}[cfg.mlp_activation]
        return base | {"n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.d_ff,
                       "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                       "activation_function": act, "scale_attn_weights": True}
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                        "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                        "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}
    out = base | {"hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
                  "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
                  "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
                  "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
                  "hidden_act": "silu"}
    if model_type == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    elif model_type == "mistral":
        out |= {"sliding_window": cfg.sliding_window}
    else:
        out |= {"use_sliding_window": False}
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= _flatten(v, f"{prefix}{k}/")
        return out
    return {prefix[:-1]: tree}


def export_hf(params: nnx.State | dict[str, Any], model_cfg: DecoderConfig, out_dir: str | Path, *,
              dtype: str = "float32") -> None:
    """Write ``model.safetensors`` and ``config.json`` (HF LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM or GPT2LMHeadModel) for the decoder ``params`` (an nnx.State or nested
    dict of arrays) built from ``model_cfg``. Tensors are written in ``dtype`` (float32,
    bfloat16 or float16). A gpt2-style model without biases gets zero ones (GPT-2 always has
    them). Raises ConfigError for an option HF cannot express or a parameter of the wrong
    shape. Tokenizer files are not written here.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    model_type = _export_family(model_cfg)
    ours = _flatten(params.to_pure_dict() if isinstance(params, nnx.State) else params)
    # the shapes of every tensor the HF layout holds: GPT-2's biases are there even when ours are not
    full_cfg = dataclasses.replace(model_cfg, use_bias=True) if model_cfg.style == "gpt2" else model_cfg
    shapes = {_path_key(p): s.shape for p, s in
              jax.tree_util.tree_leaves_with_path(nnx.state(nnx.eval_shape(lambda: Decoder(full_cfg, rngs=nnx.Rngs(0))),
                                                            nnx.Param))}
    for name, x in ours.items():
        if shapes.get(name) != tuple(x.shape):
            raise ConfigError(f"parameter {name} has shape {tuple(x.shape)}, but the model config makes it "
                              f"{shapes.get(name)}: pass the config the parameters were trained with")
    parts: dict[str, dict[int, np.ndarray]] = {}
    for t in _layout(model_cfg.style):
        if t.ours not in shapes:
            continue
        if t.ours in ours:
            x = np.asarray(jax.device_get(ours[t.ours]), np.float32)
        else:
            x = np.zeros(shapes[t.ours], np.float32)
        layers = list(x) if "{i}" in t.hf else [x]
        for name, layer in zip(_names(t, model_cfg.n_layers), layers):
            parts.setdefault(name, {})[t.part[0]] = t.to_hf(layer)
    tensors = {name: np.ascontiguousarray(np.concatenate([p[j] for j in sorted(p)], axis=-1).astype(DTYPES[dtype]))
               for name, p in parts.items()}

    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / SAFETENSORS, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(_hf_config(model_cfg, model_type, dtype), indent=2) + "\n")
