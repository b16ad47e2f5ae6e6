"""Contrastive two-tower training: in-batch softmax (InfoNCE) or sigmoid (SigLIP) losses.

Negatives come from the global batch: the step is compiled over global arrays, so the
query x document similarity matrix spans every example on every data-parallel device
(XLA gathers the embeddings across devices); a test checks the sharded loss and gradients
equal the single-device ones. Optional hard negatives are extra documents from the same
group (module) as the query.

Batches hold ``a_tokens``/``a_segment_ids`` (queries), ``b_tokens``/``b_segment_ids``
(documents) and, with ``objective.hard_negatives=H``, ``n_tokens``/``n_segment_ids`` of
shape (batch * H, seq_len). Segment id 1 marks tokens, 0 padding.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmstack.config import ConfigError
from lmstack.data.pairs import Pair, load_pairs, split_by_group
from lmstack.data.labelled import frame_text
from lmstack.registry import register

MAX_LOGIT_SCALE = 100.0


def _normalise(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def _candidates(b: jax.Array, valid: jax.Array, negatives: jax.Array | None):
    """Documents to rank: the batch's (then the hard negatives), and which of them are real."""
    if negatives is None:
        return _normalise(b), valid
    ones = jnp.ones((negatives.shape[0],), bool)
    return jnp.concatenate([_normalise(b), _normalise(negatives)]), jnp.concatenate([valid, ones])


def infonce_loss(a, b, log_scale, valid, negatives=None):
    """Symmetric in-batch softmax loss (CLIP): mean over queries->documents and
    documents->queries; the scale exp(log_scale) is clipped at 100. Rows with ``valid``
    false (batch padding) take no part. Returns (mean loss, top-1 accuracy) over valid rows."""
    a = _normalise(a)
    cand, cand_valid = _candidates(b, valid, negatives)
    scale = jnp.exp(jnp.minimum(log_scale, jnp.log(MAX_LOGIT_SCALE)))
    neg_inf = jnp.finfo(jnp.float32).min
    labels = jnp.arange(a.shape[0])
    logits_ab = jnp.where(cand_valid[None, :], scale * a @ cand.T, neg_inf)
    logits_ba = jnp.where(valid[None, :], scale * cand[: a.shape[0]] @ a.T, neg_inf)
    w = valid.astype(jnp.float32)
    ce = (optax.softmax_cross_entropy_with_integer_labels(logits_ab, labels)
          + optax.softmax_cross_entropy_with_integer_labels(logits_ba, labels))
    n = jnp.maximum(jnp.sum(w), 1.0)
    acc = jnp.sum(w * (jnp.argmax(logits_ab, axis=-1) == labels)) / n
    return 0.5 * jnp.sum(jnp.where(valid, ce, 0.0)) / n, acc


def sigmoid_loss(a, b, log_scale, bias, valid, negatives=None):
    """SigLIP: every (query, document) pair is a binary problem, positive on the diagonal;
    summed over documents, averaged over queries. Returns (loss, top-1 accuracy)."""
    a = _normalise(a)
    cand, cand_valid = _candidates(b, valid, negatives)
    logits = jnp.exp(log_scale) * a @ cand.T + bias
    signs = 2.0 * jnp.eye(a.shape[0], cand.shape[0]) - 1.0
    pair_w = (valid[:, None] & cand_valid[None, :]).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
    loss = -jnp.sum(jnp.where(pair_w > 0, jax.nn.log_sigmoid(signs * logits), 0.0)) / n
    hit = jnp.argmax(jnp.where(cand_valid[None, :], logits, -jnp.inf), axis=-1) == jnp.arange(a.shape[0])
    return loss, jnp.sum(valid * hit) / n


class _PairBatches:
    """Batch ``k`` of an endless, seeded sequence of epochs over the pairs (grain maps it)."""

    def __init__(self, pairs: list[tuple[np.ndarray, np.ndarray]], groups: list[str], batch_size: int,
                 seq_len: int, hard_negatives: int, seed: int):
        self.pairs, self.batch, self.seq_len, self.h, self.seed = pairs, batch_size, seq_len, hard_negatives, seed
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        self.same_group = [np.asarray(by_group[g]) for g in groups]

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        n = len(self.pairs)
        per_epoch = n // self.batch
        epoch, offset = divmod(k, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(n)
        rows = order[offset * self.batch:(offset + 1) * self.batch]
        out = stack_pairs([self.pairs[i] for i in rows], self.seq_len)
        if self.h:
            rng = np.random.default_rng([self.seed, epoch, offset, 1])
            negs = [self._negative(i, rng) for i in rows for _ in range(self.h)]
            out["n_tokens"], out["n_segment_ids"] = _pad([self.pairs[j][1] for j in negs], self.seq_len)
        return out

    def _negative(self, i: int, rng: np.random.Generator) -> int:
        pool = self.same_group[i][self.same_group[i] != i]
        if not len(pool):  # a group of one: any other pair
            pool = np.delete(np.arange(len(self.pairs)), i)
        return int(rng.choice(pool))


def _pad(seqs: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(seqs), seq_len), np.int32)
    segments = np.zeros((len(seqs), seq_len), np.int32)
    for r, s in enumerate(seqs):
        tokens[r, :len(s)] = s
        segments[r, :len(s)] = 1
    return tokens, segments


