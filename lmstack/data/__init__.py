# Importing the plug-in modules registers them: data.stdlib, data.text, data.jsonl (sources),
# tokenizer.byte, tokenizer.char, tokenizer.sentencepiece (tokenizers), tokenizer.hf (hf_tokenizer).
from lmstack.data import hf_tokenizer, sources, tokenizers  # noqa: F401
