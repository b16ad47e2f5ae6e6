"""The run: one object that train, eval, sample, chat, export and the tools assemble from
``(config, workdir)``.

A :class:`Run` holds the mesh, the run spec (tokenizer, reserved ids, resolved model
config), the model factory and its config, the optimizer, the train-state layout and its
shardings, and the objective. Training fills the workdir (``config.json``,
``run_spec.json``, ``tokenizer/``, ``checkpoints/``, ``metrics.jsonl``, ``tb/``); every
other command reads only from it (:meth:`Run.open`).

Nothing is written before the whole run is assembled and checked: a bad option, a bad
``init.from`` or a mesh that does not fit fails first, and a workdir that holds no
checkpoint is never locked to an earlier config.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections as mlc
import optax
from flax import nnx
from jax.sharding import Mesh

from lmstack import registry
from lmstack.checkpoint import Checkpointer, has_checkpoint
from lmstack.cpu_defaults import keep_freed_memory
from lmstack.config import ConfigError, check_resume, compose, load_saved_config, save_config
from lmstack.data.formats import load_records, split_records
from lmstack.data.pipeline import TokenStream, examples_stream, split_stream, tokenize_documents
from lmstack.data.sources import load_documents
from lmstack.data.tokenizers import Tokenizer, build_tokenizer
from lmstack.distributed import is_primary, process_rows
from lmstack.forgetting.parent import parent_streams
from lmstack.init_from import (InitSource, added_head, inherit, open_parent, parse_init_from, resize_vocab,
                                with_shapes)
from lmstack.models.attention_core import attention_platform_problem
from lmstack.optim import make_optimizer
from lmstack.runspec import RunSpec, fresh_spec, stream_digest
from lmstack.sharding import MeshError, batch_sharding, data_parallel_size, make_mesh, replicated
from lmstack.step import compile_eval_step, compile_train_step, flat_allreduce_pays
from lmstack.peft.base import check_trainable, trainable_filter
from lmstack.trainstate import abstract_state, build_model_factory, init_state, peft_method


@dataclasses.dataclass
class RunData:
    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream
    train_rows: slice | None = None  # this process's rows of each training batch (None: all)
    # Objectives that read records (those with an ``encode_records`` classmethod, e.g.
    # objective.sft) get each split's encoded examples; train and val then hold the examples'
    # tokens back to back, so the data digest, token counts and samples see what the model reads.
    train_examples: list[dict] | None = None
    val_examples: list[dict] | None = None
    notes: tuple[str, ...] = ()  # lines for the run's printout (e.g. truncation counts)
    replay: TokenStream | None = None  # the parent's training split, for replay.fraction > 0


def check_batch(batch_size: int, mesh: Mesh, key: str, microbatches: int = 1) -> None:
    """Each (micro)batch of ``key`` must split evenly over the data-parallel devices."""
    dp = data_parallel_size(mesh)
    micro = batch_size // microbatches
    if micro % dp == 0:
        return
    need = dp * microbatches
    what = f"{key}={batch_size}" if microbatches == 1 else (
        f"the microbatch size {micro} ({key}={batch_size} / train.microbatches={microbatches})")
    fix = f"set --config.{key} to a multiple of {need} (e.g. {-(-batch_size // need) * need})"
    if microbatches > 1:
        fix += ", lower --config.train.microbatches,"
    raise MeshError(
        f"{what} is not divisible by the data-parallel size {dp} "
        f"(mesh.data={mesh.shape['data']} x mesh.fsdp={mesh.shape['fsdp']}): {fix} "
        f"or change --config.mesh.data / --config.mesh.fsdp"
    )


def build_mesh(cfg: mlc.ConfigDict) -> Mesh:
    mesh = make_mesh(cfg.mesh)
    check_batch(cfg.train.batch_size, mesh, "train.batch_size", cfg.train.microbatches)
    if cfg.eval.batch_size:  # 0 takes train.batch_size, checked above
        check_batch(cfg.eval.batch_size, mesh, "eval.batch_size")
    return mesh


def tokenize(documents: list[str], tokenizer: Tokenizer, cfg: mlc.ConfigDict) -> RunData:
    objective = registry.lookup("objective", cfg.objective.name, "objective.name")
    if hasattr(objective, "encode_records"):
        return encode_records(objective, tokenizer, cfg)
    train, val = split_stream(tokenize_documents(documents, tokenizer), cfg.data.val_fraction,
                              seq_len=cfg.data.seq_len)
    return RunData(tokenizer, train, val)


def encode_records(objective: Any, tokenizer: Tokenizer, cfg: mlc.ConfigDict) -> RunData:
    """The records of the data format ``data.source`` (the first ``data.max_records`` of
    them when set), split into held-out records from ``data.val_path`` or a seeded
    ``data.val_fraction`` of them, and encoded by the objective's ``encode_records(cfg,
    tokenizer, records, split) -> (examples, printout lines)``."""
    records = load_records(cfg.data)
    if cfg.data.max_records:
        records = records[:cfg.data.max_records]
    if cfg.data.val_path:
        train, val = records, load_records(cfg.data, key="data.val_path")
    else:
        train, val = split_records(records, cfg.data.val_fraction, cfg.data.seed)
    train_examples, train_notes = objective.encode_records(cfg, tokenizer, train, "train")
    val_examples, val_notes = objective.encode_records(cfg, tokenizer, val, "val")
    return RunData(tokenizer, examples_stream(train_examples, "train"), examples_stream(val_examples, "val"),
                   train_examples=train_examples, val_examples=val_examples, notes=(*train_notes, *val_notes))


class Run:
    """A run assembled from its config and spec on a mesh (see the module docstring)."""

    def __init__(self, cfg: mlc.ConfigDict, workdir: str | Path, spec: RunSpec, mesh: Mesh):
        self.cfg, self.workdir, self.spec, self.mesh = cfg, Path(workdir), spec, mesh
        problem = attention_platform_problem(spec.model.get("attention_impl", "xla_einsum"),
                                             mesh.devices.flat[0].platform)
        if problem:
            raise ConfigError(problem)
        if mesh.devices.flat[0].platform == "cpu":
            keep_freed_memory()  # steps reuse the memory earlier steps freed: lmstack/cpu_defaults.py
        self.model_cls = registry.lookup("model", spec.model["name"], "model.name")
        self.make_model, self.model_cfg = build_model_factory(spec.model_section(), vocab_size=spec.vocab_size,
                                                              max_seq_len=cfg.data.seq_len, seed=cfg.train.seed,
                                                              peft_section=cfg.peft)
        self.make_base_model = build_model_factory(spec.model_section(), vocab_size=spec.vocab_size,
                                                   max_seq_len=cfg.data.seq_len, seed=cfg.train.seed)[0]
        self.peft = peft_method(cfg.peft)
        self.regularizer = registry.lookup("regularization", cfg.regularization.name, "regularization.name")
        self.objective = registry.lookup("objective", cfg.objective.name, "objective.name")(cfg, spec.special_ids)
        self.trainable = trainable_filter(cfg.train, self.peft, getattr(self.objective, "trainable_types", ()))
        # what adds to the model or fills it once the starting weights are in: the regularizer's
        # anchors, an objective's reference policy (frozen companions, lmstack.shadow) and heads,
        # a PEFT method initialised from the loaded weights; attach(model, trainable) and/or start(run, state)
        self.extras = tuple(p for p in (self.peft, self.regularizer, self.objective)
                            if hasattr(p, "attach") or hasattr(p, "start"))
        self.make_model = _with_frozen_extras(self.make_model, self.extras, self.trainable)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
        self.graphdef, self.abstract, self.shardings = abstract_state(self.make_model, self.tx, mesh, self.trainable)
        check_trainable(self.abstract, cfg.train)
        self.batch_sharding = batch_sharding(mesh)

    # --- assembling ------------------------------------------------------------------

    @classmethod
    def for_training(cls, cfg: mlc.ConfigDict, workdir: str | Path, *,
                     accept_changed_data: bool = False) -> tuple["Run", RunData]:
        """The run ``lmstack train`` resumes (a checkpoint in ``workdir``) or starts: decides the
        spec (from ``init.from`` or scratch), loads and tokenizes the data, checks a resume
        against the saved config and data, and only then writes config and spec."""
        workdir = Path(workdir)
        cfg = compose(cfg)  # a config built in code (not by load_config) gets its plug-in sections too
        mesh = build_mesh(cfg)
        source = parse_init_from(cfg.init["from"])
        resuming = has_checkpoint(workdir)
        if resuming:
            check_resume(cfg, workdir)
            spec = RunSpec.load(workdir)
        else:
            if RunSpec.exists(workdir) and RunSpec.load(workdir).lineage.get("imported"):
                raise ConfigError(f"{str(workdir)!r} holds a model made by `lmstack import`: train from it in a new "
                                  f"workdir with --config.init.from={workdir} --workdir NEW")
            spec = None
        documents = load_documents(cfg.data)
        if spec is None:
            spec = decide_spec(cfg, source, documents)
        data = tokenize(documents, spec.tokenizer, cfg)
        if cfg.replay.fraction:
            data.replay = parent_streams(cfg, spec.tokenizer)[0]
        digest = stream_digest(data.train.tokens, data.val.tokens)
        if resuming and spec.data_digest and spec.data_digest != digest and not accept_changed_data:
            raise ConfigError(
                f"the data of {cfg.data.source!r} (data.path={cfg.data.path!r}) changed since the run in "
                f"{str(workdir)!r} started (its token stream differs): the saved data position would point into "
                f"other text; restore the data, pick a new --workdir, or pass --accept-changed-data to resume anyway")
        spec = dataclasses.replace(spec, data_digest=digest)
        run = cls(cfg, workdir, spec, mesh)  # builds the layout: fails before anything is written
        if hasattr(run.objective, "check_spec"):  # an objective that reads another run (PPO's reward model)
            run.objective.check_spec(spec)
        data.train_rows = process_rows(run.batch_sharding, cfg.train.batch_size)
        if is_primary():
            workdir.mkdir(parents=True, exist_ok=True)
            spec.save(workdir)
            save_config(cfg, workdir)
        return run, data

    @classmethod
    def open(cls, workdir: str | Path, cfg: mlc.ConfigDict | None = None, mesh: Mesh | None = None) -> "Run":
        """The run saved in ``workdir`` (config and spec), for eval, sample, chat and export;
        ``cfg`` overrides the saved config (e.g. evaluator settings), ``mesh`` the mesh."""
        workdir = Path(workdir)
        cfg = load_saved_config(workdir) if cfg is None else cfg
        spec = RunSpec.load(workdir)
        return cls(cfg, workdir, spec, build_mesh(cfg) if mesh is None else mesh)

    def load_data(self) -> RunData:
        """The run's documents, tokenized with its own tokenizer (for evaluation)."""
        return tokenize(load_documents(self.cfg.data), self.spec.tokenizer, self.cfg)

    # --- state -----------------------------------------------------------------------

    def init_state(self) -> dict:
        """A fresh train state: initialised, or with the parameters of ``init.from`` (and a
        fresh optimizer), each tensor placed straight into its sharding."""
        _, state, _ = init_state(self.make_model, self.tx, self.mesh, self.trainable)
        source = parse_init_from(self.cfg.init["from"])
        if source.kind == "scratch":
            return state
        parent = open_parent(source)
        # the parent's weights: the model without this run's adapters and without the
        # classification head it adds, in float, each tensor placed where the trainable set puts
        # it (params or frozen); a quantising method (QLoRA) turns the float base into its storage
        target = abstract_state(self.make_base_model, optax.identity(), self.mesh)[1]["params"]
        target = target.filter(nnx.Not(added_head(parent.spec.model, self.spec.model)))
        with jax.set_mesh(self.mesh):
            loaded = resize_vocab(parent.load_params(with_shapes(target, parent.spec.vocab_size, self.spec.vocab_size)),
                                  target)
            whole = nnx.merge_state(state["params"], state["frozen"])
            if hasattr(self.peft, "place_base"):
                loaded = self.peft.place_base(loaded, whole)
            whole = nnx.merge_state(whole, loaded)
            state["params"] = jax.device_put(whole.filter(self.trainable), self.shardings["params"])
            state["frozen"] = jax.device_put(whole.filter(nnx.Not(self.trainable)), self.shardings["frozen"])
            state["opt_state"] = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(state["params"])
        return state

    def starting_state(self) -> dict:
        """:meth:`init_state` finished by each extra's ``start``, in order: a PEFT method's
        adapters initialised from the loaded weights (prompt tuning's rows of the embedding
        table), then the frozen companions (the regularizer's anchors and Fisher estimate, an
        objective's reference policy): the state a new training run starts from."""
        state = self.init_state()
        for extra in self.extras:
            if hasattr(extra, "start"):
                state = extra.start(self, state)
        return state

    def restore(self, step: int | None = None, data_iterator: Any | None = None) -> dict:
        """The checkpointed state at ``step`` (default: latest), and the iterator's position in place.
        A workdir without checkpoints whose weights come from ``init.from`` (one made by
        ``lmstack import``) gives the state that source starts a run with."""
        if step is None and not has_checkpoint(self.workdir) and parse_init_from(self.cfg.init["from"]).kind != "scratch":
            return self.init_state()
        ckpt = Checkpointer(self.workdir)
        try:
            return self.restore_checkpoint(ckpt, step, data_iterator)
        finally:
            ckpt.close()

    @property
    def adapters_only(self) -> bool:
        """Whether checkpoints leave out the frozen state: a PEFT run whose frozen part is the
        ``init.from`` base (and the method's fixed storage of it) rebuilds it from there, so
        a checkpoint holds the adapters, their optimizer state, the step and the data position."""
        return self.cfg.peft.name != "none" and parse_init_from(self.cfg.init["from"]).kind != "scratch"

    def checkpoint_state(self, state: dict) -> dict:
        """What a checkpoint of ``state`` saves (see :attr:`adapters_only`)."""
        return {k: v for k, v in state.items() if k != "frozen"} if self.adapters_only else state

    def restore_checkpoint(self, ckpt: Checkpointer, step: int | None, data_iterator: Any | None = None) -> dict:
        """The state saved at ``step`` (default: the latest) of ``ckpt``, the frozen base (and a
        regularizer's anchors) rebuilt from ``init.from`` when checkpoints hold the adapters only."""
        if not self.adapters_only:
            return ckpt.restore(step, self.abstract, data_iterator)
        state = ckpt.restore(step, self.checkpoint_state(self.abstract), data_iterator)
        state["frozen"] = self.starting_state()["frozen"]
        return state

    def collect(self, state: dict, batch: dict, step: int) -> tuple[dict, dict[str, float]]:
        """The objective's collect phase (e.g. rollouts for RL) on a global ``batch`` with
        ``state``'s weights, before the pure step: ``(the batch the step trains on, metrics)``.
        Its randomness depends on ``(train.seed, step)`` only, so a resumed run collects the
        same. Objectives without one get ``(batch, {})``."""
        collect = getattr(self.objective, "collect", None)
        if collect is None:
            return batch, {}
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.cfg.train.seed), step), _COLLECT_STREAM)
        return collect(self, state, batch, rng)

    def model(self, state: dict) -> nnx.Module:
        """The model with ``state``'s weights."""
        return nnx.merge(self.graphdef, state["params"], state["frozen"])

    # --- compiled steps --------------------------------------------------------------

    def train_step(self):
        """The compiled train step ``(state, batch, seed key) -> (state, metrics)``
        (:func:`lmstack.step.train_step`). On a CPU mesh that is data parallel only, for an
        objective whose loss is a sum over rows, the gradients are all-reduced as one flat
        buffer (``flat_allreduce``; the compiler's own all-reduce elsewhere)."""
        return compile_train_step(self.graphdef, self.tx, self.schedule, self.objective, self.cfg.train.microbatches,
                                  self.shardings, self.batch_sharding, frozen_layers=self.cfg.train.frozen_layers,
                                  penalty=self.regularizer.penalty(self.cfg.regularization),
                                  flat_allreduce=flat_allreduce_pays(self.mesh, self.objective))

    def seed_key(self) -> jax.Array:
        """``train.seed``'s key on every device of the mesh, all processes' (a jitted call: a
        ``device_put`` cannot reach other processes' devices); the train step folds in its number."""
        return jax.jit(lambda: jax.random.key(self.cfg.train.seed), out_shardings=replicated(self.mesh))()

    def eval_step(self):
        return compile_eval_step(self.graphdef, self.objective, self.shardings, self.batch_sharding)

    def describe(self, n_params: int, n_trainable: int, train_tokens: int) -> str:
        """The derived values printed at the start of a run."""
        cfg, seq = self.cfg, self.cfg.data.seq_len
        tokens_per_step = cfg.train.batch_size * seq
        total = tokens_per_step * cfg.train.steps
        fpt = self.model_cfg.flops_per_token(seq)
        mesh_s = " ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        lines = [
            f"lmstack {cfg.name}{':' + cfg.arg if cfg.arg else ''}: {jax.device_count()} {jax.default_backend()} "
            f"device(s), mesh {mesh_s}",
            f"  init from        {self.spec.lineage.get('from', 'scratch')}",
            f"  parameters       {n_params:,}" + ("" if n_trainable == n_params else
                                                    f" ({n_trainable:,} trainable, {n_trainable / n_params:.2%}"
                                                    f"{', peft ' + cfg.peft.name if cfg.peft.name != 'none' else ''})"),
            f"  vocabulary       {self.spec.vocab_size:,} ({self.spec.tokenizer.kind} tokenizer "
            f"{self.spec.tokenizer.vocab_size:,} + {len(self.spec.special_ids)} reserved)",
            f"  tokens per step  {tokens_per_step:,} (batch {cfg.train.batch_size} x seq {seq}"
            f"{f', {cfg.train.microbatches} microbatches' if cfg.train.microbatches > 1 else ''})",
            f"  FLOPs per token  {fpt:,.0f} (train, 6N + attention)",
            f"  total tokens     {total:,} over {cfg.train.steps:,} steps "
            f"({total / max(train_tokens, 1):.2f} epochs of {train_tokens:,} training tokens)",
            f"  total FLOPs      {fpt * total:.3g}",
        ]
        return "\n".join(lines)


_COLLECT_STREAM = 0x636F6C6C  # the collect phase's random stream, apart from the train step's (fold_in(seed, step))


def _with_frozen_extras(make_model: Any, extras: tuple, trainable: Any) -> Any:
    """``make_model`` whose models also hold the frozen companions of ``extras`` (anchors, Fisher, a reference)."""

    def make() -> nnx.Module:
        model = make_model()
        for extra in extras:
            if hasattr(extra, "attach"):
                extra.attach(model, trainable)
        return model

    return make


def decide_spec(cfg: mlc.ConfigDict, source: InitSource, documents: list[str]) -> RunSpec:
    """A new run's spec: inherited from ``init.from``, or fresh (training the tokenizer if needed)."""
    special = tuple(registry.lookup("objective", cfg.objective.name, "objective.name").special_tokens(cfg))
    if source.kind != "scratch":
        return inherit(cfg, open_parent(source).spec, source, special)
    return fresh_spec(cfg, build_tokenizer(cfg.data, documents), special)
