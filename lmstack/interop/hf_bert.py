"""Import BERT-family encoders from a Hugging Face model directory into ``model.encoder``.

The directory holds ``config.json`` (``model_type: bert``) and ``model.safetensors`` in the
layout of transformers' ``modeling_bert.py``: ``BertModel`` names (``embeddings.*``,
``encoder.layer.N.*``, ``pooler.*``), or ``BertForMaskedLM`` / ``BertForPreTraining`` names
(the same under ``bert.``, plus the ``cls.*`` heads). A sentence-transformers directory
(``modules.json`` with a ``Pooling`` module, e.g. all-MiniLM-L6-v2) sets the pooling; its
``Normalize`` module is left to the user (``features`` are not L2-normalised).

HF's ``nn.Linear`` stores ``[out, in]``; lmstack stores ``[in, out]`` with the head axes split
(``q``: ``(d, n, h)``, ``o``: ``(n, h, d)``) and block parameters stacked on a leading layers axis.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lmstack.config import ConfigError
from lmstack.interop.hf import SafetensorsDir, read_safetensors

__all__ = ["hf_bert_model_section", "load_hf_bert_params"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "bert."  # BertForMaskedLM / BertForPreTraining keep the encoder under this name

# Tensors of a checkpoint that no lmstack parameter holds, skipped as transformers skips them:
# the position-id buffer, the next-sentence head, and the decoder's copies of tied tensors
# (the decoder bias is ``cls.predictions.bias``; a tied decoder weight is the word embeddings;
# an untied one fills ``lm_head``).
_IGNORED = ("embeddings.position_ids", "cls.seq_relationship.weight", "cls.seq_relationship.bias",
            "cls.predictions.decoder.bias", "cls.predictions.decoder.weight")
# Heads the configured model may leave out: their tensors are then skipped, as when
# transformers loads a ``BertModel`` from a ``BertForPreTraining`` checkpoint.
_OPTIONAL_HEADS = ("pooler.", "cls.predictions.")

# Layouts: "copy" (same shape), "flat" (HF holds our shape flattened: per-head biases),
# "linear" ([out, in] -> [in, *out]), "linear_from_heads" ([d, n*h] -> [n, h, d]).
_TOP = {
    ("embed",): ("embeddings.word_embeddings.weight", "copy"),
    ("pos_embed",): ("embeddings.position_embeddings.weight", "copy"),
    ("type_embed",): ("embeddings.token_type_embeddings.weight", "copy"),
    ("embed_norm", "scale"): ("embeddings.LayerNorm.weight", "copy"),
    ("embed_norm", "bias"): ("embeddings.LayerNorm.bias", "copy"),
    ("pooler_dense", "weight"): ("pooler.dense.weight", "linear"),
    ("pooler_dense", "bias"): ("pooler.dense.bias", "copy"),
    ("mlm_dense", "weight"): ("cls.predictions.transform.dense.weight", "linear"),
    ("mlm_dense", "bias"): ("cls.predictions.transform.dense.bias", "copy"),
    ("mlm_norm", "scale"): ("cls.predictions.transform.LayerNorm.weight", "copy"),
    ("mlm_norm", "bias"): ("cls.predictions.transform.LayerNorm.bias", "copy"),
    ("lm_head",): ("cls.predictions.decoder.weight", "linear"),
    ("lm_bias",): ("cls.predictions.bias", "copy"),
}
# Under ``blocks`` (post-norm: attn_norm follows the attention residual, mlp_norm the MLP's).
_BLOCK = {
    ("attn", "q", "weight"): ("attention.self.query.weight", "linear"),
    ("attn", "q", "bias"): ("attention.self.query.bias", "flat"),
    ("attn", "k", "weight"): ("attention.self.key.weight", "linear"),
    ("attn", "k", "bias"): ("attention.self.key.bias", "flat"),
    ("attn", "v", "weight"): ("attention.self.value.weight", "linear"),
    ("attn", "v", "bias"): ("attention.self.value.bias", "flat"),
    ("attn", "o", "weight"): ("attention.output.dense.weight", "linear_from_heads"),
    ("attn", "o", "bias"): ("attention.output.dense.bias", "copy"),
    ("attn_norm", "scale"): ("attention.output.LayerNorm.weight", "copy"),
    ("attn_norm", "bias"): ("attention.output.LayerNorm.bias", "copy"),
    ("mlp", "up", "weight"): ("intermediate.dense.weight", "linear"),
    ("mlp", "up", "bias"): ("intermediate.dense.bias", "copy"),
    ("mlp", "down", "weight"): ("output.dense.weight", "linear"),
    ("mlp", "down", "bias"): ("output.dense.bias", "copy"),
    ("mlp_norm", "scale"): ("output.LayerNorm.weight", "copy"),
    ("mlp_norm", "bias"): ("output.LayerNorm.bias", "copy"),
}
_ST_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
_ST_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
               "sentence_transformers.models.Normalize")


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ConfigError(f"{file} not found: point the importer at a Hugging Face model directory "
                          f"holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    return json.loads(file.read_text())


def _tensor_names(model_dir: Path) -> list[str]:
    """Tensor names (single file or shards) with the ``bert.`` prefix removed, without loading them."""
    return [n.removeprefix(PREFIX) for n in SafetensorsDir(model_dir).file_of]


def _sentence_transformers_pooling(model_dir: Path) -> str | None:
    """The pooling of a sentence-transformers directory (``modules.json``), or None without one."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    pooling = None
    for module in _read_json(modules_file):
        kind = module["type"]
        if kind not in _ST_MODULES:
            raise ConfigError(f"{modules_file}: module {kind!r} is not supported by the BERT importer "
                              f"(supported: {', '.join(_ST_MODULES)})")
        if kind.endswith(".Pooling"):
            pooling_file = model_dir / module["path"] / CONFIG_FILE
            modes = [k for k, v in _read_json(pooling_file).items() if k.startswith("pooling_mode_") and v]
            if len(modes) != 1 or modes[0] not in _ST_POOLING:
                raise ConfigError(f"{pooling_file}: pooling modes {modes} are not supported: "
                                  f"model.encoder pools with exactly one of {', '.join(_ST_POOLING)}")
            pooling = _ST_POOLING[modes[0]]
    return pooling


