"""Encoder objectives never attend across a document boundary: a window's documents carry
segment ids through the noising transform into the encoder and the decoder, so a
document's encoder states and target logits do not change when another document sharing
its window does (the decoder's own packed-document tests, run through each objective)."""

import numpy as np
import pytest
from flax import nnx

from lmstack.data.pipeline import TokenStream
from lmstack.data.tokenizers import ByteTokenizer
from lmstack.trainstate import model_factory
from tests.objectives.builders import build_objective, smoke_config, words

CASES = {  # name: (experiment, objective keys, tokens of the first document (None: a third of the window))
    "mlm": ("bert_mlm", {}, None),
    "mlm_whole_word": ("bert_mlm", {"whole_word": True}, None),
    "span_corruption": ("t5_span_corruption", {}, None),
    "denoising": ("bart_denoising", {}, None),
    "ul2": ("ul2", {}, None),
    # the S denoiser splits at 63 tokens: the second document lies wholly in the targets
    "ul2_prefix_only": ("ul2", {"mixing_rates": (0.0, 0.0, 0.0, 1.0)}, 70),
}


class Recorder:
    """Wraps the real model, keeping what the objective's loss saw: encoder states and logits."""

    def __init__(self, model):
        self.model = model

    def __call__(self, inputs, *args, **kw):
        if args:  # encoder-decoder: (inputs, decoder inputs)
            self.encoded = self.model.encode(inputs, segment_ids=kw["input_segment_ids"],
                                             positions=kw["input_positions"])
            self.logits = self.model(inputs, *args, **kw)
            return self.logits
        self.encoded = self.model(inputs, **kw)
        return self.encoded

    def lm_logits(self, hidden):
        self.logits = self.model.lm_logits(hidden)
        return self.logits


def other_letters(text: str) -> str:
    """The same words and sentences with other letters: same lengths, word starts, sentence ends."""
    return text.translate(str.maketrans("abcdefgh", "hgfedcba"))


def window(tokens_a, tokens_b):
    stream = TokenStream(np.concatenate([tokens_a, tokens_b]).astype(np.int32), np.array([0, len(tokens_a)]))
    return {k: v[0] for k, v in stream.windows(np.array([0]), len(stream)).items()}


def seen_by_loss(obj):
    """A function of (model, rows): the batch of ``rows``, and the encoder states and logits its
    loss is computed from (one compiled program for every batch of the same shapes)."""

    @nnx.jit
    def seen(model, batch):
        recorder = Recorder(model)
        obj.loss_fn(recorder, batch, None)
        return recorder.encoded, recorder.logits

    def run(model, rows):
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        encoded, logits = seen(model, batch)
        return batch, np.asarray(encoded), np.asarray(logits)

    return run


@pytest.mark.parametrize("case", list(CASES))
def test_a_document_is_blind_to_the_other_documents_of_its_window(case):
    experiment, keys, first_length = CASES[case]
    cfg = smoke_config(experiment, **keys)
    obj = build_objective(cfg)
    tok = ByteTokenizer()
    obj.bind(tok)
    n = obj.window_length()
    a_len = first_length or n // 3
    rng = np.random.default_rng(0)
    text_a, text_b = words(rng, 60), words(rng, 60)
    a = np.asarray([tok.bos_id] + tok.encode(text_a), np.int32)[:a_len]
    a_other = np.asarray([tok.bos_id] + tok.encode(other_letters(text_a)), np.int32)[:a_len]
    b = np.asarray([tok.bos_id] + tok.encode(text_b), np.int32)[:n - a_len]
    assert not np.array_equal(a, a_other) and len(a) + len(b) == n
    make_model, _ = model_factory(cfg, vocab_size=cfg.model.vocab_size)
    model = make_model()
    rows = [obj.transform(window(a, b), np.random.default_rng(seed)) for seed in range(8)]
    rows_other = [obj.transform(window(a_other, b), np.random.default_rng(seed)) for seed in range(8)]
    seen = seen_by_loss(obj)
    batch, encoded, logits = seen(model, rows)
    batch_other, encoded_other, logits_other = seen(model, rows_other)

    seq2seq = "targets_segment_ids" in batch
    in_seg = batch["inputs_segment_ids"] if seq2seq else batch["segment_ids"]
    out_seg = batch["targets_segment_ids"] if seq2seq else batch["segment_ids"]
    for k in batch:  # the noise is drawn the same way: only document 1's tokens differ
        if k not in ("inputs", "targets", "tokens"):
            np.testing.assert_array_equal(batch[k], batch_other[k], err_msg=k)
    assert (out_seg == 2).any() and (in_seg == 1).any()
    # document 2's encoder states and logits are exactly those it has beside the other document 1...
    np.testing.assert_allclose(encoded[in_seg == 2], encoded_other[in_seg == 2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(logits[out_seg == 2], logits_other[out_seg == 2], rtol=0, atol=1e-6)
    # ...while document 1's own change (so the check has teeth)
    assert np.abs(encoded[in_seg == 1] - encoded_other[in_seg == 1]).max() > 1e-3
    if case == "ul2_prefix_only":  # document 2 has no encoder tokens at all: it cross-attends to nothing
        assert not (in_seg == 2).any()
