# registers eval.perplexity, eval.retrieval, eval.linear_probe, eval.multiple_choice, eval.generation, eval.gsm8k,
# eval.forgetting
from lmstack.evals import forgetting, generation, gsm8k, linear_probe, multiple_choice, perplexity, retrieval  # noqa: F401
