"""Supervised fine-tuning: loss masks from prefix renderings (hand-checked with the byte
tokenizer, and with a real byte-level BPE whose <|im_end|> is one token), packing that keeps
examples apart, truncation counts, exact resume, and a short run through the trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flax import nnx

from lmstack.config import ConfigError, compose, validate
from lmstack.data.chat import CHATML, LLAMA3, NONE
from lmstack.data.formats import Conversation, split_records
from lmstack.data.sources import DataError
from lmstack.data.tokenizers import ByteTokenizer
from lmstack.metrics_log import read_metrics
from lmstack.objectives.sft import SFT, encode_conversation, render, truncate
from lmstack.run import Run, RunData, encode_records
from lmstack.train import train
from lmstack.trainstate import model_factory
from tests.helpers import tiny_config

BYTES = ByteTokenizer()
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def _masked_text(example) -> list[str]:
    """The runs of consecutive loss-carrying tokens, decoded (byte tokenizer)."""
    runs, cur = [], []
    for t, m in zip(example["tokens"], example["loss_mask"]):
        if m:
            cur.append(int(t))
        elif cur:
            runs.append(bytes(cur).decode())
            cur = []
    return runs + ([bytes(cur).decode(errors="ignore")] if cur else [])  # a cut example may end mid-character


def test_mask_covers_exactly_the_assistant_tokens():
    ex = encode_conversation(CHAT, BYTES, CHATML)
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n")
    assert bytes(ex["tokens"].tolist()).decode() == text
    assert ex["tokens"].dtype == ex["loss_mask"].dtype == np.int32
    # the end-of-turn marker is trained, the assistant header is not
    assert _masked_text(ex) == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]
    first = text.index("Hello!")
    want = np.zeros(len(text), np.int32)
    want[first:first + len("Hello!<|im_end|>\n")] = 1
    want[text.rindex("4<|im_end|>"):] = 1
    np.testing.assert_array_equal(ex["loss_mask"], want)
    llama = encode_conversation(CHAT, BYTES, LLAMA3)
    assert _masked_text(llama) == ["Hello!<|eot_id|>", "4<|eot_id|>"]


def test_loss_on_all_and_last_turn():
    all_ = encode_conversation(CHAT, BYTES, CHATML, loss_on="all")
    assert all_["loss_mask"].all()
    assert _masked_text(encode_conversation(CHAT, BYTES, CHATML, loss_on="last_turn")) == ["4<|im_end|>\n"]
    with pytest.raises(DataError, match=r"^objective.loss_on: 'prompt' is not one of assistant, last_turn, all$"):
        encode_conversation(CHAT, BYTES, CHATML, loss_on="prompt")


def test_prompt_rendering_is_a_prefix_of_prompt_plus_completion():
    messages = [{"role": "user", "content": "Q: 3*3 =",}, {"role": "assistant", "content": " 9"}]
    ex = encode_conversation(messages, BYTES, NONE)  # base-model prompt/completion: no markup
    assert bytes(ex["tokens"].tolist()) == b"Q: 3*3 = 9"
    assert ex["loss_mask"].tolist() == [0] * 8 + [1, 1]
    for template in (CHATML, LLAMA3):
        prompt = BYTES.encode(_render(template, messages[:1], True))
        full = encode_conversation(messages, BYTES, template)
        assert full["tokens"][:len(prompt)].tolist() == prompt and not full["loss_mask"][:len(prompt)].any()


def _render(template, messages, generation):
    return render(template, messages, BYTES, add_generation_prompt=generation)


def test_template_errors_are_one_line():
    skip_replies = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    with pytest.raises(DataError) as e:
        encode_conversation(CHAT, BYTES, skip_replies, where="f.json record 7")
    assert str(e.value) == ("f.json record 7: no token carries loss (objective.loss_on=assistant): the chat template "
                            "renders none of the assistant messages' tokens: fix the record or the template, or set "
                            "--config.objective.loss_on=all")
    with pytest.raises(DataError, match=r"^f.json:3: no token carries loss .*: the conversation has no assistant "):
        encode_conversation(CHAT[:2], BYTES, CHATML, where="f.json:3")
    last_differs = "{% for m in messages %}{% if loop.last %}END {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError) as e:
        encode_conversation(CHAT, BYTES, last_differs, where="r 1")
    assert str(e.value) == ("r 1: the chat template renders messages[:2] with the generation prompt differently when "
                            "later messages follow, so the reply tokens cannot be found: use a template whose "
                            "renderings extend each other (chatml, llama3)")
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"^r 2: chat template line 1 .*roles must alternate"):
        encode_conversation(CHAT, BYTES, failing, where="r 2")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE (tokenizers) with ChatML special tokens and ChatML as its own template."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world, the assistant says hello", "user system assistant"] * 5, trainer)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return d


@pytest.mark.interop
def test_bpe_end_of_turn_token_is_one_id_inside_the_mask(bpe_dir):
    from lmstack.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer.from_dir(bpe_dir)
    cfg = compose(tiny_config())
    cfg.objective.name = "sft"
    cfg = compose(cfg)
    cfg.data.seq_len = 200
    (ex,), _ = SFT.encode_records(cfg, tok, [Conversation(CHAT)], "train")  # chat_template "": the tokenizer's own
    end = tok.encode("<|im_end|>")
    assert len(end) == 1 and end[0] == tok.eos_id
    trained = ex["tokens"][ex["loss_mask"] == 1].tolist()
    assert trained.count(end[0]) == 2 and tok.decode(trained) == "Hello!<|im_end|>\n4<|im_end|>\n"
    with pytest.raises(DataError) as e:  # "hel" + "lo world": BPE merges across the turn boundary
        encode_conversation([{"role": "user", "content": "hel"}, {"role": "assistant", "content": "lo world"}],
                            tok, NONE, where="x.jsonl:1")
    assert str(e.value) == ("x.jsonl:1: the hf tokenizer merges text across the end of messages[:1] with the "
                            "generation prompt ('hel' + 'lo world'), so the reply tokens cannot be told apart: use a "
                            "template that ends each turn with a special token or newline")


def test_truncation_counts():
    examples = [{"tokens": np.arange(n, dtype=np.int32), "loss_mask": (np.arange(n) >= k).astype(np.int32)}
                for n, k in ((5, 2), (12, 3), (20, 15))]
    out, n = truncate(examples, 10)
    assert [len(e["tokens"]) for e in out] == [5, 10, 10]
    assert n == {"examples": 3, "tokens": 25, "trained": 3 + 7 + 0, "truncated": 2, "dropped": 2 + 10,
                 "untrained": 1}


def _sft_config(tmp_path, n=40, **objective):
    rows = [{"instruction": f"Say {w} {i % 7}", "output": f"{w} {i % 7}!" + " more" * (i % 9)}
            for i, w in enumerate(["hi", "yes", "no", "ok"] * (n // 4))]
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(rows))
    c = tiny_config()
    c.model.vocab_size = 0
    c.objective.name = "sft"
    c = compose(c)
    c.objective.chat_template = "chatml"
    c.objective.update(objective)
    c.data.update(source="alpaca", path=str(path), seq_len=191, val_fraction=0.1)
    c.data.tokenizer.kind = "byte"
    c.mesh.data = 1
    return c


def _held_out(n: int, cfg) -> set[int]:
    _, val = split_records(list(range(n)), cfg.data.val_fraction, cfg.data.seed)
    return set(val)


def _data(cfg) -> RunData:
    return encode_records(SFT, BYTES, cfg)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A tiny SFT config and its data, a packed training batch and a tiny model (built once:
    initialising a model compiles each initializer)."""
    cfg = _sft_config(tmp_path_factory.mktemp("sft"))
    data = _data(cfg)
    batch = next(SFT(cfg, {}).train_batches(data))
    make, _ = model_factory(cfg, vocab_size=BYTES.vocab_size)
    return cfg, data, batch, make()


