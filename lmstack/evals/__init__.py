# registers eval.perplexity, eval.retrieval, eval.linear_probe, eval.multiple_choice, eval.generation, eval.gsm8k
from lmstack.evals import generation, gsm8k, linear_probe, multiple_choice, perplexity, retrieval  # noqa: F401
