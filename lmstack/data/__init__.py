from lmstack.data import sources  # noqa: F401  (registers data.stdlib, data.text, data.jsonl)
