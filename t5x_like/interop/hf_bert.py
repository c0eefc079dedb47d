"""Hugging Face converter: bert (being written)."""
