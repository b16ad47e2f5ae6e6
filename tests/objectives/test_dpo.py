"""objective.dpo on the trainer: at the start (policy = reference) sigmoid DPO is ln 2 and KTO
0.5, for a full fine-tune (a frozen copy) and a LoRA run (adapters
disabled); the two references give the same loss when the policies are the same function; the
loss equals the published formula on numpy log-probs of the completion tokens; a tiny model
learns the preferred reply from scratch (held-out implicit-reward accuracy)."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack.checkpoint import Checkpointer
from lmstack.config import compose
from lmstack.configs.base import base_config
from lmstack.objectives.dpo import DPO
from lmstack.peft.lora import merge_lora
from lmstack.run import Run
from lmstack.train import train
from tests.objectives.test_reward_model import separable_pairs


def dpo_config(path, loss_type="sigmoid", peft="none", source="preference", **objective):
    c = base_config()
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, init_std=0.2)
    c.data.update(source=source, path=str(path), seq_len=96, val_fraction=0.2)
    c.data.tokenizer.kind = "byte"
    c.objective.name = "dpo"
    c.peft.name = peft
    c.eval.names = ("perplexity", "pair_accuracy") if loss_type != "kto" else ("perplexity",)
    c = compose(c)
    c.objective.update(chat_template="chatml", loss_type=loss_type, **objective)
    c.train.update(steps=16, batch_size=8, progress=False, log_every=4)
    c.optimizer.update(lr=3e-3, warmup_steps=2, weight_decay=0.0)
    c.eval.update(every=0, batches=0)
    c.checkpoint.update(every=1000, async_save=False)
    c.sample.max_new_tokens = 2
    c.log.tensorboard = False
    c.mesh.data = 1
    return c


def unpaired(path, n=40):
    rows = [{"messages": [{"role": "user", "content": f"Rate {i}"},
                          {"role": "assistant", "content": "good :)" if i % 2 else "bad :("}], "label": bool(i % 2)}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A saved run the DPO runs start from (init.from): the same tiny decoder, its weights saved."""
    tmp = tmp_path_factory.mktemp("dpo")
    pairs = separable_pairs(tmp / "pairs.jsonl", n=40)
    cfg = dpo_config(pairs)
    run, _ = Run.for_training(cfg, tmp / "parent")
    ckpt = Checkpointer(tmp / "parent")
    ckpt.save(1, run.starting_state(), None, run.cfg.to_dict())
    ckpt.close()
    return tmp, pairs


def assemble(cfg, workdir, perturb=False):
    """(run, its starting state (the LoRA factors moved off their initial values when
    ``perturb``, so the policy differs from the base), the first training batch)."""
    run, data = Run.for_training(cfg, workdir)
    state = run.starting_state()
    if perturb:
        keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(state["params"]))))
        state = {**state, "params": jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype),
                                                 state["params"])}
    return run, state, next(run.objective.train_batches(data))


def mean_loss(objective, run, state, batch):
    loss, aux = jax.jit(lambda st, b: objective.loss_fn(run.model(st), b, None))(state, batch)
    return float(loss / aux["weight"])


@pytest.fixture(scope="module")
def runs(parent):
    """A LoRA run and a full fine-tune, both from the parent."""
    tmp, pairs = parent
    out = {}
    for peft in ("lora", "none"):
        cfg = dpo_config(pairs, peft=peft)
        cfg.init["from"] = str(tmp / "parent")
        out[peft] = assemble(cfg, tmp / f"run-{peft}")
    return out


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_policy_equal_to_reference_at_the_start(runs, peft):
    """Sigmoid DPO is ln 2 when the policy is its reference: a frozen copy of the parent's
    weights (full fine-tune) or the parent with the adapters disabled (LoRA, B = 0)."""
    run, state, batch = runs[peft]
    assert ("reference" in state["frozen"]) == (peft == "none")  # a copy only without adapters
    assert mean_loss(run.objective, run, state, batch) == pytest.approx(math.log(2), rel=1e-6)


def test_kto_at_the_start_is_one_half(tmp_path):
    run, state, batch = assemble(dpo_config(unpaired(tmp_path / "kto.json"), "kto", source="kto"), tmp_path / "run")
    assert mean_loss(run.objective, run, state, batch) == pytest.approx(0.5, rel=1e-6)


def test_disabled_adapters_and_the_frozen_copy_give_the_same_loss(runs):
    """A LoRA policy (reference: its adapters disabled) and a full fine-tune holding the same
    weights merged (reference: the frozen copy of the parent's) compute the same loss."""
    lora_run, lora_state, batch = runs["lora"]
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(lora_state["params"]))))
    lora_state = {**lora_state, "params": jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), lora_state["params"])}
    lora_loss = mean_loss(lora_run.objective, lora_run, lora_state, batch)
    assert abs(lora_loss - math.log(2)) > 1e-3  # the adapters moved the policy

    merged = lora_run.model(lora_state)
    assert merge_lora(merged) > 0  # the LoRA policy as plain weights
    weights = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
    full_run, full_state, _ = runs["none"]
    params = nnx.from_flat_state([(p, v.replace(weights[p])) for p, v in nnx.to_flat_state(full_state["params"])])
    full_loss = mean_loss(full_run.objective, full_run, {**full_state, "params": params}, batch)
    assert full_loss == pytest.approx(lora_loss, rel=1e-5)


def _numpy_logps(logits, tokens, mask):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0]
    return (picked * np.asarray(mask)).sum(-1), np.asarray(mask).sum(-1)


