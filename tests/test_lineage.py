"""Run lineage: init.from another run (latest, @STEP, a checkpoint directory), what a child
inherits (tokenizer, reserved ids, architecture), contradictions, vocabulary growth, and the
resume checks on a workdir's data and config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from lmstack import registry
from lmstack.config import ConfigError, save_config
from lmstack.init_from import parse_init_from, resize_vocab
from lmstack.objectives.causal_lm import CausalLM
from lmstack.run import Run
from lmstack.runspec import RunSpec, with_special_tokens
from lmstack.train import train
from tests.helpers import TEXT, text_config as config


@registry.register("objective.test_chat_lm")
class ChatLM(CausalLM):
    """Causal LM that reserves two chat markers, as an SFT objective would."""

    @classmethod
    def special_tokens(cls, cfg):
        return ("<|im_start|>", "<|im_end|>")


@registry.register("eval.test_count", config_defaults={"scale": 1.0})
def count_batches(ctx):
    """Yields the number of held-out batches times ``scale``: an evaluator that is not perplexity."""
    yield "batches", ctx.cfg.eval.test_count.scale * len(ctx.batches)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("lineage")
    data = root / "corpus.txt"
    data.write_text(TEXT)
    train(config(data), root / "parent")
    return root / "parent", data


def params_of(workdir: Path, step: int | None = None):
    return jax.device_get(Run.open(workdir).restore(step)["params"])


def child_init(cfg, workdir: Path):
    run, _ = Run.for_training(cfg, workdir)
    return run, jax.device_get(run.init_state()["params"])


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_child_starts_from_the_parents_weights_and_inherits_its_spec(parent, tmp_path):
    pdir, data = parent
    cfg = config(data)
    cfg.init["from"] = str(pdir)
    cfg.model.dropout, cfg.model.scan_unroll = 0.1, 2  # weight-free settings may differ
    run, params = child_init(cfg, tmp_path / "child")
    assert_trees_equal(params, params_of(pdir))
    spec = RunSpec.load(tmp_path / "child")
    assert spec.tokenizer.identity == RunSpec.load(pdir).tokenizer.identity
    assert spec.model["dropout"] == 0.1 and spec.lineage["from"] == str(pdir)
    opt_leaves = jax.tree.leaves(jax.device_get(run.init_state()["opt_state"]))
    assert opt_leaves and all(not np.any(x) for x in opt_leaves)  # a fresh optimizer: zero moments and count


def test_init_from_a_given_step_or_checkpoint_directory(parent, tmp_path):
    pdir, data = parent
    step1 = params_of(pdir, 1)
    for i, source in enumerate([f"{pdir}@1", str(pdir / "checkpoints" / "1")]):
        cfg = config(data)
        cfg.init["from"] = source
        assert_trees_equal(child_init(cfg, tmp_path / f"c{i}")[1], step1)
    with pytest.raises(FileNotFoundError, match=r"init.from: no checkpoint for step 7 in .* \(have: 1, 2\)"):
        cfg = config(data)
        cfg.init["from"] = f"{pdir}@7"
        child_init(cfg, tmp_path / "c7")


def test_a_setting_that_contradicts_the_parent_is_an_error(parent, tmp_path):
    pdir, data = parent
    cfg = config(data)
    cfg.init["from"] = str(pdir)
    cfg.model.d_model = 32
    with pytest.raises(ConfigError) as e:
        Run.for_training(cfg, tmp_path / "child")
    assert str(e.value) == (f"model.d_model=32 contradicts the parent's 64 (init.from={pdir}): a run started from "
                            f"another keeps its architecture: drop the setting, or match the parent with "
                            f"--config.model.d_model=64")
    assert not (tmp_path / "child").exists()  # nothing written


def test_init_from_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"init.from='nowhere' is not scratch, a run's workdir"):
        parse_init_from("nowhere")
    with pytest.raises(ConfigError, match="the part after @ must be a checkpoint step"):
        parse_init_from(f"{tmp_path}@latest")
    assert parse_init_from("scratch").kind == "scratch"


def test_new_special_tokens_grow_the_vocabulary_with_mean_rows(parent, tmp_path):
    pdir, data = parent
    cfg = config(data)
    cfg.init["from"] = str(pdir)
    cfg.objective.name = "test_chat_lm"
    run, params = child_init(cfg, tmp_path / "child")
    old = params_of(pdir)
    v = RunSpec.load(pdir).vocab_size
    assert run.spec.special_ids == {"<|im_start|>": v, "<|im_end|>": v + 1}
    assert run.spec.vocab_size == v + 2
    embed, old_embed = params["embed"], old["embed"]
    np.testing.assert_array_equal(embed[:v], old_embed)
    mean = old_embed.astype(np.float64).mean(0)  # float32 sums in another order differ by ~1e-10
    np.testing.assert_allclose(embed[v:], np.broadcast_to(mean, (2, len(mean))), rtol=0, atol=1e-8)
    assert_trees_equal(params["blocks"], old["blocks"])


def test_resize_vocab_and_with_special_tokens_directly():
    spec = RunSpec(tokenizer=None, special_ids={"[MASK]": 9}, model={"vocab_size": 10})
    grown = with_special_tokens(spec, ["[MASK]", "<a>", "<b>"])
    assert grown.special_ids == {"[MASK]": 9, "<a>": 10, "<b>": 11} and grown.vocab_size == 12
    x = jax.numpy.arange(6.0).reshape(3, 2)
    target = jax.ShapeDtypeStruct((5, 2), x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    out = np.asarray(resize_vocab({"w": x}, {"w": target})["w"])
    np.testing.assert_array_equal(out, [[0, 1], [2, 3], [4, 5], [2, 3], [2, 3]])


def test_resume_on_changed_data_is_refused_unless_accepted(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    workdir = tmp_path / "run"
    train(config(data), workdir)
    shutil.rmtree(workdir / "checkpoints" / "2")  # as if interrupted before its last checkpoint
    data.write_text(TEXT + TEXT[:500])
    with pytest.raises(ConfigError) as e:
        train(config(data), workdir)
    assert str(e.value).startswith(f"the data of 'text' (data.path={str(data)!r}) changed since the run in "
                                   f"{str(workdir)!r} started")
    assert "--accept-changed-data" in str(e.value)
    summary = train(config(data), workdir, accept_changed_data=True)
    assert summary["start_step"] == 1 and summary["step"] == 2


def test_a_workdir_without_a_checkpoint_is_never_locked(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    workdir = tmp_path / "run"
    other = config(data)
    other.optimizer.lr = 0.5  # as if an earlier run with another config had failed before its first checkpoint
    save_config(other, workdir)
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    summary = train(config(data, steps=1), workdir)
    assert summary["step"] == 1
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["lr"] == 3e-3


def test_final_report_shows_whatever_the_evaluators_return(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT)
    cfg = config(data, steps=1)
    cfg.eval.names = ("test_count",)
    cfg.eval.test_count = {"scale": 2.0}
    summary = train(cfg, tmp_path / "run")
    assert summary["eval"] == {"test_count/batches": 2.0}
