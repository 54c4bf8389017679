"""Data: data sets (synthetic clusters, character text, chat and preference JSONL for LLM
fine-tuning), batching, the resumable sampler."""
