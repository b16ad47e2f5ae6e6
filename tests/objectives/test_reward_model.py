"""Preference pairs through the chat template (prompt prefix, completion masks, truncation,
the batch layout), the Bradley-Terry reward-model loss against numpy on a tiny model's
rewards, eval.pair_accuracy, and a tiny run that learns to separate a separable set."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, compose, validate
from lmstack.configs.base import base_config
from lmstack.data.chat import CHATML, LLAMA3
from lmstack.data.formats import PreferencePair, Unpaired
from lmstack.data.labelled import ordered_batches
from lmstack.data.sources import DataError
from lmstack.data.tokenizers import ByteTokenizer
from lmstack.metrics_log import read_metrics
from lmstack.objectives.preference_data import (
    PAIR_SEQUENCES,
    UNPAIRED_SEQUENCES,
    SequenceExamples,
    counts_note,
    encode_pairs,
    encode_reply,
    encode_unpaired,
)
from lmstack.objectives.reward_model import RewardModel
from lmstack.objectives.sft import render
from lmstack.train import train
from lmstack.trainstate import model_factory

BYTES = ByteTokenizer()
PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


def _pair(chosen="4", rejected="five", prompt=PROMPT, margin=None, where="r"):
    return PreferencePair(prompt, {"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected},
                          margin, where)


@pytest.mark.parametrize("template, end", [(CHATML, "<|im_end|>\n"), (LLAMA3, "<|eot_id|>")])
def test_prompt_is_a_prefix_and_the_mask_is_the_reply_and_its_end_of_turn(template, end):
    (ex,), counts = encode_pairs([_pair()], BYTES, template, 512)
    prompt = BYTES.encode(render(template, PROMPT, BYTES, add_generation_prompt=True))
    for name, reply in (("chosen", "4"), ("rejected", "five")):
        tokens, mask = ex[f"{name}_tokens"], ex[f"{name}_mask"]
        assert tokens.dtype == mask.dtype == np.int32
        assert tokens[:len(prompt)].tolist() == prompt  # the rendered prompt is a prefix of prompt + reply
        whole = render(template, PROMPT + [{"role": "assistant", "content": reply}], BYTES, add_generation_prompt=False)
        assert bytes(tokens.tolist()).decode() == whole
        # exactly the tokens after the prompt carry the mask: the reply, its end-of-turn marker
        np.testing.assert_array_equal(mask, (np.arange(len(tokens)) >= len(prompt)).astype(np.int32))
        assert bytes(tokens[mask == 1].tolist()).decode() == reply + end
    assert ex["margin"] == np.float32(0) and counts == dict(records=1, dropped=0, sequences=2, truncated=0,
                                                           tokens_dropped=0, tied=0)


def test_truncation_keeps_the_prompt_cuts_the_reply_and_counts():
    prompt_len = len(render(CHATML, PROMPT, BYTES, add_generation_prompt=True))
    length = prompt_len + 3
    pairs = [_pair("4", "fivefive"), _pair("abcX", "abcY", margin=1.5),
             _pair(prompt=[{"role": "user", "content": "x" * 200}], where="long")]
    examples, counts = encode_pairs(pairs, BYTES, CHATML, length)
    # kept: 3 reply tokens each; dropped: "4<|im_end|>\n" 12 - 3, "fivefive<|im_end|>\n" 19 - 3, "abcX..." 15 - 3 twice
    assert counts == dict(records=3, dropped=1, sequences=4, truncated=4, tokens_dropped=9 + 16 + 12 + 12, tied=1)
    a, b = examples
    assert {len(e[k]) for e in (a, b) for k in ("chosen_tokens", "rejected_tokens")} == {length}
    assert bytes(a["rejected_tokens"][prompt_len:].tolist()) == b"fiv" and a["rejected_mask"][prompt_len:].all()
    assert not a["rejected_mask"][:prompt_len].any()
    assert bytes(b["chosen_tokens"].tolist()) == bytes(b["rejected_tokens"].tolist())  # "abc": tied
    assert b["margin"] == np.float32(1.5)
    assert counts_note("train", counts, "pairs", length) == (
        f"train: 3 pairs, 4 of 4 sequences cut to {length} tokens (49 reply tokens dropped), "
        f"1 dropped: the prompt alone fills {length} tokens, 1 left with identical chosen and rejected tokens")


def test_a_template_that_rewrites_the_prompt_names_the_record():
    rewrites = ("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(DataError, match=r"^pairs.json record 7: the chat template renders messages\[:4\] with the "
                                        r"generation prompt differently"):
        encode_reply(PROMPT, {"role": "assistant", "content": "4"}, BYTES, rewrites, where="pairs.json record 7")


def test_batch_layout_one_pair_per_row_and_padding_rows():
    examples, _ = encode_pairs([_pair("4", "five", margin=2.0), _pair("yes", "no")], BYTES, CHATML, 200)
    stacked = SequenceExamples.stack(examples, PAIR_SEQUENCES, 200)
    (batch,) = ordered_batches(stacked, batch_size=3)
    assert set(batch) == {f"{n}_{k}" for n in PAIR_SEQUENCES for k in ("tokens", "mask", "segment_ids", "positions")} \
        | {"margin"}
    for name in PAIR_SEQUENCES:
        assert batch[f"{name}_tokens"].shape == (3, 200) and batch[f"{name}_tokens"].dtype == np.int32
        for r, e in enumerate(examples):
            n = len(e[f"{name}_tokens"])
            np.testing.assert_array_equal(batch[f"{name}_tokens"][r, :n], e[f"{name}_tokens"])
            np.testing.assert_array_equal(batch[f"{name}_mask"][r, :n], e[f"{name}_mask"])
            assert batch[f"{name}_segment_ids"][r].tolist() == [1] * n + [0] * (200 - n)
            assert batch[f"{name}_positions"][r].tolist() == list(range(n)) + [0] * (200 - n)
            assert not batch[f"{name}_tokens"][r, n:].any() and not batch[f"{name}_mask"][r, n:].any()
        assert not batch[f"{name}_segment_ids"][2].any()  # the padding row
    np.testing.assert_array_equal(batch["margin"], np.float32([2.0, 0.0, 0.0]))


def test_unpaired_examples_for_kto_mask_the_last_reply():
    records = [Unpaired(PROMPT + [{"role": "assistant", "content": "4"}], True, "k 1"),
               Unpaired(PROMPT + [{"role": "assistant", "content": "22"}], False, "k 2")]
    examples, counts = encode_unpaired(records, BYTES, CHATML, 200)
    assert counts["records"] == counts["sequences"] == 2 and not counts["truncated"]
    prompt = BYTES.encode(render(CHATML, PROMPT, BYTES, add_generation_prompt=True))
    for e, reply in zip(examples, ("4", "22")):
        assert e["completion_tokens"][:len(prompt)].tolist() == prompt
        assert bytes(e["completion_tokens"][e["completion_mask"] == 1].tolist()).decode() == reply + "<|im_end|>\n"
    (batch,) = ordered_batches(SequenceExamples.stack(examples, UNPAIRED_SEQUENCES, 200), batch_size=2)
    assert batch["desirable"].tolist() == [1, 0] and batch["completion_tokens"].shape == (2, 200)
    assert batch["completion_segment_ids"].sum(axis=1).tolist() == [len(e["completion_tokens"]) for e in examples]


# --- the loss ------------------------------------------------------------------------------


def _tiny_reward_model(vocab=256):
    c = base_config()
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, num_labels=1, init_std=0.2)
    make, _ = model_factory(c, vocab_size=vocab)
    return make()


def _numpy_bt(r_c, r_r, margin, coef):
    z = r_c.astype(np.float64) - r_r - margin
    return np.log1p(np.exp(-z)) + coef * (r_c.astype(np.float64) + r_r) ** 2


def test_loss_is_bradley_terry_on_the_score_heads_last_token():
    model = _tiny_reward_model()
    pairs = [_pair("4", "five", margin=0.5), _pair("a", "bb", margin=-1.0)]
    examples, _ = encode_pairs(pairs, BYTES, CHATML, 200)
    (batch,) = ordered_batches(SequenceExamples.stack(examples, PAIR_SEQUENCES, 200), batch_size=3)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    # the reference rewards: each sequence alone, unpadded, its last token's hidden state times score.weight
    last_hidden = nnx.jit(lambda m, tokens: m.hidden(tokens)[0][0, -1])
    score = np.asarray(model.score.weight[...], np.float64)[:, 0]
    rewards = {name: np.array([np.asarray(last_hidden(model, jnp.asarray(e[f"{name}_tokens"][None])), np.float64)
                               @ score for e in examples]) for name in PAIR_SEQUENCES}
    r_c, r_r = rewards["chosen"], rewards["rejected"]
    assert abs(r_c - r_r).min() > 1e-3  # the rewards differ: a real check
    raw = base_config()
    raw.objective.name = "reward_model"
    cfg = compose(raw)
    cfg.objective.center_rewards_coefficient = 0.01
    loss, aux = nnx.jit(lambda m, b: RewardModel(cfg).loss_fn(m, b, None))(model, batch)
    want = _numpy_bt(r_c, r_r, np.array([0.5, -1.0]), 0.01)
    assert want.sum() - _numpy_bt(r_c, r_r, np.array([0.5, -1.0]), 0.0).sum() > 1e-4  # the centring term counts
    np.testing.assert_allclose(float(loss), want.sum(), rtol=1e-5)
    assert float(aux["weight"]) == 2  # the padding row counts for nothing
    assert float(aux["accuracy"]) == np.sum(r_c > r_r)
    np.testing.assert_allclose(float(aux["margin"]), np.sum(r_c - r_r), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux["rewards/chosen"]), r_c.sum(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(aux["rewards/rejected"]), r_r.sum(), rtol=1e-4, atol=1e-5)


def test_config_problems_at_load():
    c = base_config()
    c.objective.name = "reward_model"
    c.data.source = "sharegpt"
    with pytest.raises(ConfigError) as e:
        validate(compose(c))
    message = str(e.value)
    assert ("data.source='sharegpt': objective.reward_model reads preference pairs: set --config.data.source to "
            "preference and --config.data.path to the file") in message
    assert ("objective.reward_model scores each reply with one number, but model.name='decoder' has "
            "model.num_labels=0: use model.decoder or model.encoder with --config.model.num_labels=1") in message


# --- a run ---------------------------------------------------------------------------------


def separable_pairs(path, n=160, seed=0):
    """Pairs whose chosen reply ends with ':)' and rejected with ':(' (random words before)."""
    rng = np.random.default_rng(seed)
    words = "red green blue cat dog sun moon tree rock sea".split()
    rows = []
    for i in range(n):
        reply = " ".join(rng.choice(words, rng.integers(1, 4)))
        rows.append({"prompt": f"Rate {i % 13}", "chosen": f"{reply} :)", "rejected": f"{reply} :("})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def reward_config(path):
    c = base_config()
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, num_labels=1)
    c.data.update(source="preference", path=str(path), seq_len=96, val_fraction=0.2)
    c.data.tokenizer.kind = "byte"
    c.objective.name = "reward_model"
    c.objective.chat_template = "chatml"
    c.train.update(steps=20, batch_size=16, progress=False, log_every=5)
    c.optimizer.update(lr=3e-3, warmup_steps=3)
    c.eval.update(names=("perplexity", "pair_accuracy"), every=0, batches=0)
    c.checkpoint.every = 1000
    c.sample.max_new_tokens = 2
    c.log.tensorboard = False
    c.mesh.data = 1
    return c


def test_a_tiny_reward_model_learns_to_separate_the_pairs(tmp_path, capsys):
    summary = train(reward_config(separable_pairs(tmp_path / "pairs.jsonl")), tmp_path / "run")
    ev = summary["eval"]
    assert ev["pair_accuracy/pairs"] == 32  # 20% of 160 held out
    assert ev["pair_accuracy/accuracy"] > 0.9 and ev["pair_accuracy/margin"] > 0
    # the evaluator's rewards agree with the loss's aux in the eval step
    assert ev["pair_accuracy/accuracy"] == pytest.approx(ev["accuracy"], abs=1e-6)
    assert ev["pair_accuracy/margin"] == pytest.approx(ev["margin"], rel=1e-4)
    first = next(r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r)
    assert abs(first - math.log(2)) < 0.05  # equal rewards at the start: -log sigmoid(0)
    assert ev["loss"] < math.log(2) - 0.1
    assert "train: 128 pairs, 0 of 256 sequences cut to 96 tokens" in capsys.readouterr().out
