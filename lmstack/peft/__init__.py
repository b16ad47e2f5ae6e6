"""Parameter-efficient fine-tuning: adapters and quantised base-weight storage."""

from lmstack.peft import base, lora  # noqa: F401  (registers peft.none, peft.lora)
