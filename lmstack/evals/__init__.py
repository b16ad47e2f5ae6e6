from lmstack.evals import perplexity, retrieval  # noqa: F401  (registers eval.perplexity, eval.retrieval)
