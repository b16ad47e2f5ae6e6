"""Parameter-efficient fine-tuning: adapters and quantised base-weight storage."""

from lmstack.peft import adapter, base, ia3, lora, prefix_tuning, prompt_tuning  # noqa: F401  (register peft.*)
