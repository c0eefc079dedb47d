"""Train state, optimisers, the train/eval steps and loop, checkpointing, metric writers."""
