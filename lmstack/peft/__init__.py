"""Parameter-efficient fine-tuning: adapters and quantised base-weight storage.

The methods register themselves as ``peft.NAME`` when imported; ``lmstack.registry`` imports
them (this package imports nothing, so the model code can use ``nf4`` without a cycle).
"""
