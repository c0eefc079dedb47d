"""Process-level runtime: multi-host start-up and failure handling (`distributed.py`) and the
allocator re-exec of the CLI (`host_runtime.py`). Nothing is imported here: `host_runtime` must
run before JAX starts."""