def test_loss_is_the_formula_on_completion_log_probs(parent):
    """Sigmoid DPO, SimPO and ORPO of the step from numpy log-softmaxes of the policy's and the
    reference's logits, summed over the completion mask only (the prompt carries none)."""
    tmp, pairs = parent
    cfg = dpo_config(pairs, peft="lora")
    cfg.init["from"] = str(tmp / "parent")
    run, state, batch = assemble(cfg, tmp / "formula", perturb=True)
    model = run.model(state)
    beta = cfg.objective.beta
    forward = nnx.jit(lambda m_, t, p, s: m_(t, positions=p, segment_ids=s))

    def logps(m, name):
        logits = forward(m, batch[f"{name}_tokens"][:, :-1], batch[f"{name}_positions"][:, :-1],
                         batch[f"{name}_segment_ids"][:, :-1])
        return _numpy_logps(logits, batch[f"{name}_tokens"][:, 1:], batch[f"{name}_mask"][:, 1:])

    (pc, lc), (pr, lr) = logps(model, "chosen"), logps(model, "rejected")
    assert (lc > 0).all() and (lc < (np.asarray(batch["chosen_segment_ids"]).sum(1) - 1)).all()  # prompt unmasked
    base = run.objective.reference.model(model)
    (rc, _), (rr, _) = logps(base, "chosen"), logps(base, "rejected")
    ac, ar = pc / lc, pr / lr
    log_odds = (ac - ar) - (np.log1p(-np.exp(ac)) - np.log1p(-np.exp(ar)))
    want = {"sigmoid": np.mean(np.log1p(np.exp(-beta * ((pc - rc) - (pr - rr))))),
            "simpo": np.mean(np.log1p(np.exp(-(beta * (ac - ar) - 0.5)))),
            "orpo": np.mean(-ac + beta * np.log1p(np.exp(-log_odds)))}
    for loss_type, value in want.items():
        c = cfg.copy_and_resolve_references()
        c.objective.update(loss_type=loss_type, gamma=0.5 if loss_type == "simpo" else 0.0)
        assert mean_loss(DPO(c), run, state, batch) == pytest.approx(value, rel=1e-4), loss_type
    c = cfg.copy_and_resolve_references()
    c.objective.loss_chunk = 24  # the logits 24 positions at a time (95 is no multiple of it): the same loss
    assert mean_loss(DPO(c), run, state, batch) == pytest.approx(want["sigmoid"], rel=1e-4)


def test_kto_logs_trls_metrics_of_its_completion_log_probs(tmp_path):
    """KTO's aux from numpy log-softmaxes of the policy's and the reference's logits (LoRA
    moved off the base): the desirable and undesirable rows' summed rewards ``beta (log pi -
    log pi_ref)``, their counts and the reference point z = max(0, mean log-ratio), a padding
    row (segment 0) left out of all of them; ``kl`` comes back times the weight, so the
    trainer's division by the weight logs z."""
    cfg = dpo_config(unpaired(tmp_path / "kto.json"), "kto", peft="lora", source="kto", beta=0.5)
    run, state, batch = assemble(cfg, tmp_path / "run", perturb=True)
    batch = dict(batch)
    batch["completion_segment_ids"] = np.array(batch["completion_segment_ids"])
    batch["completion_segment_ids"][-1] = 0  # the last row: padding
    model = run.model(state)
    forward = nnx.jit(lambda m_, t, p, s: m_(t, positions=p, segment_ids=s))

    def logps(m):
        logits = forward(m, batch["completion_tokens"][:, :-1], batch["completion_positions"][:, :-1],
                         batch["completion_segment_ids"][:, :-1])
        return _numpy_logps(logits, batch["completion_tokens"][:, 1:], batch["completion_mask"][:, 1:])[0]

    ratio = logps(model) - logps(run.objective.reference.model(model))
    valid = np.arange(len(ratio)) < len(ratio) - 1
    desirable = np.asarray(batch["desirable"]) > 0
    assert desirable[valid].any() and (~desirable[valid]).any()
    _, aux = jax.jit(lambda st, b: run.objective.loss_fn(run.model(st), b, None))(state, batch)
    w = valid.sum()
    assert float(aux["weight"]) == w
    z = max(0.0, ratio[valid].mean())
    np.testing.assert_allclose(float(aux["kl"]) / w, z, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(aux["rewards/chosen_sum"]), 0.5 * ratio[valid & desirable].sum(), rtol=1e-4)
    np.testing.assert_allclose(float(aux["rewards/rejected_sum"]), 0.5 * ratio[valid & ~desirable].sum(), rtol=1e-4)
    assert float(aux["count/chosen"]) == (valid & desirable).sum()
    assert float(aux["count/rejected"]) == (valid & ~desirable).sum()


def test_a_tiny_model_learns_the_preferred_reply(tmp_path):
    """From scratch (the reference is the random initialisation): held-out implicit-reward
    accuracy over 0.9 after 16 steps of 8 pairs; the loss falls from ln 2."""
    summary = train(dpo_config(separable_pairs(tmp_path / "pairs.jsonl", n=80)), tmp_path / "run")
    ev = summary["eval"]
    assert ev["pair_accuracy/accuracy"] > 0.9 and ev["pair_accuracy/margin"] > 0
    assert ev["loss"] < math.log(2) - 0.05
    assert ev["rewards/accuracies"] == pytest.approx(ev["pair_accuracy/accuracy"], abs=1e-6)
