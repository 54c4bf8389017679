"""Data: data sets (synthetic clusters, character text), batching, the resumable sampler."""
