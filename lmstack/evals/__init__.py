# registers eval.perplexity, eval.retrieval, eval.linear_probe, eval.multiple_choice, eval.generation, eval.gsm8k,
# eval.classification, eval.forgetting, eval.pair_accuracy, eval.rollout_reward
from lmstack.evals import (classification, forgetting, generation, gsm8k, linear_probe, multiple_choice,  # noqa: F401
                           pair_accuracy, perplexity, retrieval, rollout_reward)
