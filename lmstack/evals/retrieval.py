"""Retrieval: rank every held-out document for every held-out query by cosine similarity.

Query ``i``'s relevant document is document ``i`` (held-out pairs, in order). Reports
recall@1/5/10 (the relevant document is among the top k) and MRR (mean reciprocal rank).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from lmstack.evals.base import EvalContext, compiled_method
from lmstack.registry import register


def retrieval_metrics(queries: np.ndarray, documents: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k and MRR of (n, d) query embeddings against (n, d) document embeddings."""
    q = queries / np.linalg.norm(queries, axis=-1, keepdims=True)
    d = documents / np.linalg.norm(documents, axis=-1, keepdims=True)
    scores = q @ d.T
    correct = np.diag(scores)[:, None]
    # rank = 1 + documents scoring strictly higher than the relevant one (ties favour it)
    rank = 1 + np.sum(scores > correct, axis=1)
    out = {f"recall@{k}": float(np.mean(rank <= k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / rank))
    return out


def _problems(cfg) -> list[str]:
    if cfg.objective.name != "contrastive":
        return [f"eval.names has retrieval, which embeds the held-out query/document pairs of objective.contrastive, "
                f"but objective.name is {cfg.objective.name!r}: drop retrieval from --config.eval.names"]
    return []


@register("eval.retrieval", config_problems=_problems)
def retrieval(ctx: EvalContext) -> Iterator[tuple[str, float]]:
    """Embeds the held-out pairs (``a_*`` queries, ``b_*`` documents) with the two-tower
    model and yields recall@1/5/10 and MRR over all of them."""
    model = ctx.model()
    embed_a, embed_b = compiled_method(model, "embed", tower="a"), compiled_method(model, "embed", tower="b")
    qs, ds = [], []
    for batch in ctx.batches:
        real = np.asarray(batch["a_segment_ids"]).any(axis=1)  # padding rows are all segment 0
        qs.append(np.asarray(embed_a(batch["a_tokens"], batch["a_segment_ids"]))[real])
        ds.append(np.asarray(embed_b(batch["b_tokens"], batch["b_segment_ids"]))[real])
    if qs:
        yield from retrieval_metrics(np.concatenate(qs), np.concatenate(ds)).items()
