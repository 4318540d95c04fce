"""OpenAI-compatible HTTP serving on the engine (first part: chat completions, models, health)."""
