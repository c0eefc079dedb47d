"""Vocabularies: T5 ids, sentinels, round trips, lazy cached training, byte and file vocabularies."""

import os

import numpy as np
import pytest
import sentencepiece as spm

import t5x_like.data as data
from t5x_like.data import vocabularies as vocab_lib

TEXT = "The quick brown fox jumps over the lazy dog; return the value of x."


def test_sentencepiece_on_embedded_corpus_has_t5_ids_and_sentinels():
    vocab = data.get_vocabulary("spm")
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.tokenizer.bos_id() == -1
    assert vocab.vocab_size == vocab_lib.DEFAULT_VOCAB_SIZE + 100 and vocab.extra_ids == 100
    ids = vocab.encode(TEXT)
    assert vocab.decode(ids) == TEXT
    assert max(ids) < vocab.vocab_size - 100 and 0 not in ids and 1 not in ids
    assert list(vocab.encode_tf(TEXT).numpy()) == ids
    unicode_text = "naïve café — 東京"
    assert vocab.decode(vocab.encode(unicode_text)) == unicode_text  # byte fallback: no unk
    # Sentinel k is vocab_size - 1 - k, above every trained piece.
    assert vocab.tokenizer.id_to_piece(vocab.vocab_size - 1) .endswith("<extra_id_0>")
    assert vocab.tokenizer.id_to_piece(vocab.vocab_size - 100) .endswith("<extra_id_99>")


def test_training_is_cached_and_lazy(monkeypatch, tmp_path):
    path = data.get_vocabulary("spm").sentencepiece_model_file
    mtime = os.stat(path).st_mtime_ns
    fresh = data.sentencepiece_vocabulary("embedded", vocab_lib.DEFAULT_VOCAB_SIZE)
    assert fresh.sentencepiece_model_file == path and os.stat(path).st_mtime_ns == mtime
    # Creating a vocabulary (and tasks with it) trains nothing until it is used.
    lazy = data.sentencepiece_vocabulary("embedded", 3000)
    data.register_vocabulary("spm3k", lazy, overwrite=True)
    assert "embedded_lm_spm3k" in data.task_names()
    assert not any("unigram3000" in n for n in os.listdir(os.path.dirname(path)))
    assert lazy == data.sentencepiece_vocabulary("embedded", 3000)


def test_training_is_deterministic_across_hosts(monkeypatch, tmp_path):
    first = open(data.get_vocabulary("spm").sentencepiece_model_file, "rb").read()
    monkeypatch.setenv("T5X_LIKE_DATA_DIR", str(tmp_path))  # another host's cache
    again = vocab_lib.train_sentencepiece("embedded", vocab_lib.DEFAULT_VOCAB_SIZE)
    assert again.startswith(str(tmp_path)) and open(again, "rb").read() == first
    assert 0 < vocab_lib.last_training_seconds < 60


def test_byte_vocabulary():
    vocab = data.byte_vocabulary()
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.vocab_size) == (0, 1, 2, 3 + 256 + 100)
    assert vocab.decode(vocab.encode("héllo")) == "héllo"
    assert data.get_vocabulary("byte").vocab_size == 359


def test_vocabulary_from_file(tmp_path, write_file):
    with pytest.raises(vocab_lib.VocabularyError, match="does not exist"):
        data.vocabulary_from_file(str(tmp_path / "missing.model"))
    path = data.get_vocabulary("spm").sentencepiece_model_file
    vocab = data.vocabulary_from_file(path)
    assert vocab.vocab_size == vocab_lib.DEFAULT_VOCAB_SIZE + 100 and vocab.decode(vocab.encode(TEXT)) == TEXT
    # A model with SentencePiece's default ids (unk 0, bos 1, eos 2, no pad: Llama's layout) keeps
    # them, without sentinels (tests/data/test_hf_tokenizers.py has the rest).
    lines = "\n".join(f"sentence {i} about words and more words" for i in range(300))
    text = write_file("small.txt", lines.encode())
    spm.SentencePieceTrainer.train(input=text, model_prefix=str(tmp_path / "default"), vocab_size=40,
                                   logstream=open(os.devnull, "w"))
    default = data.vocabulary_from_file(str(tmp_path / "default.model"))
    assert (default.unk_id, default.bos_id, default.eos_id, default.pad_id) == (0, 1, 2, 0)
    assert default.tokenizer_pad_id is None and default.vocab_size == 40
    assert default.decode(default.encode("sentence 7 about words")) == "sentence 7 about words"
    with pytest.raises(vocab_lib.VocabularyError, match="not a SentencePiece model"):
        data.vocabulary_from_file(write_file("junk.model", b"not a model"))


def test_vocab_too_large_for_corpus_is_a_clear_error(write_file):
    path = write_file("tiny.txt", b"a tiny corpus\nwith few words\n")
    data.register_corpus("tinyvocab", text_glob=path, overwrite=True)
    with pytest.raises(vocab_lib.VocabularyError, match="smaller vocab_size"):
        vocab_lib.train_sentencepiece("tinyvocab", 5000)
    with pytest.raises(data.CorpusError, match="no corpus named"):
        data.sentencepiece_vocabulary("no_such_corpus")


def test_registry_errors():
    with pytest.raises(vocab_lib.VocabularyError, match="no vocabulary named"):
        data.get_vocabulary("nope")
    with pytest.raises(vocab_lib.VocabularyError, match="already registered"):
        data.register_vocabulary("byte", data.byte_vocabulary())
    assert np.array_equal(data.get_vocabulary("byte").encode("a"), [100])
