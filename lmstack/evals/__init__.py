from lmstack.evals import perplexity  # noqa: F401  (registers eval.perplexity)
