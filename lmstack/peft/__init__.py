"""Parameter-efficient fine-tuning: adapters and quantised base-weight storage."""
