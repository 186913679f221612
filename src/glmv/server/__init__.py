"""The OpenAI-compatible HTTP server (glmv serve)."""
