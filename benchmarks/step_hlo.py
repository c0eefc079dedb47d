"""Fingerprint of the compiled train step, to prove that a refactor leaves the computation unchanged.

    python benchmarks/step_hlo.py [--families decoder_only,encoder_decoder] [--dtypes float32,bfloat16]
                                  [--layers 6] [--out DIR]

Builds train_step.py's medium models (same config, batch and AdamW), compiles the t5x_like train
step and prints, per family and dtype, a hash of XLA's optimized HLO with source locations and
stack frames removed (they name files and lines, which a refactor moves). Run it in two checkouts
(`git worktree add /tmp/old REV; cd /tmp/old && PYTHONPATH=/tmp/old python benchmarks/step_hlo.py`):
equal hashes mean the same program, hence the same speed, which timing on a shared 2-core machine
(+-20% between runs) cannot show to within a few percent. `--out` keeps the normalised HLO to diff.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def normalized_hlo(text: str) -> str:
    """HLO text without metadata, stack-frame ids and the file / function / frame tables."""
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r",? ?stack_frame_id=\d+", "", text)
    text = re.sub(r"^HloModule \S+", "HloModule step", text, flags=re.M)
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"^(\d+ |FileNames|FunctionNames|FileLocations|StackFrames)", line))


def step_hlo(family: str, dtype: str) -> str:
    import jax

    import train_step as bench
    from t5x_like.training import optimizers, steps as steps_lib
    from t5x_like.training.train_state import TrainState

    model = bench.medium_model(family, dtype)
    batch = bench.make_batch(family)
    variables = model.init_variables(jax.random.key(0), {k: v[:1] for k, v in batch.items()})
    optimizer = optimizers.adamw(peak_learning_rate=1e-4, warmup_steps=10, decay_steps=1000)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=variables["params"],
                       opt_state=optimizer.init(variables["params"]), rng=jax.random.key_data(jax.random.key(0)))
    compiled = steps_lib.make_train_step(model, optimizer, dropout=False).lower(state, batch).compile()
    return normalized_hlo(compiled.as_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="decoder_only,encoder_decoder")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layers", type=int, default=None, help="override train_step.py's layer count")
    p.add_argument("--out", help="folder to write each normalised HLO into")
    args = p.parse_args()
    import train_step as bench
    if args.layers:
        bench.LAYERS = args.layers
    for family in args.families.split(","):
        for dtype in args.dtypes.split(","):
            text = step_hlo(family, dtype)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                with open(os.path.join(args.out, f"{family}_{dtype}.hlo"), "w") as f:
                    f.write(text)
            instructions = len(re.findall(r"^\s+\S+ = ", text, flags=re.M))
            print(f"{family:16} {dtype:9} {hashlib.sha1(text.encode()).hexdigest()[:16]}  "
                  f"{instructions} instructions", flush=True)


if __name__ == "__main__":
    main()
