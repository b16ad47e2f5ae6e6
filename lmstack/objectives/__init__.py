# Importing the package registers every built-in objective (objective.NAME).
from lmstack.objectives import (  # noqa: F401
    causal_lm,
    classify,
    contrastive,
    denoising,
    dpo,
    grpo,
    mlm,
    ppo,
    prefix_lm,
    reward_model,
    sft,
    span_corruption,
    ul2,
)
