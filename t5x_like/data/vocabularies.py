"""Vocabularies: SentencePiece trained on a corpus and cached, bytes, or a tokenizer file by path.

The project's own vocabularies keep T5's ids (pad 0, eos 1, unk 2, no bos) and 100 sentinel ids on
top, so span corruption can use ids vocab_size-1-k. A tokenizer file (a SentencePiece .model with
any special-token layout, a Hugging Face tokenizer.json, or a folder holding one: hf_tokenizer.py)
keeps its own ids, e.g. Llama's unk 0, bos 1, eos 2. Training is lazy (registering tasks never
trains) and cached under the data directory with a fingerprint of the corpus and the settings; it
runs single-threaded with the trainer's own randomness off, so every host that trains independently
gets byte-identical models (multi-threaded training perturbs the piece scores, which changes
tokenisation).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Callable, Optional, Union

import gin
import seqio
import sentencepiece as spm
import tensorflow as tf
from sentencepiece import sentencepiece_model_pb2

from t5x_like.data import corpus as corpus_lib
from t5x_like.data import embedded
from t5x_like.data import hf_tokenizer
from t5x_like.errors import UserError

DEFAULT_EXTRA_IDS = 100
DEFAULT_VOCAB_SIZE = 8000
MAX_TRAINING_SENTENCES = 400_000   # ~20 MB of lines: keeps training to about a minute on 2 cores
MAX_SENTENCE_CHARS = 4000          # SentencePiece drops longer lines; cut them instead
TRAINER_VERSION = 1

last_training_seconds: Optional[float] = None  # reported by benchmarks and tests


class VocabularyError(UserError):
    """A vocabulary that cannot be built or loaded; the message says what to do."""


def _training_sentences(corpus_name: str, max_sentences: int) -> list[str]:
    """Lines of the corpus' train split, every k-th one past the cap (deterministic, no RNG).

    Reading stops at 4x the cap, so a C4-sized corpus trains on the start of its (file-ordered)
    train split instead of being read in full.
    """
    corpus = corpus_lib.get_corpus(corpus_name)
    lines = []
    for doc in corpus.iter_documents("train"):
        for line in doc.split("\n"):
            line = line.strip()
            while line:
                lines.append(line[:MAX_SENTENCE_CHARS])
                line = line[MAX_SENTENCE_CHARS:]
        if len(lines) >= 4 * max_sentences:
            break
    stride = max(1, -(-len(lines) // max_sentences))
    return lines[::stride]


def _settings(vocab_size: int, model_type: str, byte_fallback: bool, character_coverage: float,
              max_sentences: int) -> dict:
    return {"vocab_size": vocab_size, "model_type": model_type, "byte_fallback": byte_fallback,
            "character_coverage": character_coverage, "max_sentences": max_sentences,
            "trainer_version": TRAINER_VERSION, "sentencepiece": spm.__version__}


def train_sentencepiece(corpus: str = corpus_lib.EMBEDDED, vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                        model_type: str = "unigram", byte_fallback: bool = True,
                        character_coverage: float = 0.9995,
                        max_sentences: int = MAX_TRAINING_SENTENCES) -> str:
    """Path of a SentencePiece model trained on `corpus` (cached; trained only when missing)."""
    # The first use of a vocabulary is often inside a tf.data map being traced (seqio's tokenize);
    # reading the corpus needs eager TF, which init_scope restores.
    with tf.init_scope():
        return _train_sentencepiece(corpus, vocab_size, model_type, byte_fallback, character_coverage,
                                    max_sentences)


def _train_sentencepiece(corpus, vocab_size, model_type, byte_fallback, character_coverage,
                         max_sentences) -> str:
    global last_training_seconds
    settings = _settings(vocab_size, model_type, byte_fallback, character_coverage, max_sentences)
    fingerprint_source = {"corpus": corpus, "corpus_fingerprint": corpus_lib.get_corpus(corpus).fingerprint(),
                          **settings}
    fingerprint = hashlib.sha256(json.dumps(fingerprint_source, sort_keys=True).encode()).hexdigest()
    folder = os.path.join(embedded.data_dir(), "vocabularies")
    path = os.path.join(folder, f"{corpus}-{model_type}{vocab_size}-{fingerprint[:16]}.model")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with embedded.exclusive_lock(path + ".lock"):
        if os.path.isfile(path):  # another process trained it while this one waited
            return path
        start = time.time()
        sentences = _training_sentences(corpus, max_sentences)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".train-") as tmp:
            prefix = os.path.join(tmp, "spm")
            try:
                with open(os.devnull, "w") as quiet:
                    spm.SentencePieceTrainer.train(
                        sentence_iterator=iter(sentences),
                        model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=byte_fallback,
                        character_coverage=character_coverage, num_threads=1,
                        shuffle_input_sentence=False, input_sentence_size=0,
                        max_sentence_length=4 * MAX_SENTENCE_CHARS + 16, minloglevel=2,
                        logstream=quiet)
            except RuntimeError as e:
                raise VocabularyError(
                    f"training a {vocab_size}-piece SentencePiece model on corpus {corpus!r} failed: "
                    f"{str(e).strip().splitlines()[-1]}; a small corpus needs a smaller vocab_size") from None
            proto = sentencepiece_model_pb2.ModelProto()
            with open(prefix + ".model", "rb") as f:
                proto.ParseFromString(f.read())
            proto.trainer_spec.model_prefix = ""  # the temp path would make hosts' files differ
            staged = os.path.join(tmp, "final.model")
            with open(staged, "wb") as f:
                f.write(proto.SerializeToString(deterministic=True))
            last_training_seconds = round(time.time() - start, 2)
            with open(path[:-len(".model")] + ".json", "w", encoding="utf-8") as f:
                json.dump({**fingerprint_source, "fingerprint": fingerprint,
                           "training_seconds": last_training_seconds}, f, indent=1, sort_keys=True)
            os.replace(staged, path)  # atomic: readers see no file or the whole model
    return path


class CorpusSentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A SentencePieceVocabulary whose model is trained on a corpus the first time it is used."""

    def __init__(self, corpus: str = corpus_lib.EMBEDDED, vocab_size: int = DEFAULT_VOCAB_SIZE,
                 extra_ids: int = DEFAULT_EXTRA_IDS, **train_kwargs):
        self.corpus = corpus
        self.spm_vocab_size = vocab_size
        self.train_kwargs = dict(train_kwargs)
        super().__init__("", extra_ids=extra_ids)

    def _ensure_trained(self) -> None:
        if not self._sentencepiece_model_file:
            self._sentencepiece_model_file = train_sentencepiece(
                self.corpus, self.spm_vocab_size, **self.train_kwargs)

    def _model_context(self):
        self._ensure_trained()
        return super()._model_context()

    @property
    def sentencepiece_model_file(self) -> str:
        self._ensure_trained()
        return self._sentencepiece_model_file

    def _config(self):
        return (self.corpus, self.spm_vocab_size, self.extra_ids, sorted(self.train_kwargs.items()))

    def __eq__(self, other):
        if isinstance(other, CorpusSentencePieceVocabulary):
            return self._config() == other._config()
        return isinstance(other, seqio.SentencePieceVocabulary) and \
            other.sentencepiece_model_file == self.sentencepiece_model_file and \
            other.extra_ids == self.extra_ids

    def __str__(self):
        return (f"CorpusSentencePieceVocabulary(corpus={self.corpus!r}, vocab_size={self.spm_vocab_size}, "
                f"extra_ids={self.extra_ids})")


