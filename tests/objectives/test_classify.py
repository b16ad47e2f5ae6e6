"""Sequence classification: the heads against numpy, the loss, labelled records and their
errors, the batches, an end-to-end run that learns, linear probing, and the SST-2 experiment."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from lmstack.checkpoint import Checkpointer
from lmstack.config import ConfigError, compose, configure, load_config
from lmstack.configs.base import base_config
from lmstack.data.formats import load_records
from lmstack.data.labelled import Examples, ordered_batches, shuffled_batches
from lmstack.data.sources import DataError, stdlib_sources
from lmstack.data.tokenizers import ByteTokenizer, with_bos
from lmstack.distributed import global_batch
from lmstack.init_from import InitSource, added_head, inherit
from lmstack.objectives.classify import Classify, classification_loss
from lmstack.run import Run, tokenize
from lmstack.runspec import fresh_spec
from lmstack.train import train
from lmstack.trainstate import model_factory

T = 12


def tiny(name: str = "decoder", **model):
    c = base_config()
    c.model.name = name
    c = compose(c)
    c.model.update(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, num_labels=3, init_std=0.2, **model)
    return c


@pytest.fixture(scope="module")
def decoder():
    return model_factory(tiny(), vocab_size=64)[0]()


@nnx.jit
def forward(model, tokens, seg):
    """(final hidden states, class logits): one compile for both."""
    h = model.hidden(tokens, segment_ids=seg)[0] if hasattr(model, "hidden") else model(tokens, segment_ids=seg)
    return h, model.classify(tokens, seg)


def padded_rows(rng, lengths):
    tokens = rng.integers(1, 64, (len(lengths), T)).astype(np.int32)
    seg = (np.arange(T) < np.asarray(lengths)[:, None]).astype(np.int32)
    return tokens, seg


def numpy_pool(h, seg, kind):
    if kind == "cls":
        return h[:, 0]
    if kind == "mean":
        return (h * seg[..., None]).sum(1) / seg.sum(1, keepdims=True)
    last = seg.sum(1) - 1  # rows are left-aligned: the last real token
    return h[np.arange(len(h)), last]


@pytest.mark.parametrize("kind", ["last", "mean"])
def test_decoder_head_is_pooling_then_score(decoder, kind):
    """HF LlamaForSequenceClassification: score (d, labels), no bias, on the pooled final hidden state."""
    model = decoder
    if kind != model.cfg.classifier_pooling:
        model = nnx.merge(*nnx.split(decoder))  # a copy whose config says `kind`
        model.cfg = dataclasses.replace(model.cfg, classifier_pooling=kind)
    tokens, seg = padded_rows(np.random.default_rng(0), [5, 12, 1, 4])
    h, got = forward(model, tokens, seg)
    want = numpy_pool(np.asarray(h, np.float64), seg, kind) @ np.asarray(model.score.weight[...], np.float64)
    assert got.shape == (4, 3) and got.dtype == np.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert model.score.bias is None


def test_last_token_pooling_reads_the_last_non_padding_token(decoder):
    rng = np.random.default_rng(1)
    tokens, seg = padded_rows(rng, [4, 7, 4, 4])
    tokens[2] = np.where(seg[0] == 1, tokens[0], rng.integers(1, 64, T))  # row 0 with other padding tokens
    tokens[3] = tokens[0]
    tokens[3, 3] = (tokens[0, 3] + 1) % 64  # row 0 with another last token
    logits = np.asarray(forward(decoder, tokens, seg)[1])
    assert decoder.cfg.classifier_pooling == "last"
    assert not np.array_equal(tokens[0], tokens[2])
    np.testing.assert_array_equal(logits[2], logits[0])  # what sits in the padding does not matter
    assert np.abs(logits[3] - logits[0]).max() > 1e-3  # the last real token does


def test_encoder_head_is_bert_pooler_then_classifier():
    """HF BertForSequenceClassification: classifier (d, labels) + bias on tanh(dense(h[CLS]))."""
    make, _ = model_factory(tiny("encoder", style="gpt2", norm_position="post", use_bias=True, pooler=True),
                            vocab_size=64)
    model = make()
    model.classifier.bias[...] = jax.random.normal(jax.random.key(3), (3,))
    tokens, seg = padded_rows(np.random.default_rng(2), [6, 12])
    h, got = forward(model, tokens, seg)
    h = np.asarray(h, np.float64)
    p = model.pooler_dense
    pooled = np.tanh(h[:, 0] @ np.asarray(p.weight[...]) + np.asarray(p.bias[...]))
    want = pooled @ np.asarray(model.classifier.weight[...]) + np.asarray(model.classifier.bias[...])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_a_model_without_head_says_how_to_get_one():
    c = tiny()
    c.model.num_labels = 0
    model = model_factory(c, vocab_size=64)[0]()
    assert "score" not in dict(nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match=r"^this decoder has no classification head \(model.num_labels=0\): "
                                         r"set --config.model.num_labels to the number of classes$"):
        model.classify(np.zeros((1, 4), np.int32), np.ones((1, 4), np.int32))


def test_loss_is_cross_entropy_summed_over_labelled_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)).astype(np.float32) * 3
    labels = np.array([2, 0, 1, -1, 1], np.int32)  # -1: a padding row
    loss, aux = classification_loss(logits, labels)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
    real = labels >= 0
    np.testing.assert_allclose(float(loss), -logp[real, labels[real]].sum(), rtol=1e-6)
    assert float(aux["weight"]) == 4
    assert float(aux["accuracy"]) == np.sum(np.argmax(logits, 1)[real] == labels[real])


# --- records ---------------------------------------------------------------------------


def _records(path, **data):
    c = compose(classify_config(path))
    c.data.update(**data)
    return c, load_records(c.data)


def test_records_encode_with_their_label_index(tmp_path):
    """TSV by column number (SST-2's headers differ), CSV quoting, JSONL labels as JSON writes them."""
    (tmp_path / "a.tsv").write_text('label\tsentence\nyes\tit "works" .\r\nno\tno\r\n')
    (tmp_path / "b.csv").write_text('text,label\n"a, quoted ""text""",no\n')
    (tmp_path / "c.jsonl").write_text(json.dumps({"t": "one", "y": 1}) + "\n\n" + json.dumps({"t": "two", "y": True}))
    tok = ByteTokenizer()
    for name, fields, labels, texts, classes in (
            ("a.tsv", dict(field="1"), "no,yes", ['it "works" .', "no"], [1, 0]),  # unquoted; CRLF endings
            ("b.csv", {}, "no,yes", ['a, quoted "text"'], [0]),
            ("c.jsonl", dict(field="t", label_field="y"), "1,true", ["one", "two"], [0, 1])):
        cfg, records = _records(tmp_path / name, **fields)
        cfg.objective.labels = labels
        examples, notes = Classify.encode_records(cfg, tok, records, "train")
        assert [e["tokens"].tolist() for e in examples] == [with_bos(tok, tok.encode(t)) for t in texts]
        assert [int(e["label"]) for e in examples] == classes
        assert notes[0].startswith(f"train: {len(texts)} labelled texts")


def test_a_label_outside_the_set_names_the_record(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("label\ttext\nyes\tgood\nneutral\tmeh\n")
    cfg, records = _records(path)
    with pytest.raises(DataError, match=rf"^objective.labels: {path}:3: label 'neutral' is not one of the configured "
                                        r"labels \(no, yes\): add it to --config.objective.labels or fix the record$"):
        Classify.encode_records(cfg, ByteTokenizer(), records, "train")


def test_held_out_file_and_the_first_records(tmp_path):
    """data.val_path holds the held-out records out of a second file; data.max_records keeps the first N."""
    train_tsv, dev_tsv = def_lines(tmp_path / "train.tsv", n=20), def_lines(tmp_path / "dev.tsv", n=3, seed=1)
    cfg = compose(classify_config(train_tsv))
    cfg.data.update(val_path=str(dev_tsv), max_records=25)
    data = tokenize([], ByteTokenizer(), cfg)
    assert len(data.train_examples) == 25 and len(data.val_examples) == 6
    first = [r.text for r in load_records(cfg.data)[:25]]
    assert [bytes(e["tokens"][1:].tolist()).decode() for e in data.train_examples] == first
    (tmp_path / "empty.tsv").write_text("label\ttext\n")
    cfg.data.val_path = str(tmp_path / "empty.tsv")
    with pytest.raises(DataError, match=r"^data.val_path: '.*empty.tsv' holds no classification records"):
        tokenize([], ByteTokenizer(), cfg)


def test_config_problems_at_load():
    raw = base_config()
    raw.objective.name = "classify"
    with pytest.raises(ConfigError) as e:
        configure(raw, ["--config.objective.labels=neg,pos"], "test", "test")
    msg = str(e.value)
    assert ("data.source='stdlib': objective.classify reads labelled records: set --config.data.source to "
            "classification and --config.data.path to the file") in msg
    assert ("model.num_labels=0 does not match the 2 labels of objective.labels='neg,pos': "
            "set --config.model.num_labels=2") in msg
    with pytest.raises(ConfigError, match="objective.labels='pos': list two or more distinct labels as the data "
                                          "writes them, e.g. --config.objective.labels=negative,positive"):
        configure(raw, ["--config.objective.labels=pos", "--config.data.source=classification", "--config.model.num_labels=1"],
                  "test", "test")


# --- batches ---------------------------------------------------------------------------


def _examples(n=10, seq_len=6):
    """Examples whose first token is their index + 1."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, seq_len + 1, n).astype(np.int32)
    tokens = np.where(np.arange(seq_len) < lengths[:, None], rng.integers(1, 50, (n, seq_len)), 0).astype(np.int32)
    tokens[:, 0] = np.arange(n) + 1
    return Examples(tokens, lengths, np.arange(n, dtype=np.int32) % 3)


def test_shuffled_batches_are_seeded_epochs_and_resume_from_their_state():
    ex = _examples()
    it = shuffled_batches(ex, batch_size=4, seed=1)
    batches = [next(it) for _ in range(4)]
    ids = [b["tokens"][:, 0] - 1 for b in batches]
    # an epoch is 2 whole batches of distinct examples (10 // 4); the next one is reshuffled
    assert len(set(np.concatenate(ids[:2]).tolist())) == 8
    assert not np.array_equal(np.concatenate(ids[:2]), np.concatenate(ids[2:]))
    for b, i in zip(batches, ids):
        np.testing.assert_array_equal(b["segment_ids"].sum(1), ex.lengths[i])
        np.testing.assert_array_equal(b["labels"], ex.labels[i])
        np.testing.assert_array_equal(b["tokens"], ex.tokens[i])
    state = it.get_state()
    later = next(it)
    again = shuffled_batches(ex, batch_size=4, seed=1)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], later["tokens"])
    half = next(shuffled_batches(ex, batch_size=4, seed=1, rows=slice(2, 4)))  # one process's rows
    np.testing.assert_array_equal(half["labels"], batches[0]["labels"][2:])
    with pytest.raises(DataError, match=r"^train.batch_size=16 exceeds the 10 training examples: lower "
                                        r"--config.train.batch_size or add data$"):
        shuffled_batches(ex, batch_size=16, seed=1)


def test_ordered_batches_pad_the_last_batch_with_unlabelled_rows():
    ex = _examples()
    batches = ordered_batches(ex, batch_size=4)
    assert len(batches) == 3
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), list(ex.labels) + [-1, -1])
    assert batches[-1]["segment_ids"][2:].sum() == 0
    assert len(ordered_batches(ex, batch_size=4, max_batches=1)) == 1


# --- runs ------------------------------------------------------------------------------


def def_lines(path, n=300, seed=0):
    """A TSV of standard-library source lines, half containing 'def' (label yes), half not."""
    lines = [s.strip() for _, text in stdlib_sources()[:60] for s in text.splitlines()]
    lines = [s for s in lines if 12 <= len(s) <= 40 and "\t" not in s]
    rng = np.random.default_rng(seed)
    yes = rng.choice([s for s in lines if "def" in s], n, replace=False)
    no = rng.choice([s for s in lines if "def" not in s], n, replace=False)
    path.write_text("label\ttext\n" + "".join(f"{y}\t{s}\n" for y, group in (("yes", yes), ("no", no)) for s in group))
    return path


def classify_config(data_path, family="decoder", **train):
    c = base_config()
    c.model.name = family
    c.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, num_labels=2)
    c.data.update(source="classification", path=str(data_path), seq_len=40, val_fraction=0.2)
    c.data.tokenizer.kind = "byte"
    c.objective.name = "classify"
    c.objective.labels = "no,yes"
    c.train.update(steps=40, batch_size=16, progress=False, log_every=10, **train)
    c.optimizer.update(lr=3e-3, warmup_steps=5)
    c.eval.update(names=("classification",), every=0, batches=0)
    c.checkpoint.every = 1000
    c.sample.max_new_tokens = 2
    c.log.tensorboard = False
    c.mesh.data = 1
    return c


def test_end_to_end_learns_which_lines_define_something(tmp_path):
    """An encoder (the decoder trains in the next test) from scratch, 40 steps of 16 lines."""
    cfg = classify_config(def_lines(tmp_path / "def.tsv"), "encoder")
    cfg.eval.names = ("perplexity", "classification")
    summary = train(cfg, tmp_path / "run")
    ev = summary["eval"]
    assert ev["classification/accuracy"] > 0.8  # chance: 0.5 (120 balanced held-out lines)
    assert 0.8 < ev["classification/macro_f1"] <= 1
    # the evaluator's argmax over model.classify agrees with the loss's accuracy in the eval step
    assert ev["classification/accuracy"] == pytest.approx(ev["accuracy"], abs=1e-9)
    assert summary["sample"] is None


def test_linear_probing_from_a_language_model_trains_the_head_only(tmp_path):
    """init.from a run without a head: the trunk loads, ``score`` starts fresh; with
    train.trainable='score.*' the head gets updates and every other parameter stays bit for bit."""
    data_path = def_lines(tmp_path / "def.tsv", n=40)
    lm = classify_config(data_path)  # the same architecture as a causal LM on the lines' text
    lm.model.num_labels, lm.objective, lm.data.source = 0, base_config().objective, "text"
    lm.data.path = str(tmp_path / "lines.txt")
    (tmp_path / "lines.txt").write_text(data_path.read_text())
    parent, _ = Run.for_training(compose(lm), tmp_path / "lm")
    lm_state = parent.init_state()
    ckpt = Checkpointer(tmp_path / "lm")
    ckpt.save(1, lm_state, None, parent.cfg.to_dict())
    ckpt.close()
    lm_params = flat(lm_state["params"])

    cfg = compose(classify_config(data_path, trainable="score.*"))
    cfg.init["from"] = str(tmp_path / "lm")
    run, data = Run.for_training(cfg, tmp_path / "probe")
    state = run.init_state()
    assert list(flat(state["params"])) == ["score.weight"]
    assert flat(state["frozen"]).keys() == lm_params.keys()
    head = flat(state["params"])["score.weight"]
    step, batches = run.train_step(), run.objective.train_batches(data)
    with jax.set_mesh(run.mesh):
        for i in range(2):
            state, _ = step(state, global_batch(next(batches), run.batch_sharding), jax.random.key(i))
    for path, value in flat(state["frozen"]).items():
        np.testing.assert_array_equal(value, lm_params[path], err_msg=path)
    assert np.abs(flat(state["params"])["score.weight"] - head).max() > 1e-4


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("variant", ["", ":smoke=True"])
def test_sst2_experiment_can_start_from_the_causal_lm_experiment(variant):
    """The same architecture: a causal_lm run is a parent sst2_classify inherits from, adding a head."""
    parent = fresh_spec(load_config(f"causal_lm{variant}"), ByteTokenizer(), ())
    child = load_config(f"sst2_classify{variant}")
    spec = inherit(child, parent, InitSource("run", Path("runs/causal_lm")), ())
    assert spec.model == {**parent.model, "num_labels": 2}
    assert added_head(parent.model, spec.model)(("score", "weight"), None)
    assert not added_head(parent.model, spec.model)(("embed",), None)
    assert not added_head(spec.model, spec.model)(("score", "weight"), None)  # a parent with the head gives it


@pytest.mark.shared_data
def test_sst2_experiment_smoke_runs(shared_data, tmp_path):
    root = shared_data / "sst2"
    cfg = load_config("sst2_classify:smoke=True", [f"--config.data.path={root / 'train.tsv'}",
                                                   f"--config.data.val_path={root / 'dev.tsv'}",
                                                   "--config.train.progress=false"])
    summary = train(cfg, tmp_path / "sst2")
    assert summary["step"] == cfg.train.steps
    assert 0 <= summary["eval"]["classification/accuracy"] <= 1
