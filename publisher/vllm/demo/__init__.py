"""A tiny random-weight LLaVA and a demo run on the embedded defaults (no servers, no downloads)."""