def hf_bert_model_section(path: str | Path) -> dict[str, Any]:
    """``config.model`` keys for ``model.encoder`` from a Hugging Face BERT directory.

    From ``config.json`` (transformers ``BertConfig``): sizes, ``layer_norm_eps``, learned
    absolute positions, post-LayerNorm, exact (erf) GELU, biases, token types. From the
    weights: ``pooler`` and ``mlm_head`` / ``mlm_transform`` when those tensors exist. Pooling:
    the sentence-transformers ``Pooling`` module if any (then without BERT's pooler, which
    sentence-transformers does not use), else ``cls`` (BERT's pooled output).
    Raises ConfigError naming the file, key and value of an unsupported option.
    """
    model_dir = Path(path)
    config_file = model_dir / CONFIG_FILE
    hf = _read_json(config_file)

    def get(key: str, default: Any = None) -> Any:
        if key not in hf and default is None:
            raise ConfigError(f"{config_file}: key {key!r} is missing: a BertConfig needs it")
        return hf.get(key, default)

    # (key, the one value model.encoder supports, BertConfig's default when the key is absent)
    for key, supported, default in (("model_type", "bert", None), ("position_embedding_type", "absolute", "absolute"),
                                    ("hidden_act", "gelu", "gelu")):
        value = get(key, default)
        if value != supported:
            raise ConfigError(f"{config_file}: {key}={value!r} is not supported by model.encoder: "
                              f"the BERT importer needs {key}={supported!r}")
    names = _tensor_names(model_dir)
    st_pooling = _sentence_transformers_pooling(model_dir)
    has_mlm = any(n.startswith("cls.predictions.") for n in names)
    return dict(
        name="encoder",
        vocab_size=get("vocab_size"),
        d_model=get("hidden_size"),
        n_layers=get("num_hidden_layers"),
        n_heads=get("num_attention_heads"),
        d_ff=get("intermediate_size"),
        max_seq_len=get("max_position_embeddings"),
        type_vocab_size=get("type_vocab_size"),
        norm_eps=float(get("layer_norm_eps")),
        positions="learned",
        norm="layernorm",
        norm_position="post",
        activation="gelu",
        use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        pooling=st_pooling or "cls",
        pooler=st_pooling is None and "pooler.dense.weight" in names,
        mlm_head=has_mlm,
        mlm_transform=has_mlm and "cls.predictions.transform.dense.weight" in names,
    )


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that fills an lmstack parameter (one layer) of ``shape``."""
    if layout == "copy":
        return shape
    if layout == "flat":
        return (math.prod(shape),)
    n_in = 2 if layout == "linear_from_heads" else 1
    return (math.prod(shape[n_in:]), math.prod(shape[:n_in]))


def _to_ours(layout: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    arr = arr.T if layout.startswith("linear") else arr
    return np.asarray(arr, np.float32).reshape(shape)


def _sources(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[list[str], str, tuple[int, ...]]:
    """HF tensor names (one per layer for a block parameter), layout and per-tensor shape."""
    if path[0] == "blocks":
        name, layout = _BLOCK[path[1:]]
        return [f"encoder.layer.{i}.{name}" for i in range(shape[0])], layout, shape[1:]
    name, layout = _TOP[path]
    return [name], layout, shape


def load_hf_bert_params(path: str | Path, abstract_params: nnx.State) -> nnx.State:
    """Float32 parameters for ``abstract_params`` from ``PATH/model.safetensors``.

    ``abstract_params`` is the ``params`` subtree of ``lmstack.trainstate.abstract_state(...)[1]``
    of a ``model.encoder`` built from :func:`hf_bert_model_section`; each leaf is placed with
    its sharding (``jax.device_put``), one at a time. Names follow transformers'
    ``modeling_bert.py`` with or without the ``bert.`` prefix; a tied MLM decoder takes the word
    embeddings, as transformers ties it. Raises ConfigError naming the tensors that are missing,
    unexpected (no parameter holds them) or of the wrong shape.
    """
    file = Path(path) / WEIGHTS_FILE  # where the errors say the tensors are
    tensors = {n.removeprefix(PREFIX): t for n, t in read_safetensors(path).items()}
    flat = list(nnx.to_flat_state(abstract_params))
    plan = [(p, v, *_sources(p, v.get_value().shape)) for p, v in flat]

    wanted = {n for *_, names, _, _ in plan for n in names}
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise ConfigError(f"{file}: missing tensor(s) {', '.join(missing[:5])}"
                          f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}: "
                          f"the checkpoint does not match the model section (layers, pooler, MLM head)")
    heads_left_out = [h for h in _OPTIONAL_HEADS if not any(n.startswith(h) for n in wanted)]
    unexpected = sorted(n for n in tensors.keys() - wanted
                        if n not in _IGNORED and not any(n.startswith(h) for h in heads_left_out))
    if unexpected:
        raise ConfigError(f"{file}: unexpected tensor(s) {', '.join(unexpected[:5])}"
                          f"{f' and {len(unexpected) - 5} more' if len(unexpected) > 5 else ''}: "
                          f"model.encoder has no parameter for them; check the model section matches {CONFIG_FILE}")

    leaves = []
    for p, var, names, layout, shape in plan:
        expected = _hf_shape(layout, shape)
        for n in names:
            if tensors[n].shape != expected:
                raise ConfigError(f"{file}: tensor {n} has shape {tuple(tensors[n].shape)}, expected {expected} "
                                  f"for model.encoder's {'.'.join(p)}: check {CONFIG_FILE}'s sizes")
        arr = np.stack([_to_ours(layout, tensors[n], shape) for n in names]) if p[0] == "blocks" \
            else _to_ours(layout, tensors[names[0]], shape)
        leaves.append((p, var.replace(value=jax.device_put(arr, var.get_value().sharding))))
    return nnx.from_flat_state(leaves)
