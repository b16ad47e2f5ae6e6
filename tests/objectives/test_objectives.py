"""Each pre-training objective's batches and loss mask on real (small) data."""

import jax
import numpy as np
import pytest

from lmstack import registry
from lmstack.data.pipeline import TokenStream
from lmstack.data.noise import reassemble
from lmstack.config import compose
from lmstack.data.tokenizers import ByteTokenizer
from lmstack.run import RunData
from lmstack.runspec import fresh_spec
from tests.helpers import tiny_config


def run_data(n_tokens=4000, seed=0):
    rng = np.random.default_rng(seed)
    text = " ".join("".join(rng.choice(list("abcdefgh"), size=rng.integers(1, 8))) + rng.choice([".", ""])
                    for _ in range(n_tokens // 4))
    tok = ByteTokenizer()
    ids = np.asarray(tok.encode(text)[:n_tokens], np.int32)
    cut = int(len(ids) * 0.9)
    return RunData(tok, TokenStream(ids[:cut], np.array([0]), "train"), TokenStream(ids[cut:], np.array([0]), "val"))


def objective(name, seq_len=16, **objective_keys):
    cfg = tiny_config()
    cfg.data.seq_len = seq_len
    cfg.objective.name = name
    cfg.objective.update(objective_keys)
    cfg.model.vocab_size = 0  # the byte tokenizer's 259 plus the reserved ids
    cfg = compose(cfg)
    cls = registry.lookup("objective", name)
    spec = fresh_spec(cfg, ByteTokenizer(), cls.special_tokens(cfg))
    return cls(cfg, spec.special_ids)


def test_span_corruption_batches_reassemble_to_their_windows():
    obj = objective("span_corruption", num_sentinels=20)
    data = run_data()
    batch = next(obj.train_batches(data))
    assert batch["inputs"].shape == (8, 16) and batch["targets"].shape == (8, obj.targets_length)
    assert (batch["inputs_segment_ids"] == 1).all() and (batch["targets_segment_ids"] == 1).all()  # one document
    stream = data.train.tokens
    for inp, tgt in zip(batch["inputs"], batch["targets"]):
        original = reassemble(inp, tgt, obj.sentinels)
        assert len(original) == obj.window_length()
        assert any(np.array_equal(stream[s:s + len(original)], original) for s in range(len(stream) - len(original)))
        assert (inp >= 259).any() and np.isin(inp[inp >= 259], obj.sentinels).all()


def test_denoising_targets_are_the_original_windows():
    obj = objective("denoising")
    batch = obj.eval_batches(run_data())[0]
    data = run_data()
    np.testing.assert_array_equal(batch["targets"][0], data.val.tokens[:16])
    assert (batch["inputs"] == obj.mask_id).any()


def test_ul2_inputs_start_with_a_mode_token():
    obj = objective("ul2", seq_len=96, num_sentinels=40)  # X-long spans average 32 tokens
    batch = next(obj.train_batches(run_data()))
    assert set(batch["inputs"][:, 0]) <= set(obj.mode_ids.values())


def test_mlm_loss_only_on_selected_positions():
    obj = objective("mlm")
    batch = next(obj.train_batches(run_data()))
    changed = batch["inputs"] != batch["targets"]
    assert not (changed & ~batch["loss_mask"]).any()  # nothing outside the selection is touched
    assert batch["loss_mask"].sum() == 8 * round(0.15 * 16)


class PrefixRecorder:
    """A stand-in decoder: records the prefix mask it is given, predicts uniformly."""

    def __call__(self, tokens, **kw):
        self.prefix = np.asarray(kw["prefix_mask"])
        return jax.numpy.zeros(tokens.shape + (259,))


def test_prefix_lm_eval_prefix_is_half_the_window():
    obj = objective("prefix_lm")
    batch = obj.eval_batches(run_data())[0]
    model = PrefixRecorder()
    _, aux = obj.loss_fn(model, batch, None)
    n = 16
    assert model.prefix.sum(axis=1).tolist() == [n // 2] * 8
    assert float(aux["weight"]) == 8 * (n - n // 2 + 1)  # the first suffix token onwards


def test_prefix_lm_draws_prefix_lengths_per_window_in_the_pipeline():
    obj = objective("prefix_lm", prefix_min=0.25, prefix_max=0.75)
    it = obj.train_batches(run_data())
    batches = [next(it) for _ in range(40)]
    lengths = np.concatenate([b["prefix_mask"].sum(axis=1) for b in batches])
    assert set(lengths.tolist()) == set(range(4, 13))  # uniform in [0.25, 0.75] x 16, every value seen
    batch = batches[0]
    assert batch["prefix_mask"].shape == batch["tokens"].shape == (8, 17)
    # a prefix is the first tokens of the window: the mask is a run from position 0
    np.testing.assert_array_equal(batch["prefix_mask"], np.arange(17) < lengths[:8, None])
    model = PrefixRecorder()
    _, aux = obj.loss_fn(model, batch, None)
    np.testing.assert_array_equal(model.prefix, batch["prefix_mask"][:, :-1])
    assert float(aux["weight"]) == (~batch["prefix_mask"][:, 1:]).sum()  # one document: every non-prefix target
    state = it.get_state()  # the draw is part of the batch: it resumes exactly
    after = next(it)
    again = obj.train_batches(run_data())
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["prefix_mask"], after["prefix_mask"])


@pytest.mark.parametrize("overrides,message", [
    (dict(num_sentinels=1), "objective.num_sentinels"),
    (dict(mean_span_length=400.0), "objective.mean_span_length"),
    (dict(noise_density=1.5), "objective.noise_density"),
])
def test_span_corruption_bad_settings_are_clear(overrides, message):
    from lmstack.data.sources import DataError

    with pytest.raises(DataError, match=message):
        obj = objective("span_corruption", seq_len=64, **overrides)
        next(obj.train_batches(run_data()))


def test_contrastive_bad_input_is_clear(tmp_path, capsys):
    from lmstack.cli import main

    code = main(["train", "code_search_contrastive:smoke=True", "--workdir", str(tmp_path / "a"),
                 "--config.train.batch_size=1", "--config.mesh.data=1", "--config.train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "train.batch_size=1: a contrastive batch needs at least 2 examples" in err[0]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "add two numbers", "document": "def add(a, b): return a + b"}\n'
                     '{"query": "negate", "code": "def neg(a): return -a"}\n')
    code = main(["train", "code_search_contrastive:smoke=True", "--workdir", str(tmp_path / "b"),
                 "--config.data.source=pairs_jsonl", f"--config.data.path={pairs}", "--config.train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"data.doc_field: {pairs}:2: no text field 'document' (fields: query, code)" in err[0]
    assert "set --config.data.doc_field=NAME" in err[0]
