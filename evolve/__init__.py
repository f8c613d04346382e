"""evolve: make LLM agents better from their own experience."""

__version__ = "0.1.0"
