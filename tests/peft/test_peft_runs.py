"""PEFT runs through the trainer: LoRA and QLoRA started from another run, adapter-only
checkpoints whose size is the formula's, resume, PEFT-layout export and import back, and
export of the merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack.config import compose
from lmstack.interop.peft_export import load_peft_adapter, peft_section
from lmstack.interop.workdirs import export_workdir
from lmstack.peft.lora import projections
from lmstack.peft.nf4 import dequantize_nf4
from lmstack.run import Run
from lmstack.sample import open_for_generation
from lmstack.train import train
from lmstack.trainstate import build_model_factory
from tests.helpers import TEXT, text_config as config

pytestmark = pytest.mark.interop  # safetensors
TOKENS = np.random.default_rng(0).integers(0, 200, (2, 12)).astype(np.int32)


def peft_config(data, parent, **peft):
    cfg = config(data, steps=3)
    cfg.init["from"] = str(parent)
    cfg.peft.update({"name": "lora", "r": 4, "target_modules": "q,v", **peft})
    cfg.optimizer.lr = 1e-2
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    data = root / "corpus.txt"
    data.write_text(TEXT)
    train(config(data), root / "parent")
    train(peft_config(data, root / "parent"), root / "lora")
    return root, data


def logits(workdir: Path) -> np.ndarray:
    _, model = open_for_generation(workdir)
    return np.asarray(model(jax.numpy.asarray(TOKENS)))


def test_lora_child_keeps_the_parent_base_and_checkpoints_only_the_adapters(runs):
    root, _ = runs
    parent = jax.device_get(Run.open(root / "parent").restore()["params"])
    child_run = Run.open(root / "lora")
    child = jax.device_get(child_run.restore())
    for path in (("embed",), ("blocks", "attn", "q", "weight"), ("blocks", "mlp", "down", "weight")):
        a, b = parent, child["frozen"]
        for k in path:
            a, b = a[k], b[k]
        np.testing.assert_array_equal(np.asarray(b[...]), np.asarray(a[...]))
    adapters = sum(x.size for x in jax.tree.leaves(child["params"]))
    c = child_run.model_cfg  # q: d -> n*h, v: d -> k*h, rank 4, every layer
    assert adapters == c.n_layers * 4 * ((c.d_model + c.n_heads * c.head_dim) + (c.d_model + c.n_kv_heads * c.head_dim))
    saved = sum(f.stat().st_size for f in (root / "lora" / "checkpoints" / "3" / "state").rglob("*") if f.is_file())
    base = sum(x.size for x in jax.tree.leaves(child["frozen"])) * 4
    print(f"adapter checkpoint: {saved} bytes on disk; adapters + 2 Adam moments in float32: {3 * adapters * 4}; "
          f"the frozen base alone: {base}")
    assert saved < base / 2


def test_a_lora_run_resumes_from_an_adapter_only_checkpoint_with_the_same_losses(runs, tmp_path):
    root, data = runs
    work = tmp_path / "w"
    shutil.copytree(root / "lora", work)
    shutil.rmtree(work / "checkpoints" / "3")  # as if killed after saving step 2
    rows = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 2))
    train(peft_config(data, root / "parent"), work)
    loss = lambda w: {r["step"]: r["train/loss"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())  # noqa: E731
                      if "train/loss" in r}
    assert loss(work) == loss(root / "lora") and 3 in loss(work)


def test_peft_export_has_peft_keys_and_imports_back_to_the_same_logits(runs, tmp_path):
    root, _ = runs
    out = export_workdir(root / "lora", "peft", tmp_path / "adapter")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 16.0
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    run = Run.open(root / "lora")
    c = run.model_cfg
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert a.shape == (4, c.d_model) and b.shape == (c.n_kv_heads * c.head_dim, 4)  # A [r, in], B [out, r]
    assert len(tensors) == 2 * 2 * c.n_layers

    # a fresh model with the adapter's settings, the parent's base, the file's factors
    section = compose(run.cfg).peft
    with section.unlocked():
        section.update(peft_section(out))
    make, _ = build_model_factory(run.spec.model_section(), vocab_size=run.spec.vocab_size,
                                  max_seq_len=run.cfg.data.seq_len, seed=123, peft_section=section)
    model = make()
    base = Run.open(root / "parent").restore()["params"]
    nnx.update(model, base)
    assert load_peft_adapter(model, c, out) == 2 * 2 * c.n_layers
    np.testing.assert_allclose(np.asarray(model(jax.numpy.asarray(TOKENS))), logits(root / "lora"), atol=1e-5)


def test_hf_export_of_a_lora_run_is_the_merged_model(runs, tmp_path):
    root, _ = runs
    from lmstack.interop.hf import load_hf_params

    out = export_workdir(root / "lora", "hf", tmp_path / "merged")
    run = Run.open(root / "parent")
    model = run.model(run.restore())
    nnx.update(model, load_hf_params(out, run.abstract["params"]))
    np.testing.assert_allclose(np.asarray(model(jax.numpy.asarray(TOKENS))), logits(root / "lora"), atol=1e-4)


def test_qlora_child_quantises_the_parent_base_once(runs, tmp_path):
    root, data = runs
    run, _ = Run.for_training(peft_config(data, root / "parent", name="qlora"), tmp_path / "q")
    state = run.init_state()
    parent = jax.device_get(Run.open(root / "parent").restore()["params"])
    w = parent["blocks"]["mlp"]["up"]["weight"][...]
    q = state["frozen"]["blocks"]["mlp"]["up"]["weight"].get_value()
    err = np.abs(np.asarray(dequantize_nf4(q, np.float32)) - w)
    blocks = np.abs(w.reshape(w.shape[0], -1, 64)).max(-1)  # per-block absmax, 64 consecutive elements
    assert err.max() <= 0.5 * (1 - 0.6961928009986877) * blocks.max() + 1e-7  # the widest NF4 gap, halved
    assert sum(1 for _, p in projections(run.model(state)) if p.lora_a is not None) == 2


@pytest.mark.parametrize("init", ["text", "sample_vocab"])
def test_prompt_tuning_starts_from_rows_of_the_parents_embedding_table(runs, tmp_path, init):
    """``text``: the text's tokens, repeated to num_virtual_tokens (PEFT's TEXT init);
    ``sample_vocab``: rows drawn from the table init.from loaded, not from the random one."""
    root, data = runs
    cfg = config(data, steps=3)
    cfg.init["from"] = str(root / "parent")
    cfg.peft.update(name="prompt_tuning", num_virtual_tokens=7, prompt_tuning_init=init,
                    prompt_tuning_init_text="Say:" if init == "text" else "")
    run, _ = Run.for_training(compose(cfg), tmp_path / "prompt")
    state = run.starting_state()
    prompt = np.asarray(state["params"]["soft_prompt"].get_value())
    table = np.asarray(nnx.merge_state(state["params"], state["frozen"])["embed"].get_value())
    _, parent = open_for_generation(root / "parent")
    np.testing.assert_array_equal(table, np.asarray(parent.embed[...]))  # the parent's table
    if init == "text":
        ids = run.spec.tokenizer.encode("Say:")
        np.testing.assert_array_equal(prompt, table[(ids * 2)[:7]])
    else:
        assert all((table == row).all(axis=1).any() for row in prompt)
