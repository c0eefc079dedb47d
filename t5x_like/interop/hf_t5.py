"""Hugging Face converter: t5 (being written)."""
