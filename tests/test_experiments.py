"""Every experiment in experiments/ builds (full and smoke) and smoke-trains end to end."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from lmstack.checkpoint import Checkpointer
from lmstack.config import load_config
from lmstack.metrics_log import read_metrics
from lmstack.data.sources import load_documents
from lmstack.data.tokenizers import build_tokenizer
from lmstack.run import tokenize
from lmstack.train import train
from tests.helpers import corpus_text

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
NAMES = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_"))


def test_there_are_experiments():
    assert {"quickstart", "shakespeare_char"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_builds(name):
    doc = ast.get_docstring(ast.parse((EXPERIMENTS / f"{name}.py").read_text()))
    assert doc and doc.splitlines()[0].strip()  # `lmstack list` has a description to show
    full = load_config(name)  # get_config(None), validated
    smoke = load_config(f"{name}:smoke=True")
    assert full.name == smoke.name == name and smoke.arg == "smoke=True"
    assert smoke.train.steps < full.train.steps
    assert load_config(f"{name}:smoke=False").to_dict() == {**full.to_dict(), "arg": "smoke=False"}


def _data_path(cfg, tmp: Path) -> str:
    """A small generated corpus for sources that read files (the real data is not needed to smoke-run)."""
    text = corpus_text(20_000)
    if cfg.data.source == "alpaca":  # conversations: each line asked for, and answered reversed
        path = tmp / "instruct.json"
        path.write_text(json.dumps([{"instruction": line, "output": line[::-1]} for line in text.splitlines()]))
    elif cfg.data.source == "preference":  # pairs: each line asked for, the line preferred to it shouted
        path = tmp / "pairs.json"
        path.write_text(json.dumps([{"prompt": line[:40], "chosen": line, "rejected": line.upper() + "!"}
                                    for line in text.splitlines()[:400]]))
    elif cfg.data.source == "jsonl":
        path = tmp / "corpus.jsonl"
        path.write_text("".join(json.dumps({cfg.data.field: line}) + "\n" for line in text.splitlines()))
    else:
        path = tmp / "corpus.txt"
        path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", NAMES)
def test_smoke_run(name, tmp_path):
    cfg = load_config(f"{name}:smoke=True", ["--config.train.progress=false"])
    if cfg.objective.name == "classify":
        pytest.skip("reads ../shared/data: smoke-run in tests/objectives/test_classify.py (shared_data)")
    if cfg.data.source in ("text", "jsonl", "alpaca", "preference") and not cfg.data.path:
        cfg.data.path = _data_path(cfg, tmp_path)
    workdir = tmp_path / "run"
    summary = train(cfg, workdir)

    steps = cfg.train.steps
    assert summary["start_step"] == 0 and summary["step"] == steps
    if "reward" in cfg.objective:  # RL: no held-out loss; rewards of sampled completions instead
        _check_rl_smoke_run(cfg, summary, workdir)
        return
    assert math.isfinite(summary["eval"]["loss"])
    assert summary["eval"]["perplexity"] == pytest.approx(math.exp(summary["eval"]["loss"]), rel=1e-6)
    if cfg.model.name == "decoder":  # generative models end with a sample; the others have none
        assert isinstance(summary["sample"], str) and summary["sample"]
    else:
        assert summary["sample"] is None
    ckpt = Checkpointer(workdir)
    try:
        assert ckpt.latest_step() == steps
    finally:
        ckpt.close()
    records = read_metrics(workdir)
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    vocab = json.loads((workdir / "run_spec.json").read_text())["model"]["vocab_size"]  # resolved in the spec
    assert vocab > 0 and json.loads((workdir / "config.json").read_text())["model"]["vocab_size"] == 0
    if cfg.objective.name == "reward_model":  # a fresh score head: equal rewards, -log sigmoid(0)
        assert abs(losses[1] - math.log(2)) < 0.05, losses[1]
    elif cfg.objective.name == "dpo":  # LoRA's B = 0: the policy is its reference, -log sigmoid(0)
        assert losses[1] == pytest.approx(math.log(2), rel=1e-6)
        assert 0.0 <= summary["eval"]["pair_accuracy/accuracy"] <= 1.0
    elif cfg.model.name != "two_tower":
        # A freshly initialised LM predicts nearly uniformly over its vocabulary. (A two-tower
        # model ranks documents, not tokens: its chance level depends on the batch and the
        # initial temperature, so only the decrease below is checked for it.)
        assert abs(losses[1] - math.log(vocab)) < 0.3, (losses[1], math.log(vocab))
    assert losses[steps] < losses[1]


def _check_rl_smoke_run(cfg, summary, workdir: Path) -> None:
    """An RL run logs a mean reward in [0, 1] and a finite loss at every logged step, and its
    held-out evaluation (eval.rollout_reward) scores greedy completions."""
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    assert records[-1]["step"] == cfg.train.steps
    for r in records:
        assert 0.0 <= r["train/reward"] <= 1.0 and math.isfinite(r["train/loss"]) and r["train/rollout_s"] > 0
    assert 0.0 <= summary["eval"]["rollout_reward/reward"] <= 1.0
    assert 0 < summary["eval"]["rollout_reward/completion_length"] <= cfg.objective.max_new_tokens
    assert isinstance(summary["sample"], str)


@pytest.mark.shared_data
def test_shakespeare_char_data(shared_data, tmp_path):
    path = shared_data / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    cfg = load_config("shakespeare_char", [f"--config.data.path={path}"])
    data = tokenize(load_documents(cfg.data), build_tokenizer(cfg.data, load_documents(cfg.data)), cfg)
    assert data.tokenizer.kind == "char" and data.tokenizer.vocab_size == 65
    assert len(data.train) + len(data.val) == 1_115_394
    assert len(data.train) == 1_003_854  # nanoGPT's 90/10 split of the characters
    assert len(data.val) == 111_540
    assert "".join(data.tokenizer.decode(data.train.tokens[:14])) == "First Citizen:"
