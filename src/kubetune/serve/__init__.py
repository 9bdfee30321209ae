"""Serving the fine-tuned model: an OpenAI-compatible endpoint, a web chat page and a terminal chat."""
