"""Retrieval metrics against hand-computed ranks."""

import numpy as np

from lmstack.evals.retrieval import retrieval_metrics


def test_metrics_from_known_ranks():
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((20, 8))
    # query i is its document plus noise scaled so the relevant document is not always first
    queries = docs + rng.standard_normal((20, 8)) * np.linspace(0, 3, 20)[:, None]
    m = retrieval_metrics(queries, docs)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    dn = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    ranks = []
    for i in range(20):  # reference: sort and find where the relevant document lands
        order = sorted(range(20), key=lambda j: -(qn[i] @ dn[j]))
        ranks.append(order.index(i) + 1)
    ranks = np.array(ranks)
    assert ranks.min() == 1 and ranks.max() > 1  # the test covers both cases
    for k in (1, 5, 10):
        assert m[f"recall@{k}"] == np.mean(ranks <= k)
    np.testing.assert_allclose(m["mrr"], np.mean(1 / ranks))


def test_perfect_and_reversed():
    e = np.eye(6)
    assert retrieval_metrics(e, e) == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0}
    shifted = np.roll(e, 1, axis=0)  # query i matches document i-1 best, its own not at all
    m = retrieval_metrics(shifted, e)
    assert m["recall@1"] == 0.0 and m["recall@10"] == 1.0
