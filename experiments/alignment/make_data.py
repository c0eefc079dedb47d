"""Offline preference and SFT data from the embedded corpus (experiments/alignment/README.md).

    python experiments/alignment/make_data.py [--out runs/alignment_data]

Each example is a window of a prose sentence of the corpus (standard-library documentation): the
prompt is PROMPT_WORDS words, the chosen completion the next COMPLETION_WORDS words as written, the
rejected one the same words with one random pair of neighbours swapped. Chosen and rejected hold
the same words, so a model can prefer the chosen one only by local word order (not by word
frequency or length); a full shuffle was too easy (the pretrained model already ranked 97% right). Train pairs come from the
corpus's train split, held-out pairs from its validation split (documents never trained on).

Writes sft.jsonl ({"prompt", "response": chosen}, train split), prefs_train.jsonl and
prefs_dev.jsonl ({"prompt", "chosen", "rejected"}).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

from t5x_like.data.corpus import get_corpus

PROMPT_WORDS = 6
COMPLETION_WORDS = 6
WORD = re.compile(r"^[A-Za-z0-9][\w,;:'()\-/]*$")


def sentences(text: str):
    """Prose sentences of a document: lines of words joined, split at sentence ends."""
    for paragraph in text.split("\n\n"):
        flat = " ".join(paragraph.split())
        yield from re.split(r"(?<=[.!?])\s+", flat)


def sentence_pairs(sentence: str, rng: random.Random):
    """(prompt, chosen, rejected) of each window of a sentence of plain words (a long sentence gives
    several, PROMPT_WORDS apart)."""
    words = sentence.rstrip(".!?").split()
    if not all(WORD.match(w) for w in words):
        return
    for start in range(0, len(words) - PROMPT_WORDS - COMPLETION_WORDS + 1, PROMPT_WORDS):
        tail = words[start + PROMPT_WORDS:start + PROMPT_WORDS + COMPLETION_WORDS]
        swappable = [i for i in range(len(tail) - 1) if tail[i] != tail[i + 1]]
        if swappable:
            i = rng.choice(swappable)
            swapped = tail[:i] + [tail[i + 1], tail[i]] + tail[i + 2:]
            yield " ".join(words[start:start + PROMPT_WORDS]), " ".join(tail), " ".join(swapped)


def pairs(split: str, limit: int, seed: int):
    rng, seen, out = random.Random(seed), set(), []
    for doc in get_corpus("embedded").iter_documents(split):
        for p in (p for s in sentences(doc) for p in sentence_pairs(s, rng)):
            if p[0] not in seen:
                seen.add(p[0])
                out.append(p)
                if len(out) == limit:
                    return out
    return out


def write(path: str, rows) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/alignment_data")
    parser.add_argument("--train_pairs", type=int, default=4000)
    parser.add_argument("--dev_pairs", type=int, default=400)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    train, dev = pairs("train", args.train_pairs, 0), pairs("validation", args.dev_pairs, 1)
    write(os.path.join(args.out, "sft.jsonl"), [{"prompt": p, "response": c} for p, c, _ in train])
    for name, rows in (("prefs_train.jsonl", train), ("prefs_dev.jsonl", dev)):
        write(os.path.join(args.out, name), [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in rows])
    print(f"{len(train)} train and {len(dev)} held-out pairs in {args.out}; e.g. {json.dumps(dev[0])}")


if __name__ == "__main__":
    main()