def test_packed_examples_never_see_each_other(packed):
    cfg, data, batch, model = packed
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert batch["tokens"].shape == (cfg.train.batch_size, cfg.data.seq_len + 1)
    by_tokens = {e["tokens"].tobytes(): e for e in data.train_examples}
    logits_of = nnx.jit(lambda m, t, p, s: m(t, positions=p, segment_ids=s))
    packed_logits = np.asarray(logits_of(model, batch["tokens"], batch["positions"], batch["segment_ids"]))
    shared_rows = 0
    for r in range(len(batch["tokens"])):
        segs = [s for s in np.unique(batch["segment_ids"][r]) if s > 0]
        shared_rows += len(segs) > 1
        for s in segs:
            where = batch["segment_ids"][r] == s
            tokens = batch["tokens"][r][where]
            ex = by_tokens[tokens.tobytes()]  # each segment is one whole example, its mask alongside
            np.testing.assert_array_equal(batch["loss_mask"][r][where], ex["loss_mask"])
            np.testing.assert_array_equal(batch["positions"][r][where], np.arange(len(tokens)))
            n, pad = len(tokens), batch["tokens"].shape[1] - len(tokens)  # alone in a row (one compile)
            alone = logits_of(model, np.pad(tokens, (0, pad))[None], np.pad(np.arange(n), (0, pad))[None],
                              np.pad(np.ones(n, np.int32), (0, pad))[None])
            np.testing.assert_allclose(packed_logits[r][where], np.asarray(alone)[0, :n], rtol=1e-5, atol=1e-5)
    assert shared_rows > 0  # the check above compared examples that share a row


