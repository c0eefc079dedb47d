"""Hugging Face converter: llama (being written)."""
