"""``hf``: a PEFT (LoRA) run as Hugging Face files, and on request a merged model and GGUF.

- ``format``: ``HfFormat``, its options and the ``export_hf/`` layout; the adapter copied
  and checked byte for byte (no torch: listing the formats stays cheap)
- ``merge``: ``--merge``: the base reloaded in bf16/fp16/fp32 (never 4-bit), the adapter
  merged in, saved as safetensors shards + tokenizer + generation config, then loaded back
  and compared with the adapter model on random tokens (imports transformers and peft)
- ``gguf``: ``--gguf``: llama.cpp's ``convert_hf_to_gguf.py`` from a checkout the user
  names, run on the merged model
"""
