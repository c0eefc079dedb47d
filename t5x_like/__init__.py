"""t5x_like: JAX/Flax transformer language models from one CPU to a TPU pod."""