def test_loss_is_the_cross_entropy_of_the_masked_targets(packed):
    cfg, _, batch, model = packed
    loss, aux = nnx.jit(lambda m, b: SFT(cfg, {}).loss_fn(m, b, None))(model, batch)
    t, s, p = batch["tokens"], batch["segment_ids"], batch["positions"]
    logits = np.asarray(nnx.jit(lambda m: m(t[:, :-1], positions=p[:, :-1], segment_ids=s[:, :-1]))(model), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, t[:, 1:, None], -1)[..., 0]
    mask = (batch["loss_mask"][:, 1:] == 1) & (s[:, 1:] == s[:, :-1]) & (s[:, 1:] > 0)
    assert float(aux["weight"]) == mask.sum() > 0
    np.testing.assert_allclose(float(loss), (nll * mask).sum(), rtol=1e-4)


def test_packing_density_best_fit_first_fit_none(tmp_path):
    cfg = _sft_config(tmp_path, n=200)
    cfg.data.val_fraction = 0.0
    data = _data(cfg)
    total = sum(len(e["tokens"]) for e in data.train_examples)
    density = {}
    for packing, bins in (("first_fit", 8), ("best_fit", 8), ("none", 8), ("first_fit", 64)):
        cfg.objective.packing, cfg.objective.packing_bins = packing, bins
        rows = np.concatenate([b["segment_ids"] for b in SFT(cfg, {})._packed(
            data.train_examples, batch_size=8, num_epochs=1, drop_remainder=False)])
        assert (rows > 0).sum() == total  # nothing dropped
        if packing == "none":
            assert len(rows) == len(data.train_examples) and rows.max() == 1
        density[packing, bins] = (rows > 0).mean()
    print({k: round(v, 3) for k, v in density.items()})
    assert density["best_fit", 8] >= density["first_fit", 8] > density["none", 8]
    assert density["first_fit", 64] > density["first_fit", 8]


def test_train_iterator_resumes_exactly(tmp_path):
    cfg = _sft_config(tmp_path)
    data = _data(cfg)
    it = SFT(cfg, {}).train_batches(data)
    for _ in range(7):  # past the end of the first epoch (36 examples, ~2 per row, 8 rows a batch)
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    again = SFT(cfg, {}).train_batches(data)
    again.set_state(state)
    for w in want:
        got = next(again)
        for k in w:
            np.testing.assert_array_equal(got[k], w[k])


