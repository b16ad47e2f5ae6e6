# Importing the plug-in modules registers them: data.stdlib, data.text, data.jsonl (sources),
# tokenizer.byte, tokenizer.char, tokenizer.sentencepiece (tokenizers), tokenizer.hf (hf_tokenizer),
# format.NAME and data.NAME for each data format (formats).
from lmstack.data import formats, hf_tokenizer, sources, tokenizers  # noqa: F401
