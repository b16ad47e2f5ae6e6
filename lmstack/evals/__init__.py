# registers eval.perplexity, eval.retrieval, eval.linear_probe
from lmstack.evals import linear_probe, perplexity, retrieval  # noqa: F401
