"""Import and export of checkpoints from other frameworks."""
