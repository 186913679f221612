"""Backends: where generation happens (local transformers, or a remote OpenAI-compatible server)."""