@gin.configurable
def sentencepiece_vocabulary(corpus: str = corpus_lib.EMBEDDED, vocab_size: int = DEFAULT_VOCAB_SIZE,
                             extra_ids: int = DEFAULT_EXTRA_IDS, **train_kwargs) -> seqio.Vocabulary:
    """SentencePiece trained on `corpus` (lazily, cached); its vocab_size is vocab_size + extra_ids."""
    corpus_lib.get_corpus(corpus)  # unknown names fail now, not at the first batch
    return CorpusSentencePieceVocabulary(corpus, vocab_size, extra_ids, **train_kwargs)


@gin.configurable
def byte_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.Vocabulary:
    """Tokenizer-free: UTF-8 bytes (ids 3..258) after pad/eos/unk, plus sentinels."""
    return seqio.ByteVocabulary(extra_ids=extra_ids)


@gin.configurable
def vocabulary_from_file(path: str = gin.REQUIRED, extra_ids: Optional[int] = None) -> seqio.Vocabulary:
    """A tokenizer file: a SentencePiece .model with any special-token layout (T5's pad 0, eos 1,
    unk 2; Llama's / Mistral's unk 0, bos 1, eos 2, no pad), a Hugging Face tokenizer.json, or a
    folder holding one (hf_tokenizer.py says how special tokens are read and padding works).

    `extra_ids` (sentinels after the pieces) defaults to 100 for a T5-layout .model, as T5 has, and
    to 0 otherwise: an imported tokenizer's ids are exactly its model's. A tokenizer.json has none.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise VocabularyError(f"tokenizer file {path!r} does not exist; give the path of a local SentencePiece "
                              ".model, a tokenizer.json or a folder holding one (nothing is downloaded)")
    try:
        vocab = hf_tokenizer.load(path, extra_ids or 0)
        if extra_ids is None and isinstance(vocab, hf_tokenizer.SentencePieceModelVocabulary) and \
                (vocab.tokenizer_pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2):
            vocab = hf_tokenizer.load(path, DEFAULT_EXTRA_IDS)
    except hf_tokenizer.TokenizerFileError as e:
        raise VocabularyError(str(e)) from None
    return vocab


def leading_bos_id(vocab: seqio.Vocabulary) -> Optional[int]:
    """The BOS id a tokenizer puts in front of every text, as transformers' `tokenizer(text)` does
    (Llama: 1), or None: for tokenizers that add none (GPT-2, T5) and for this project's own
    vocabularies, whose decoder-only rows start from id 0 (seqio's convention)."""
    return vocab.bos_id if getattr(vocab, "add_bos", False) else None


def appends_eos(vocab: seqio.Vocabulary) -> bool:
    """Whether transformers' `tokenizer(text)` ends every text with EOS (Llama, GPT-2: no)."""
    return bool(getattr(vocab, "add_eos", False))


def zero_is_padding(vocab: seqio.Vocabulary) -> bool:
    """False when id 0 is a real token of the vocabulary's texts (Llama's <unk>, GPT-2's "!"), so
    padding must be told from text by position; True for this project's vocabularies and T5's."""
    return bool(getattr(vocab, "zero_is_padding", True))


# -------------------------------------------------------------------------------------- registry

VocabularyFactory = Callable[[], seqio.Vocabulary]
_FACTORIES: dict[str, VocabularyFactory] = {}
_INSTANCES: dict[str, seqio.Vocabulary] = {}
_LISTENERS: list[Callable[[str], None]] = []


def add_vocabulary_listener(callback: Callable[[str], None], replay: bool = True) -> None:
    """Call `callback(name)` for every vocabulary registered later, and now too if `replay`."""
    _LISTENERS.append(callback)
    for name in list(_FACTORIES) if replay else ():
        callback(name)


def register_vocabulary(name: str, vocabulary: Union[seqio.Vocabulary, VocabularyFactory],
                        overwrite: bool = False) -> None:
    """Name a vocabulary (or a zero-argument factory, called on first use) for task names."""
    if not isinstance(name, str) or not corpus_lib._NAME_RE.match(name):
        raise VocabularyError(f"vocabulary name {name!r} must be letters and digits joined by single "
                              "underscores (it becomes part of task names)")
    if name in _FACTORIES and not overwrite:
        raise VocabularyError(f"vocabulary {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = vocabulary if callable(vocabulary) and not isinstance(vocabulary, seqio.Vocabulary) \
        else (lambda v=vocabulary: v)
    _INSTANCES.pop(name, None)
    for callback in _LISTENERS:
        callback(name)


@gin.configurable
def register_vocabularies(vocabularies=gin.REQUIRED) -> list[str]:
    """One gin binding names vocabularies, e.g.
    `register_vocabularies.vocabularies = {"spm32k": @spm32k/sentencepiece_vocabulary()}`
    with `spm32k/sentencepiece_vocabulary.vocab_size = 32000`."""
    for name, vocab in dict(vocabularies).items():
        if name not in _FACTORIES or get_vocabulary(name) != vocab:
            register_vocabulary(name, vocab, overwrite=name in _FACTORIES)
    return list(vocabularies)


def get_vocabulary(name: str) -> seqio.Vocabulary:
    """The (shared) vocabulary object for a name, or for a tokenizer file or folder (`vocabulary_name`);
    creating it never trains a model."""
    if name not in _FACTORIES and _is_path(name):
        name = vocabulary_name(name)
    if name not in _FACTORIES:
        raise VocabularyError(f"no vocabulary named {name!r}; registered: {sorted(_FACTORIES)} (or give the path "
                              "of a SentencePiece .model, a tokenizer.json or a folder holding one)")
    if name not in _INSTANCES:
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


def vocabulary_names() -> list[str]:
    return sorted(_FACTORIES)


def _is_path(name_or_path: str) -> bool:
    return isinstance(name_or_path, str) and (
        name_or_path.endswith((".model", ".json")) or os.sep in name_or_path or name_or_path.startswith("~")
        or os.path.isdir(name_or_path))


def _builtin_names() -> str:
    return ", ".join(sorted(n for n in _FACTORIES if not n.startswith("file")))


def vocabulary_name(name_or_path: str) -> str:
    """A registered vocabulary's name as given; for a tokenizer file (a SentencePiece `.model` such as
    the spiece.model / tokenizer.model that came with a Hugging Face checkpoint, or a
    `tokenizer.json`) or a folder holding one (tokenizer.json first, as transformers' AutoTokenizer
    loads it, then tokenizer.model, spiece.model), the name it is registered under, derived from the
    file's absolute path, so every mode reads such a file the same way."""
    if name_or_path in _FACTORIES or not _is_path(name_or_path):
        return name_or_path
    path = os.path.abspath(os.path.expanduser(name_or_path))
    if os.path.isdir(path):
        found = hf_tokenizer.find_tokenizer_file(path)
        if found is None:
            raise VocabularyError(f"folder {name_or_path!r} holds no tokenizer.json, tokenizer.model or "
                                  "spiece.model; give a tokenizer file or a registered vocabulary "
                                  f"({_builtin_names()})")
        path = found
    elif not os.path.isfile(path):
        raise VocabularyError(f"tokenizer {name_or_path!r} does not exist; give a registered vocabulary "
                              f"({_builtin_names()}) or the path of a SentencePiece .model, a tokenizer.json or "
                              "a folder holding one")
    name = "file" + hashlib.sha1(path.encode()).hexdigest()[:12]
    if name not in _FACTORIES:
        register_vocabulary(name, vocabulary_from_file(path))
    return name


# Built-ins bypass the gin-configurable constructors so that bindings meant for users' vocabularies
# never change what "spm" and "byte" mean.
register_vocabulary("spm", lambda: CorpusSentencePieceVocabulary(corpus_lib.EMBEDDED, DEFAULT_VOCAB_SIZE))
register_vocabulary("byte", lambda: seqio.ByteVocabulary(extra_ids=DEFAULT_EXTRA_IDS))
