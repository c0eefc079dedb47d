"""An offline supervised task built from the embedded corpus: name the Python object a docstring
summary describes (`embedded_docstring_name_{vocabulary}`).

The embedded corpus writes each docstring under its qualified name ("json.dumps\\nSerialize obj
...", data/embedded.py). Every such block becomes one example: inputs "Name the Python object:
<first line of the docstring>", targets its short name ("dumps"). Splits follow the corpus's own
document split, so a validation example's docstring was never in the pretraining train split.
Metrics: exact match and chrF (data/metrics.py), for generate-and-score evaluation.
"""

from __future__ import annotations

import functools
import json
import re

import seqio
import tensorflow as tf

from t5x_like.data import embedded
from t5x_like.data import metrics
from t5x_like.data import vocabularies as vocab_lib

PROMPT = "Name the Python object: "
_QUALNAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
MIN_SUMMARY_CHARS = 20


def task_name(vocabulary: str) -> str:
    return f"embedded_docstring_name_{vocabulary}"


def blocks(text: str) -> list[tuple[str, str]]:
    """(qualified name, first docstring line) of each docstring block in a corpus document."""
    out = []
    for chunk in text.split("\n\n"):
        lines = chunk.split("\n")
        if len(lines) >= 2 and _QUALNAME.match(lines[0]) and len(lines[1].strip()) >= MIN_SUMMARY_CHARS:
            out.append((lines[0], lines[1].strip()))
    return out


@functools.lru_cache(maxsize=None)
def examples(split: str) -> tuple[tuple[str, str], ...]:
    """(inputs, targets) pairs of a split, in corpus order; a summary seen before is skipped."""
    seen, out = set(), []
    for path in embedded.shard_files(embedded.embedded_corpus_dir(), split):
        with open(path, encoding="utf-8") as f:
            for line in f:
                for qualname, summary in blocks(json.loads(line)["text"]):
                    if summary not in seen:
                        seen.add(summary)
                        out.append((PROMPT + summary, qualname.rsplit(".", 1)[1]))
    return tuple(out)


def _source(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    inputs, targets = zip(*examples(split))
    return tf.data.Dataset.from_tensor_slices({"inputs": list(inputs), "targets": list(targets)})


def register(vocabulary: str) -> str:
    vocab = vocab_lib.get_vocabulary(vocabulary)
    name = task_name(vocabulary)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=seqio.FunctionDataSource(_source, splits=("train", "validation")),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features={"inputs": seqio.Feature(vocab, add_eos=True), "targets": seqio.Feature(vocab, add_eos=True)},
        metric_fns=[metrics.exact_match, metrics.chrf])
    return name


vocab_lib.add_vocabulary_listener(register)
