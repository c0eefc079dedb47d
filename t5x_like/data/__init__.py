"""Data: corpora, vocabularies, seqio tasks for four objectives, resumable per-host iterators.

    import t5x_like.data as data
    it = data.get_iterator("embedded_span_corruption_spm", {"inputs": 512, "targets": 114}, batch_size=8)
    batch = next(it); state = it.state()          # ... later: it.restore(state)

Importing registers the embedded corpus and its tasks without building anything; the corpus and
the SentencePiece model are built, once, when the first dataset is requested.
"""

import tensorflow as _tf

try:  # TF only feeds data here: accelerators belong to JAX (and TF would reserve their memory)
    _tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; leave them as they are
    pass

from t5x_like.data.corpus import (Corpus, CorpusError, corpus_names, get_corpus, register_corpora,
                                  register_corpus)
from t5x_like.data.embedded import data_dir, embedded_corpus_dir, embedded_stats
from t5x_like.data.instructions import InstructionError, register_instruction_task
from t5x_like.data.iterators import DataIterator, get_dataset, get_iterator, host_shard_info
from t5x_like.data.tasks import (OBJECTIVES, MaskedLMFeatureConverter, check_task_feature_lengths,
                                 default_task_feature_lengths, feature_converter_for,
                                 feature_converter_for_task, info, mixture_name, register_mixture,
                                 register_tasks, task_name, task_names)
from t5x_like.data import docstring_task  # noqa: F401 (registers embedded_docstring_name_{vocabulary})
from t5x_like.data.vocabularies import (VocabularyError, byte_vocabulary, get_vocabulary,
                                        register_vocabularies, register_vocabulary,
                                        sentencepiece_vocabulary, train_sentencepiece,
                                        vocabulary_from_file, vocabulary_names)

__all__ = [
    "Corpus", "CorpusError", "corpus_names", "embedded_corpus_dir", "get_corpus", "register_corpora",
    "register_corpus", "data_dir", "embedded_stats", "DataIterator", "get_dataset", "get_iterator",
    "host_shard_info", "OBJECTIVES", "MaskedLMFeatureConverter",
    "check_task_feature_lengths", "default_task_feature_lengths", "feature_converter_for",
    "feature_converter_for_task", "info", "mixture_name", "register_mixture", "register_tasks",
    "task_name", "task_names", "VocabularyError", "byte_vocabulary", "get_vocabulary",
    "register_vocabularies", "register_vocabulary", "sentencepiece_vocabulary", "train_sentencepiece",
    "vocabulary_from_file", "vocabulary_names",
]
