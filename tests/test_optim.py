"""Learning-rate schedules and weight-decay masks."""

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack.configs.base import base_config
from lmstack.models.decoder import Decoder, DecoderConfig
from lmstack.optim import learning_rate_schedule, weight_decay_mask


def reference_lr(count, *, lr, warmup, decay_steps, min_lr_ratio, schedule):
    """nanoGPT's get_lr: warmup lr * (it + 1) / (warmup + 1), then the decay to lr * min_lr_ratio."""
    if count < warmup:
        return lr * (count + 1) / (warmup + 1)
    if schedule == "constant":
        return lr
    end = lr * min_lr_ratio
    ratio = min(count - warmup, decay_steps - warmup) / (decay_steps - warmup)
    if schedule == "cosine":
        return end + 0.5 * (1.0 + np.cos(np.pi * ratio)) * (lr - end)
    return lr + ratio * (end - lr)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 100])
def test_schedule_matches_the_formula(schedule, warmup):
    opt = base_config().optimizer
    opt.lr, opt.min_lr_ratio, opt.warmup_steps, opt.schedule = 1e-3, 0.1, warmup, schedule
    f = learning_rate_schedule(opt, total_steps=2000)
    counts = np.arange(2101)
    got = np.array([float(f(c)) for c in counts])
    want = np.array([reference_lr(c, lr=1e-3, warmup=warmup, decay_steps=2000, min_lr_ratio=0.1, schedule=schedule)
                     for c in counts])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    assert got[0] > 0  # the first update moves the weights
    assert got[warmup] == pytest.approx(1e-3, rel=1e-6)  # the peak comes right after warmup
    assert (got[:warmup + 1] <= 1e-3 * (1 + 1e-6)).all()


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_mask(decay_embeddings):
    cfg = DecoderConfig(style="gpt2", vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2,
                        head_dim=8, d_ff=32, max_seq_len=8, use_bias=True, tie_embeddings=True)
    params = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mask = weight_decay_mask(params, decay_embeddings)
    flat = {"/".join(map(str, path)): bool(v) for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    matrices = {f"blocks/attn/{n}/weight/value" for n in "qkvo"} | {"blocks/mlp/up/weight/value",
                                                                 "blocks/mlp/down/weight/value"}
    tables = {"embed/value", "pos_embed/value"}
    expected = matrices | (tables if decay_embeddings else set())
    assert {k.replace("'", "").replace("[", "").replace("]", "").replace(".", "") for k in decayed} == expected
    # norms and biases are never decayed even though stacked layers make them 2-D
    assert not any(("norm" in k or "bias" in k) and v for k, v in flat.items())


NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024's quintic Newton-Schulz coefficients


def newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """modded-nanogpt's zeropower_via_newtonschulz5 in float64: G / ||G||_F, then X <- aX + (bA + cA^2)X with
    A = XX^T, on the wide orientation."""
    x = g / (np.linalg.norm(g) + 1e-8)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


@pytest.mark.parametrize("data", [1, 2])
def test_muon_first_update_matches_numpy(data):
    """One update of optimizer.name=muon: the hidden matrices move by -lr (0.2 sqrt(max(fan_in, fan_out))
    NS(g) + wd w) per layer, input axes as rows; embeddings and norms by AdamW's first step -lr g / (|g| + eps).
    On a mesh with data=2 each device orthogonalises half of every stacked matrix's layers (one sharding
    constraint per Muon parameter), with the same result."""
    from lmstack.optim import make_optimizer, muon_dimensions
    from lmstack.sharding import make_mesh

    cfg = DecoderConfig(style="llama", vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=4, d_ff=24, max_seq_len=8, tie_embeddings=True)
    params = nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    opt = base_config().optimizer
    opt.name, opt.lr, opt.warmup_steps, opt.schedule, opt.clip_norm, opt.weight_decay = "muon", 0.01, 0, "constant", 0.0, 0.1
    tx, _ = make_optimizer(opt, total_steps=10)
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    with jax.set_mesh(make_mesh({"data": data, "fsdp": 1, "tensor": 1})):
        state = tx.init(params)
        split = str(jax.make_jaxpr(tx.update)(grads, state, params)).count("sharding_constraint")
        updates, _ = jax.jit(tx.update)(grads, state, params)
    assert split == (7 if data == 2 else 0)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    flat = lambda t: dict(jax.tree_util.tree_leaves_with_path(t, is_leaf=is_var))  # noqa: E731
    got, g_all, p_all = flat(updates), flat(grads), flat(params)
    n_muon = 0
    for path, v in p_all.items():
        g, w, u = (np.asarray(x.get_value(), np.float64) for x in (g_all[path], v, got[path]))
        dims = muon_dimensions(v)
        if dims is None:
            np.testing.assert_allclose(u, -0.01 * g / (np.abs(g) + 1e-8), rtol=1e-5, atol=1e-7, err_msg=str(path))
            continue
        n_muon += 1
        rows, cols = dims.reduction_axis, dims.output_axis
        assert 0 not in rows + cols  # axis 0 is the stacked layers
        fan_in, fan_out = (int(np.prod([w.shape[a] for a in ax])) for ax in (rows, cols))
        for layer in range(w.shape[0]):
            o = np.transpose(newton_schulz(g[layer].reshape(fan_in, fan_out)).reshape(
                [w.shape[a] for a in rows + cols]), np.argsort([a - 1 for a in rows + cols]))
            want = -0.01 * (0.2 * np.sqrt(max(fan_in, fan_out)) * o + 0.1 * w[layer])
            np.testing.assert_allclose(u[layer], want, rtol=2e-3, atol=2e-5, err_msg=str(path))
            # Newton-Schulz flattens the spectrum: the update's orthogonalised part has singular
            # values in about (0.7, 1.2), not g's spread
            ours = (u[layer] / -0.01 - 0.1 * w[layer]) / (0.2 * np.sqrt(max(fan_in, fan_out)))
            s = np.linalg.svd(np.transpose(ours, [a - 1 for a in rows + cols]).reshape(fan_in, fan_out), compute_uv=False)
            assert 0.5 < s.min() and s.max() < 1.3
    assert n_muon == 7  # q, k, v, o, gate, up, down


def test_muon_state_checkpoints_and_resumes_exactly(tmp_path):
    """Muon + Adam partitions hold masked leaves in their states: a run resumed from step 2 of
    4 ends on the same weights and moments as the run that never stopped."""
    import shutil

    from lmstack.run import Run
    from lmstack.sharding import make_mesh
    from lmstack.train import train
    from tests.helpers import tiny_config

    cfg = tiny_config(steps=4, log_every=1, progress=False)
    cfg.optimizer.name = "muon"
    cfg.model.vocab_size = 264  # the byte tokenizer's 259, rounded up
    cfg.data.source, cfg.data.max_chars, cfg.data.tokenizer.kind = "stdlib", 20_000, "byte"
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 1, 1
    cfg.checkpoint.every, cfg.eval.every, cfg.eval.batches, cfg.sample.max_new_tokens = 2, 0, 1, 1
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train(cfg, whole)["step"] == 4
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert train(cfg, resumed)["start_step"] == 2
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1})
    a, b = (Run.open(w, mesh=mesh).restore() for w in (whole, resumed))
    assert int(a["step"]) == int(b["step"]) == 4
    leaves_a, leaves_b = jax.tree.leaves(a["opt_state"]), jax.tree.leaves(b["opt_state"])
    assert len(leaves_a) == len(leaves_b) > len(jax.tree.leaves(a["params"]))
    for x, y in zip(jax.tree.leaves(a["params"]) + leaves_a, jax.tree.leaves(b["params"]) + leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
