"""Model files of other projects in and out: Hugging Face safetensors (``hf``)."""