def stack_pairs(pairs: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    a_tokens, a_seg = _pad([p[0] for p in pairs], seq_len)
    b_tokens, b_seg = _pad([p[1] for p in pairs], seq_len)
    return {"a_tokens": a_tokens, "a_segment_ids": a_seg, "b_tokens": b_tokens, "b_segment_ids": b_seg}


@register("objective.contrastive")
class Contrastive:
    """Two-tower contrastive training on (query, document) pairs (``data.source`` =
    ``stdlib_pairs`` or ``pairs_jsonl``), split by group so evaluation groups are unseen.
    In-batch negatives tie every example's loss to the rest of the batch, so a batch split
    into microbatches would train on another loss: ``exact_microbatches`` is False."""

    exact_microbatches = False

    config_defaults = dict(
        loss="infonce",  # infonce (in-batch softmax, CLIP) | sigmoid (SigLIP)
        hard_negatives=0,  # extra same-group documents per query
    )
    config_choices = {"loss": ("infonce", "sigmoid")}

    def __init__(self, cfg: Any, special_ids: Mapping[str, int] | None = None):
        self.cfg = cfg
        self._split: tuple[list[Pair], list[Pair]] | None = None

    @classmethod
    def special_tokens(cls, cfg: Any) -> tuple[str, ...]:
        return ()

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """Settings this objective cannot train with, found at load time."""
        out = []
        if cfg.train.batch_size < 2:
            out.append(f"train.batch_size={cfg.train.batch_size}: a contrastive batch needs at least 2 examples "
                       f"(the others are the negatives): raise --config.train.batch_size")
        return out

    def _pairs(self) -> tuple[list[Pair], list[Pair]]:
        if self._split is None:
            c = self.cfg
            self._split = split_by_group(load_pairs(c.data), c.data.val_fraction, c.data.seed)
        return self._split

    def _encode(self, tokenizer: Any, pairs: list[Pair]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each text framed as a classifier's (:func:`lmstack.data.labelled.frame_text`: ``[CLS] text
        [SEP]`` for a BERT tokenizer, as sentence-transformers encodes it, else ``[bos] + text``, the
        first token CLS pooling reads), at most ``data.seq_len`` ids."""
        n = self.cfg.data.seq_len
        enc = lambda t: np.asarray(frame_text(t, tokenizer, n), np.int32)  # noqa: E731
        return [(enc(p.query), enc(p.document)) for p in pairs]

    def train_batches(self, data: Any) -> Iterator[dict]:
        c = self.cfg
        train, _ = self._pairs()
        if len(train) < c.train.batch_size:
            raise ConfigError(f"train.batch_size={c.train.batch_size} exceeds the {len(train)} training pairs: "
                              f"lower it or add data")
        fn = _PairBatches(self._encode(data.tokenizer, train), [p.group for p in train], c.train.batch_size,
                          c.data.seq_len, c.objective.hard_negatives, c.data.seed)
        ds = grain.MapDataset.range(sys.maxsize).map(fn)
        return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))

    def eval_batches(self, data: Any) -> list[dict]:
        """The held-out pairs in order, in full batches (the last padded with empty rows)."""
        c = self.cfg
        _, val = self._pairs()
        size = c.eval.batch_size or c.train.batch_size
        enc = self._encode(data.tokenizer, val)
        if c.eval.batches:
            enc = enc[: c.eval.batches * size]
        empty = (np.zeros(0, np.int32), np.zeros(0, np.int32))
        enc += [empty] * (-len(enc) % size)
        return [stack_pairs(enc[i:i + size], c.data.seq_len) for i in range(0, len(enc), size)]

    def loss_fn(self, model: Any, batch: dict[str, jax.Array], rng: jax.Array | None):
        a, b = model(batch["a_tokens"], batch["b_tokens"], a_segment_ids=batch["a_segment_ids"],
                     b_segment_ids=batch["b_segment_ids"], rng=rng)
        negatives = None
        if "n_tokens" in batch:
            negatives = model.embed(batch["n_tokens"], batch["n_segment_ids"], tower="b")
        real = jnp.any(batch["a_segment_ids"] > 0, axis=1)
        if self.cfg.objective.loss == "infonce":
            loss, acc = infonce_loss(a, b, model.logit_scale[...], real, negatives)
        else:
            loss, acc = sigmoid_loss(a, b, model.logit_scale[...], model.logit_bias[...], real, negatives)
        n = jnp.sum(real).astype(jnp.float32)
        return loss * n, {"weight": n, "accuracy": acc * n, "temperature": jnp.exp(-model.logit_scale[...]) * n}
