"""Linear probe: how linearly separable a downstream task is in the frozen model's features.

Features are the model's pooled outputs (``model.features(tokens, segment_ids)``); a
logistic regression (L2-regularised, standardised features, full-batch L-BFGS) is fitted on
a training subset and scored on the dev split. The default task is SST-2 sentiment, read
from ``config.eval.linear_probe.path`` (TSV with a header row: ``label<TAB>sentence``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmstack.data.sources import DataError
from lmstack.data.labelled import frame_text
from lmstack.evals.base import EvalContext, compiled_method
from lmstack.registry import register

# config.eval.linear_probe: a folder with train.tsv and dev.tsv, how many training sentences
# to fit on, the L2 strength, L-BFGS steps, and sentences per feature batch.
DEFAULTS = {"path": "../shared/data/sst2", "train_examples": 4000, "l2": 1e-3, "steps": 200, "batch_size": 64}


def read_tsv(path: Path) -> tuple[list[str], np.ndarray]:
    """(sentences, int labels) from a ``label<TAB>text`` file with a header row."""
    if not path.is_file():
        raise DataError(f"eval.linear_probe.path: no file {str(path)!r}: point it at a folder with train.tsv and dev.tsv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [r for r in rows if len(r) >= 2]
    return [r[1].strip() for r in rows], np.asarray([int(r[0]) for r in rows], np.int32)


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float, steps: int):
    """Weights (d+1, c) of a multinomial logistic regression, by L-BFGS on the mean loss."""
    xb = jnp.asarray(np.concatenate([x, np.ones((len(x), 1), x.dtype)], axis=1))
    yj = jnp.asarray(y)

    def loss(w):
        ce = optax.softmax_cross_entropy_with_integer_labels(xb @ w, yj).mean()
        return ce + 0.5 * l2 * jnp.sum(w[:-1] ** 2)

    opt = optax.lbfgs()
    w = jnp.zeros((xb.shape[1], n_classes), jnp.float32)
    state = opt.init(w)
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def step(w, state):
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(w, updates), state

    for _ in range(steps):
        w, state = step(w, state)
    return np.asarray(w)


def _features(model: Any, tokenizer: Any, texts: list[str], seq_len: int, batch_size: int) -> np.ndarray:
    embed = compiled_method(model, "features")
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        seg = np.zeros((batch_size, seq_len), np.int32)
        for r, t in enumerate(chunk):
            ids = frame_text(t, tokenizer, seq_len)
            tokens[r, :len(ids)], seg[r, :len(ids)] = ids, 1
        out.append(np.asarray(embed(tokens, seg), np.float32)[: len(chunk)])
    return np.concatenate(out)


def _problems(cfg) -> list[str]:
    """Found at load, not after training: the task files must be there."""
    root = Path(cfg.eval.linear_probe.path)
    missing = [n for n in ("train.tsv", "dev.tsv") if not (root / n).is_file()]
    if missing:
        return [f"eval.linear_probe.path={str(root)!r} has no {' or '.join(missing)}: point "
                f"--config.eval.linear_probe.path at a folder with train.tsv and dev.tsv (label<TAB>sentence)"]
    return []


@register("eval.linear_probe", config_defaults=DEFAULTS, config_problems=_problems)
def linear_probe(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Yields dev ``accuracy`` (and ``train_accuracy``) of a linear probe on frozen features."""
    settings = ctx.cfg.eval.linear_probe
    root = Path(settings["path"])
    train_x, train_y = read_tsv(root / "train.tsv")
    dev_x, dev_y = read_tsv(root / "dev.tsv")
    order = np.random.default_rng(0).permutation(len(train_x))[: settings["train_examples"]]
    train_x, train_y = [train_x[i] for i in order], train_y[order]
    model, tok, seq, bs = ctx.model(), ctx.data.tokenizer, ctx.cfg.data.seq_len, settings["batch_size"]
    f_train = _features(model, tok, train_x, seq, bs)
    f_dev = _features(model, tok, dev_x, seq, bs)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_dev = (f_train - mean) / std, (f_dev - mean) / std
    n_classes = int(max(train_y.max(), dev_y.max())) + 1
    w = fit_logistic_regression(f_train, train_y, n_classes, settings["l2"], settings["steps"])
    predict = lambda f: np.argmax(np.concatenate([f, np.ones((len(f), 1))], 1) @ w, axis=1)  # noqa: E731
    yield "accuracy", float(np.mean(predict(f_dev) == dev_y))
    yield "train_accuracy", float(np.mean(predict(f_train) == train_y))
