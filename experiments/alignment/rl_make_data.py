"""SFT data for the RL part of the alignment experiment (experiments/alignment/README.md, "GRPO and PPO").

    python experiments/alignment/rl_make_data.py [--out runs/alignment_rl_data] [--count 600]

Writes sft.jsonl: {"prompt": "a+b=", "response": "c"} for `count` sums of the train split of
`t5x_like.data.verifiable.arithmetic_prompts` (operands 0..50). The RL runs draw their prompts from
the same train split and are scored on its held-out validation split (sums never trained on).
"""

from __future__ import annotations

import argparse
import json
import os

from t5x_like.data.verifiable import arithmetic_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/alignment_rl_data")
    parser.add_argument("--count", type=int, default=600)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sft.jsonl")
    with open(path, "w") as f:
        for r in arithmetic_prompts("train", count=args.count, max_operand=50):
            f.write(json.dumps({"prompt": r["prompt"], "response": r["answer"]}) + "\n")
    print(path)


if __name__ == "__main__":
    main()