def test_eval_batches_cover_the_validation_examples(tmp_path):
    cfg = _sft_config(tmp_path, n=80)
    cfg.data.val_fraction = 0.25
    cfg.eval.batches = 0
    data = _data(cfg)
    batches = SFT(cfg, {}).eval_batches(data)
    assert all(b["tokens"].shape == (cfg.train.batch_size, cfg.data.seq_len + 1) for b in batches)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == sum(len(e["tokens"]) for e in data.val_examples)
    cfg.eval.batches = 1
    assert len(SFT(cfg, {}).eval_batches(data)) == 1


def test_sft_needs_a_conversation_format():
    c = tiny_config()
    c.objective.name = "sft"
    c = compose(c)
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert ("objective.name=sft reads conversations, but data.source='stdlib' gives documents: set "
            "--config.data.source to one of alpaca, prompt_completion, sharegpt and --config.data.path=FILE") in str(e.value)


def test_sft_trains_through_the_trainer_and_the_digest_follows_the_records(tmp_path, capsys):
    cfg = _sft_config(tmp_path, n=48, packing="best_fit")
    cfg.data.seq_len = 95  # some examples are cut
    cfg.train.update(steps=20, log_every=1, progress=False)
    cfg.optimizer.update(lr=1e-2, warmup_steps=3)
    cfg.eval.update(every=0, batches=1)
    cfg.checkpoint.update(every=30, async_save=False)
    cfg.sample.max_new_tokens = 4
    summary = train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    records = json.loads(open(cfg.data.path).read())
    lengths = [len(encode_conversation([{"role": "user", "content": r["instruction"]},
                                        {"role": "assistant", "content": r["output"]}], BYTES, CHATML)["tokens"])
               for r in records]
    train_lengths = [n for i, n in enumerate(lengths) if i not in _held_out(len(records), cfg)]
    cut = [n - 96 for n in train_lengths if n > 96]
    assert cut and (f"  train: 43 conversations, {sum(min(n, 96) for n in train_lengths):,} tokens, " in out)
    assert f"{len(cut)} cut to seq_len + 1 = 96 ({sum(cut):,} tokens dropped)" in out and "  val: 5 conversations" in out
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert abs(losses[0] - math.log(BYTES.vocab_size)) < 0.3
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert math.isfinite(summary["eval"]["loss"]) and summary["eval"]["loss"] < 0.6 * losses[0]
    # the saved digest hashes the encoded examples: a changed reply stops a resume
    records[3]["output"] += " changed"
    open(cfg.data.path, "w").write(json.dumps(records))
    with pytest.raises(ConfigError, match="changed since the run in"):
        Run.for_training(cfg, tmp_path / "run")


@pytest.mark.shared_data
def test_real_alpaca_masks_are_the_replies(shared_data):
    from lmstack.config import load_config

    path = shared_data / "instruct" / "alpaca_en_demo.json"
    cfg = load_config("sft_chat", [f"--config.data.path={path}"])
    data = encode_records(SFT, BYTES, cfg)
    raw = json.loads(path.read_text())
    assert len(data.train_examples) + len(data.val_examples) == len(raw) == 999
    held = _held_out(len(raw), cfg)
    replies = [r["output"] + "<|im_end|>\n" for i, r in enumerate(raw) if i not in held]
    trained = ["".join(_masked_text(e)) for e in data.train_examples]  # file order is kept
    whole = sum(t == r for t, r in zip(trained, replies))
    assert all(r.startswith(t) for t, r in zip(trained, replies))  # a cut example keeps the start of its reply
    n_cut = sum(len(e["tokens"]) == cfg.data.seq_len + 1 for e in data.train_examples)
    assert whole >= len(replies) - n_cut and n_cut == 491  # byte-level, most replies are longer than 512 bytes
    assert data.notes[0].startswith("train: 899 conversations, 364,704 tokens, 243,061 carry loss (loss_on=assistant); "
                                    "491 cut to seq_len + 1 = 513 (393,896 tokens dropped)")
    assert data.notes[1].startswith("val: 100 conversations")
