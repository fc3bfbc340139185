"""Data path: tokenizer training, raw text -> Arrow token shards, and the resumable loader."""
