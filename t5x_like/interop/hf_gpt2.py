"""Hugging Face converter: gpt2 (being written)."""
