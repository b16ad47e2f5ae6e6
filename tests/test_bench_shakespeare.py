"""tools/bench_shakespeare.py: the side-by-side benchmark's two sides compute the same thing
(PyTorch reference vs lmstack on copied weights: equal losses; equal learning rates), and
without torch it says so and prints lmstack's figures alone."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool():
    spec = importlib.util.spec_from_file_location("bench_shakespeare", TOOLS / "bench_shakespeare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=4",
        "--config.data.seq_len=16", "--config.train.batch_size=8", "--config.eval.batch_size=8",
        "--config.train.steps=40", "--config.optimizer.warmup_steps=5"]


@pytest.fixture
def text_path(tmp_path):
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "the", "king", "ROMEO:", "thou", "art", "\n"]
    path = tmp_path / "input.txt"
    path.write_text(" ".join(rng.choice(words, size=1500)))
    return path


def _cfg(text_path, extra=()):
    from lmstack.config import load_config

    return load_config("shakespeare_char", [f"--config.data.path={text_path}", "--config.train.progress=false",
                                            *TINY, *extra])


def _torch_state_dict(params) -> dict[str, np.ndarray]:
    """lmstack's stacked decoder weights (q/k/v (L, d, n, h), o (L, n, h, d), up (L, d, f),
    down (L, f, d)) as the reference's state_dict (torch.nn.Linear weights are (out, in))."""
    p = {k: np.asarray(v) for k, v in params.items()}
    d = p["embed"].shape[1]
    out = {"wte.weight": p["embed"], "head.weight": p["embed"], "wpe.weight": p["pos_embed"],
           "ln_f.weight": p["final_norm.scale"]}
    for i in range(len(p["blocks.attn.q.weight"])):
        qkv = [p[f"blocks.attn.{n}.weight"][i].reshape(d, -1) for n in "qkv"]
        out.update({f"blocks.{i}.{name}": value for name, value in {
            "qkv.weight": np.concatenate(qkv, axis=1).T, "proj.weight": p["blocks.attn.o.weight"][i].reshape(-1, d).T,
            "fc.weight": p["blocks.mlp.up.weight"][i].T, "out.weight": p["blocks.mlp.down.weight"][i].T,
            "ln1.weight": p["blocks.attn_norm.scale"][i], "ln2.weight": p["blocks.mlp_norm.scale"][i]}.items()})
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def test_torch_reference_matches_lmstack(text_path, tmp_path):
    pytest.importorskip("torch")
    from flax import nnx

    bench = _tool()
    ref = bench.load_torch_reference()
    ours = bench.LmstackSide(_cfg(text_path), str(tmp_path / "run"))
    hyper, lacks = bench.torch_hyper(ref, ours.cfg)
    assert lacks == []
    assert (hyper.d_model, hyper.n_layers, hyper.block, hyper.batch, hyper.iters) == (32, 2, 16, 8, 40)
    theirs = bench.TorchSide(hyper, ours.data.train.tokens, ours.run.spec.vocab_size, 0)
    assert theirs.train(2) > 0
    ours.train(3)  # weights away from their initial values
    flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(ours.state["params"])}
    theirs.load_state_dict(_torch_state_dict({k: v.get_value() for k, v in flat.items()}))

    whole = ours.run.objective.eval_batches(ours.data)
    sampled = bench.nanogpt_batches(ours.data, 16, 8, 3, seed=0)
    for batches in (whole, sampled):
        assert theirs.loss(batches) == pytest.approx(ours.loss(batches), rel=1e-5)
    # the windows of nanoGPT's estimate: fixed by the seed, inside the validation split
    again = bench.nanogpt_batches(ours.data, 16, 8, 3, seed=0)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(sampled, again))
    val = ours.data.val.tokens
    for b in sampled:
        for row in b["tokens"]:
            starts = [s for s in range(len(val) - 16) if np.array_equal(val[s:s + 17], row)]
            assert starts

    # the learning rate of every update, warmup and cosine decay alike
    rates = [ref.lr_at(it, hyper) for it in range(45)]
    assert rates == pytest.approx([float(ours.run.schedule(it)) for it in range(45)], rel=1e-5)
    theirs.close()
    assert theirs.process.exitcode == 0


def test_without_torch_prints_lmstack_alone(text_path, tmp_path, monkeypatch, capsys):
    bench = _tool()
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed: find_spec gives None
    monkeypatch.setattr(sys, "argv", ["bench_shakespeare.py", f"--data={text_path}", "--reps=2", "--iters=2",
                                      "--warmup=1", "--eval-iters=2", f"--workdir={tmp_path / 'run'}", *TINY])
    bench.main()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == ("PyTorch side not run (torch is not installed): lmstack's figures alone; "
                        "pip install -e '.[bench]' to compare")
    assert [line.split() for line in lines if line.startswith("   ")] == [["lmstack"]]  # the table's one column
    row = next(line for line in lines if line.startswith("  each repetition")).split()
    assert len(row) == 2 + 2  # the label's two words and one time per repetition
    assert "speed ratio" not in out
    loss = float(next(line for line in lines if line.startswith("val loss, whole split")).split()[-1])
    assert 0 < loss < np.log(len(set(text_path.read_text())))  # it learned something
