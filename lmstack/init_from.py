"""``init.from``: where a run's weights start, and what it inherits from there.

``init.from`` takes:

- ``scratch``: fresh initialisation (the default);
- ``WORKDIR`` or ``WORKDIR@STEP``: another run's latest (or given) checkpoint;
- ``WORKDIR/checkpoints/STEP``: an orbax checkpoint directory of a run;
- a Hugging Face model directory (``config.json`` + ``model.safetensors``, or sharded with
  ``model.safetensors.index.json``);
- a ``.gguf`` file.

Only parameters are loaded (the optimizer starts fresh), each tensor placed straight into
its sharding. The child run inherits its parent's tokenizer, reserved ids and architecture
(:func:`inherit`): a model setting that contradicts the parent's is an error naming both
values; settings that do not change what the weights mean (``WEIGHT_FREE_KEYS``: dropout,
dtype, remat, scan unrolling, init scale) may differ. New reserved ids grow the embedding
and output tables (:func:`resize_vocab`). A child may add a sequence-classification head
(``model.num_labels``) to a parent without one; the head starts from the initialiser
(:func:`added_head`), as Hugging Face's ``from_pretrained`` starts a new ``score`` or
``classifier``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lmstack import registry
from lmstack.config import ConfigError
from lmstack.models.layers import WEIGHT_FREE_KEYS
from lmstack.runspec import RunSpec, with_special_tokens

KINDS = ("scratch", "run", "hf", "gguf")
# The sequence-classification heads' parameter names: model.decoder's and model.encoder's.
CLASSIFIER_HEADS = ("score", "classifier")


@dataclasses.dataclass(frozen=True)
class InitSource:
    """A parsed ``init.from``: ``kind`` in :data:`KINDS`, the ``path`` and an optional ``step``."""

    kind: str
    path: Path | None = None
    step: int | None = None

    def __str__(self) -> str:
        if self.kind == "scratch":
            return "scratch"
        return f"{self.path}@{self.step}" if self.step is not None else str(self.path)


def parse_init_from(value: str, key: str = "init.from") -> InitSource:
    """Resolve ``init.from`` (or another key that names weights the same way, e.g.
    ``objective.reward_model``) to an :class:`InitSource`; ConfigError naming ``key`` says
    what was expected."""
    if value in ("", "scratch"):
        return InitSource("scratch")
    text, at, step_s = value.rpartition("@") if "@" in value else (value, "", "")
    step = None
    if at:
        if not step_s.isdigit():
            raise ConfigError(f"{key}={value!r}: the part after @ must be a checkpoint step, e.g. {text}@1000")
        step = int(step_s)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{key}={value!r}: no such GGUF file")
        return InitSource("gguf", path)
    if (path / "config.json").is_file() and not RunSpec.exists(path) and (
            (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return InitSource("hf", path)
    if RunSpec.exists(path):
        return InitSource("run", path, step)
    if path.parent.name == "checkpoints" and path.name.isdigit() and RunSpec.exists(path.parent.parent):
        if step is not None:
            raise ConfigError(f"{key}={value!r}: a checkpoint directory names its step already; drop @{step}")
        return InitSource("run", path.parent.parent, int(path.name))
    raise ConfigError(
        f"{key}={value!r} is not scratch, a run's workdir (with run_spec.json), WORKDIR@STEP, "
        f"WORKDIR/checkpoints/STEP, a Hugging Face directory (config.json + model.safetensors) or a .gguf file")


@dataclasses.dataclass
class Parent:
    """What a source offers: its spec (tokenizer, reserved ids, model config) and a loader
    ``load_params(abstract_params) -> params`` for the parent's own parameter layout."""

    spec: RunSpec
    load_params: Callable[[Any], Any]


def open_parent(source: InitSource, key: str = "init.from") -> Parent:
    """The parent behind ``source`` (not ``scratch``); FileNotFoundError naming ``key`` for a
    step the run has no checkpoint of."""
    from lmstack.checkpoint import has_checkpoint, restore_params

    if source.kind == "run":
        spec = RunSpec.load(source.path)
        if not has_checkpoint(source.path) and source.step is None:
            # a workdir made by `lmstack import` (or not trained yet): its weights are its own init.from's
            from lmstack.config import load_saved_config

            grand = parse_init_from(load_saved_config(source.path).init["from"])
            if grand.kind != "scratch":
                return Parent(spec, open_parent(grand).load_params)
        if source.step is not None and not (source.path / "checkpoints" / str(source.step)).is_dir():
            have = sorted(int(p.name) for p in (source.path / "checkpoints").glob("*") if p.name.isdigit())
            raise FileNotFoundError(f"{key}: no checkpoint for step {source.step} in {source.path / 'checkpoints'} "
                                    f"(have: {', '.join(map(str, have)) or 'none'}): pass WORKDIR@STEP with one of those")
        return Parent(spec, lambda abstract_params: restore_params(source.path, source.step, abstract_params))
    if source.kind == "hf":
        from lmstack.interop.open_weights import open_hf

        return open_hf(source.path)
    if source.kind == "gguf":
        from lmstack.interop.open_weights import open_gguf

        return open_gguf(source.path)
    raise AssertionError(source.kind)


