from lmstack.objectives import causal_lm  # noqa: F401  (registers objective.causal_lm)
