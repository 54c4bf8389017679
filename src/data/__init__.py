"""Data: data sets (synthetic clusters, character text), batching and the resumable sampler/loader."""