def inherit(cfg: Any, parent: RunSpec, source: InitSource, special_tokens: tuple[str, ...]) -> RunSpec:
    """The child's spec: the parent's tokenizer, reserved ids and architecture, with the child's
    weight-free model settings and its objective's reserved names added (appended ids).

    A ``config.model`` value that differs from both the family's default and the parent's value
    contradicts the parent: ConfigError naming both."""
    pm = parent.model
    if cfg.model.name != pm["name"]:
        raise ConfigError(f"model.name={cfg.model.name!r} contradicts the parent's {pm['name']!r} "
                          f"(init.from={source}): set --config.model.name={pm['name']}")
    defaults = registry.lookup("model", pm["name"]).config_defaults
    model = {**defaults, **pm}
    clashes = []
    for key, value in cfg.model.items():
        if key == "name":
            continue
        if key in WEIGHT_FREE_KEYS or (key == "num_labels" and not model.get(key)):  # a new head on a headless parent
            model[key] = value
        elif value != defaults.get(key) and value != model.get(key) and not (key in ("vocab_size", "max_seq_len")
                                                                             and value == 0):
            clashes.append((key, value, model.get(key)))
    if clashes:
        said = ", ".join(f"model.{k}={v!r} contradicts the parent's {p!r}" for k, v, p in clashes)
        fix = " ".join(f"--config.model.{k}={p}" for k, _, p in clashes)
        raise ConfigError(f"{said} (init.from={source}): a run started from another keeps its architecture: drop "
                          f"the setting{'s' if len(clashes) > 1 else ''}, or match the parent with {fix}")
    lineage = {"from": str(source), "kind": source.kind, "parent_lineage": parent.lineage}
    spec = RunSpec(tokenizer=parent.tokenizer, special_ids=dict(parent.special_ids), model=model, lineage=lineage)
    return with_special_tokens(spec, special_tokens)


def added_head(parent_model: dict[str, Any], child_model: dict[str, Any]) -> Callable[[tuple, Any], bool]:
    """The nnx filter of the parameters the child has and its parent lacks: the classification
    head (``score`` / ``classifier``) when the child's spec sets ``num_labels`` and the parent's
    does not; they keep their initial values. Matches nothing otherwise."""
    new = bool(child_model.get("num_labels")) and not parent_model.get("num_labels")
    return lambda path, _: new and str(path[0]) in CLASSIFIER_HEADS


def resize_vocab(params: Any, abstract_params: Any) -> Any:
    """``params`` grown to the shapes of ``abstract_params`` along the axes that differ (the
    vocabulary axis of the embedding and output tables), placed in its shardings.

    New rows are the mean of the existing ones, as Hugging Face's
    ``resize_token_embeddings(mean_resizing=True)`` centres them (it samples around the mean;
    the mean itself keeps the model's outputs for existing tokens unchanged and gives a new
    token the average embedding, so it starts neither dominant nor ignored)."""

    def grow(x: jax.Array, target: jax.ShapeDtypeStruct) -> jax.Array:
        if x.shape == target.shape:
            return x
        axes = [i for i, (a, b) in enumerate(zip(x.shape, target.shape)) if a != b]
        if len(axes) != 1 or x.shape[axes[0]] > target.shape[axes[0]]:
            raise ConfigError(f"init.from: a parameter of shape {x.shape} cannot grow to {target.shape}: "
                              f"only the vocabulary axis may grow")
        ax = axes[0]
        extra = target.shape[ax] - x.shape[ax]
        fill = jnp.broadcast_to(jnp.mean(x, axis=ax, keepdims=True), x.shape[:ax] + (extra,) + x.shape[ax + 1:])
        grown = jax.jit(lambda a, f: jnp.concatenate([a, f], axis=ax), out_shardings=target.sharding)
        return grown(x, fill.astype(x.dtype))

    return jax.tree.map(grow, params, abstract_params)


def with_shapes(abstract_params: Any, parent_vocab: int, child_vocab: int) -> Any:
    """``abstract_params`` with the child's vocabulary axes shrunk back to the parent's size, so
    the parent's tensors load into them before :func:`resize_vocab`."""
    if parent_vocab == child_vocab:
        return abstract_params

    def shrink(v: nnx.Variable) -> nnx.Variable:
        names = v.get_metadata().get("out_sharding") or ()
        s = v.get_value()
        shape = tuple(parent_vocab if n == "vocab" else d for n, d in zip(names, s.shape))
        return v.replace(jax.ShapeDtypeStruct(shape, s.dtype, sharding=s.sharding))

    return jax.tree.map(shrink, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
