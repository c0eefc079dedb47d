"""Process-level runtime: multi-host start-up and failure handling (`distributed.py`), the
allocator re-exec of the CLI (`host_runtime.py`) and its quiet start-up (`quiet_startup.py`).
Nothing is imported here: `host_runtime` and `quiet_startup` must run before JAX starts."""
