"""A user's own seqio task, registered the way a T5X user would (`seqio.TaskRegistry.add` in a
module their gin file imports): reverse the order of three words, byte vocabulary."""

import seqio
import tensorflow as tf

from t5x_like.data import metrics, vocabularies

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def examples(split: str) -> list[tuple[str, str]]:
    offset = 0 if split == "train" else 5
    out = []
    for i in range(64 if split == "train" else 8):
        w = [WORDS[(i * 3 + offset + j) % len(WORDS)] for j in range(3)]
        out.append((" ".join(w), " ".join(reversed(w))))
    return out


def _source(split, shuffle_files=False, seed=None):
    inputs, targets = zip(*examples(split))
    return tf.data.Dataset.from_tensor_slices({"inputs": list(inputs), "targets": list(targets)})


VOCAB = vocabularies.get_vocabulary("byte")
seqio.TaskRegistry.remove("user_reverse_words")
seqio.TaskRegistry.add(
    "user_reverse_words",
    source=seqio.FunctionDataSource(_source, splits=("train", "validation")),
    preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
    output_features={"inputs": seqio.Feature(VOCAB, add_eos=True), "targets": seqio.Feature(VOCAB, add_eos=True)},
    metric_fns=[metrics.exact_match],
)
