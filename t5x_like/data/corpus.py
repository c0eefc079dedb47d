"""Corpora: where documents come from, and the seqio data sources that stream them per host.

A corpus yields plain-text documents, `{"text": ...}`, per split: the embedded default, users'
text or JSONL files (streamed per host by `documents.DocumentFileSource`, which shards by file), or
a TFDS dataset prepared elsewhere, read through seqio.TfdsDataSource in read-only mode: nothing
here ever downloads. Registering a corpus is cheap and lazy; tasks follow through a listener.
"""

from __future__ import annotations

import abc
import collections
import glob as globlib
import hashlib
import json
import logging
import os
import re
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from t5x_like.data import documents, embedded
from t5x_like.errors import UserError

DOCUMENT_FORMATS = ("line", "blank_line", "jsonl")
ON_BAD_TEXT = ("error", "replace")
DEFAULT_MAX_BAD_FRACTION = 0.01   # JSONL lines that may fail (without max_bad_lines) before a read fails
DEFAULT_MAX_DOCUMENT_CHARS = documents.DEFAULT_MAX_DOCUMENT_CHARS
EMBEDDED = "embedded"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*$")
_HASH_BUCKETS = 1_000_000

Globs = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]
STAT_FIELDS = documents.STAT_FIELDS
log = logging.getLogger(__name__)
_warned: set = set()


class CorpusError(UserError):
    """A corpus that cannot be used; the message names the corpus, the path and the fix."""


# --------------------------------------------------------------------------------------- corpora


class Corpus(abc.ABC):
    """A named source of documents per split."""

    def __init__(self, name: str):
        self.name = name
        self._source: Optional[seqio.DataSource] = None

    @property
    @abc.abstractmethod
    def splits(self) -> tuple[str, ...]:
        ...

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Changes when the documents may have changed (keys cached vocabularies)."""

    @abc.abstractmethod
    def _make_source(self) -> seqio.DataSource:
        ...

    def source(self) -> seqio.DataSource:
        if self._source is None:
            self._source = self._make_source()
        return self._source

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise CorpusError(f"corpus {self.name!r} has no split {split!r}; it has {list(self.splits)}")

    def iter_documents(self, split: str) -> Iterator[str]:
        """Every document of a split, in file order, exactly as the training stream sees them."""
        ds = self.source().get_dataset(split, shuffle=False, seed=0)
        for ex in ds.as_numpy_iterator():
            yield ex["text"].decode("utf-8")

    def stats(self, split: str) -> dict:
        """Documents and characters of a split, from one pass over the stream."""
        counts = collections.Counter()
        for text in self.iter_documents(split):
            counts["documents"] += 1
            counts["characters"] += len(text)
        return {f: counts[f] for f in STAT_FIELDS}


class FileCorpus(Corpus):
    """Documents in local files: one per line, separated by blank lines, or JSONL records.

    Every file is inspected before it is streamed (`check_file`): a binary file is refused; text
    that is not UTF-8 is refused, or with `on_bad_text="replace"` repaired with U+FFFD and a
    warning; JSONL lines that are not records with the text field are skipped with a warning
    naming them (file:line), and fail the read when more than `max_bad_lines` (default: 1% of the
    file's lines).
    """

    def __init__(self, name: str, split_globs: Mapping[str, Sequence[str]], fmt: str,
                 text_field: str = "text", max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
                 validation_fraction: float = 0.0, on_bad_text: str = "error",
                 max_bad_lines: Optional[int] = None):
        super().__init__(name)
        if fmt not in DOCUMENT_FORMATS:
            raise CorpusError(f"corpus {name!r}: documents={fmt!r} is not one of {DOCUMENT_FORMATS}")
        if max_document_chars < 1:
            raise CorpusError(f"corpus {name!r}: max_document_chars must be >= 1, got {max_document_chars}")
        if on_bad_text not in ON_BAD_TEXT:
            raise CorpusError(f"corpus {name!r}: on_bad_text={on_bad_text!r} is not one of {ON_BAD_TEXT} "
                              "('error' refuses text that is not UTF-8, 'replace' repairs it with U+FFFD)")
        if max_bad_lines is not None and (isinstance(max_bad_lines, bool) or not isinstance(max_bad_lines, int)
                                          or max_bad_lines < 0):
            raise CorpusError(f"corpus {name!r}: max_bad_lines must be None (1% of a file's lines) or an "
                              f"integer >= 0, got {max_bad_lines!r}")
        self.on_bad_text = on_bad_text
        self.max_bad_lines = max_bad_lines
        self.split_globs = {s: tuple(g) for s, g in split_globs.items()}
        self.format = fmt
        self.text_field = text_field
        self.max_document_chars = max_document_chars
        self.validation_fraction = validation_fraction
        self._usable: set[str] = set()

    @property
    def splits(self) -> tuple[str, ...]:
        if self.validation_fraction > 0:
            return ("train", "validation")
        return tuple(self.split_globs)

    def _globs(self, split: str) -> tuple[str, ...]:
        self.check_split(split)
        if self.validation_fraction > 0:
            return tuple(g for gs in self.split_globs.values() for g in gs)
        return self.split_globs[split]

    def files(self, split: str) -> list[str]:
        """Sorted files of a split: the shards hosts divide among themselves."""
        patterns = self._globs(split)
        found = sorted({os.path.abspath(p) for g in patterns for p in globlib.glob(os.path.expanduser(g))
                        if os.path.isfile(p)})
        if not found:
            raise CorpusError(
                f"corpus {self.name!r} split {split!r}: no file matches {list(patterns)}; check the path "
                "(globs like /data/wiki/*.txt are expanded on each host) or register the corpus again")
        return found

    def check_file(self, path: str) -> dict:
        """Refuse a file the stream should not read (CorpusError naming the file, the count and the
        fix), warn once about what it repairs or skips; returns `documents.inspect_file`'s record."""
        folder = os.path.join(embedded.data_dir(), "prepared")
        r = documents.inspect_file_cached(path, self.format, self.text_field, folder)
        where = f"corpus {self.name!r}: {path}"
        if r["binary"]:
            raise CorpusError(
                f"{where} looks binary, not text ({r['nul_bytes']} NUL and "
                f"{r['control_bytes'] - r['nul_bytes']} other control bytes in {r['bytes']} bytes); point it at "
                "UTF-8 text files (a UTF-16 text file looks like this too: convert it with "
                "iconv -f utf-16 -t utf-8)")
        warnings = []
        if r["invalid_lines"]:
            at = ", ".join(f"{path}:{n}" for n in r["invalid_at"]) + (
                ", ..." if r["invalid_lines"] > len(r["invalid_at"]) else "")
            bad = (f"{r['invalid_bytes']} {'bytes or lone surrogate escapes' if self.format == 'jsonl' else 'bytes'}"
                   " that are not UTF-8")
            lines = f"{r['invalid_lines']} of {r['lines']} lines"
            if self.on_bad_text == "error":
                raise CorpusError(
                    f"{where} is not valid UTF-8 text: {lines} hold {bad} (at {at}); convert it to UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8), or have them replaced by U+FFFD with "
                    "register_corpus(..., on_bad_text='replace') (eval of a file: "
                    "--gin.text_file_task.on_bad_text=\"'replace'\")")
            warnings.append(f"replaced {bad} in {lines} with U+FFFD (at {at})")
        if r["bad_records"]:
            limit = (self.max_bad_lines if self.max_bad_lines is not None
                     else int(DEFAULT_MAX_BAD_FRACTION * r["records"]))
            at = ", ".join(f"{path}:{n} ({why})" for n, why in r["bad_at"]) + (
                ", ..." if r["bad_records"] > len(r["bad_at"]) else "")
            lines = f"{r['bad_records']} of {r['records']} JSONL lines"
            bad = f"not JSON objects with a string {self.text_field!r} field (at {at})"
            if r["bad_records"] > limit:
                allowed = (f"max_bad_lines={self.max_bad_lines}" if self.max_bad_lines is not None
                           else f"{DEFAULT_MAX_BAD_FRACTION:.0%} of its lines")
                raise CorpusError(
                    f"{where}: {lines} are {bad}, more than the {limit} allowed ({allowed}); fix the file "
                    "or text_field, or allow more with register_corpus(..., max_bad_lines=N) (eval of a "
                    "file: --gin.text_file_task.max_bad_lines=N)")
            warnings.append(f"skipped {lines} that are {bad}")
        key = (self.name, path, json.dumps(r, sort_keys=True), self.on_bad_text)
        if warnings and key not in _warned:
            _warned.add(key)
            log.warning("%s: %s", where, "; ".join(warnings))
        return r

    def prepared_file(self, path: str) -> str:
        """The file the stream reads, once `check_file` accepts `path`: the file itself, or for
        JSONL a cached TFRecord of its cleaned documents (built on first use)."""
        self.check_file(path)
        if self.format != "jsonl":
            return path
        return documents.prepare_jsonl(path, self.text_field, self.max_document_chars,
                                       os.path.join(embedded.data_dir(), "prepared"))

    def bad_data_counts(self, split: str) -> dict:
        """Skipped empty documents, invalid UTF-8, unparseable JSONL records, chunked documents,
        over the files of a split (both hash-made splits read the same files)."""
        total = collections.Counter()
        for path in self.files(split):
            total.update(documents.scan_file(path, self.format, self.text_field, self.max_document_chars))
        return {f: total[f] for f in ("skipped_empty", "invalid_utf8", "bad_records", "chunked")}

    def stats(self, split: str) -> dict:
        return {**super().stats(split), **self.bad_data_counts(split)}

    def keep_in_split(self, texts: tf.data.Dataset, split: str) -> tf.data.Dataset:
        """The hash split that `validation_fraction` asks for (FarmHash: same on every host)."""
        if self.validation_fraction <= 0:
            return texts
        threshold = int(round(self.validation_fraction * _HASH_BUCKETS))
        want_validation = split == "validation"
        return texts.filter(lambda t: tf.equal(
            tf.strings.to_hash_bucket_fast(t, _HASH_BUCKETS) < threshold, want_validation))

    def read_file(self, path: tf.Tensor) -> tf.data.Dataset:
        if self.format == "line":
            return tf.data.TextLineDataset(path)
        if self.format == "blank_line":
            return documents.blank_line_documents(path)
        return tf.data.TFRecordDataset(path)

    def check_usable(self, split: str, shard_info: Optional[seqio.ShardInfo] = None) -> None:
        """Fail early, with one message, when a split holds no usable text at all (looking at this
        host's files first, which is all it reads when the corpus is fine)."""
        if split in self._usable:
            return
        source = self.source()
        for shard in ((shard_info, None) if shard_info else (None,)):
            if any(True for _ in source.documents(split, False, 0, shard).take(1)):
                self._usable.add(split)
                return
        c = self.bad_data_counts(split)
        files = self.files(split)
        what = {"jsonl": f"JSONL records with a string {self.text_field!r} field",
                "line": "non-empty lines", "blank_line": "non-empty blank-line separated documents"}
        hashed = ", and the validation_fraction hash split left none here" if self.validation_fraction else ""
        raise CorpusError(
            f"corpus {self.name!r} split {split!r} has no usable text: its {len(files)} file(s) "
            f"{files[:3]}{'...' if len(files) > 3 else ''} hold no {what[self.format]} (skipped "
            f"{c['skipped_empty']} empty, {c['bad_records']} bad records{hashed}); point the corpus "
            "at files with text, or fix text_field/documents")

    def fingerprint(self) -> str:
        files = [(p, os.path.getsize(p), os.stat(p).st_mtime_ns)
                 for s in self.splits for p in self.files(s)]
        spec = [self.format, self.text_field, self.max_document_chars, self.validation_fraction, files]
        return hashlib.sha256(json.dumps(spec).encode()).hexdigest()

    def _make_source(self) -> seqio.DataSource:
        return documents.DocumentFileSource(self)


class EmbeddedCorpus(FileCorpus):
    """Standard-library docstrings and pydoc topics, built on first read (never on registration)."""

    def __init__(self, name: str = EMBEDDED):
        super().__init__(name, {"train": (), "validation": ()}, "jsonl")

    def files(self, split: str) -> list[str]:
        self.check_split(split)
        return embedded.shard_files(embedded.embedded_corpus_dir(), split)

    def fingerprint(self) -> str:
        return embedded.read_fingerprint(embedded.embedded_corpus_dir())["content_sha256"]


class TfdsCorpus(Corpus):
    """A TFDS dataset prepared elsewhere (C4, wikitext, ...), read from its data_dir read-only."""

    def __init__(self, name: str, tfds_name: str, tfds_data_dir: Optional[str],
                 split_map: Optional[Mapping[str, str]], text_field: str,
                 max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS):
        super().__init__(name)
        self.tfds_name = tfds_name
        self.tfds_data_dir = tfds_data_dir
        self.split_map = dict(split_map) if split_map else None
        self.text_field = text_field
        self.max_document_chars = max_document_chars
        self._checked = False

    @property
    def splits(self) -> tuple[str, ...]:
        if self.split_map:
            return tuple(self.split_map)
        return tuple(self._builder().info.splits)

    def _builder(self):
        import tensorflow_datasets as tfds

        hint = ("prepare it on a machine with network access (`tfds build` or "
                "`tfds.builder(name).download_and_prepare()`), copy the data_dir here, and pass "
                "tfds_data_dir; this project never downloads")
        try:
            builder = tfds.builder(self.tfds_name, data_dir=self.tfds_data_dir)
        except Exception as e:  # noqa: BLE001 (tfds raises many types for unknown names/dirs)
            raise CorpusError(f"corpus {self.name!r}: TFDS dataset {self.tfds_name!r} cannot be "
                              f"opened from {self.tfds_data_dir!r} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from None
        if not self._checked:
            prepared = getattr(builder, "is_prepared", None)
            ok = prepared() if prepared else os.path.isdir(builder.data_dir)
            if not ok:
                raise CorpusError(f"corpus {self.name!r}: TFDS dataset {self.tfds_name!r} is not "
                                  f"prepared under {self.tfds_data_dir!r}; {hint}")
            self._checked = True
        return builder

    def fingerprint(self) -> str:
        spec = [self.tfds_name, os.path.abspath(self.tfds_data_dir or ""), self.split_map,
                self.text_field, self.max_document_chars]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def _make_source(self) -> seqio.DataSource:
        return TfdsTextSource(self)


class TfdsTextSource(seqio.TfdsDataSource):
    """TfdsDataSource that checks the data is prepared, then yields cleaned {"text"} documents."""

    def __init__(self, corpus: TfdsCorpus):
        self._corpus = corpus
        super().__init__(tfds_name=corpus.tfds_name, tfds_data_dir=corpus.tfds_data_dir,
                         splits=corpus.split_map, read_only=True, caching_permitted=False)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        corpus = self._corpus
        corpus._builder()  # clear error when missing or not prepared
        corpus.check_split(split)
        ds = super().get_dataset(split, shuffle=shuffle, seed=seed, shard_info=shard_info)
        field = corpus.text_field
        if field not in ds.element_spec:
            raise CorpusError(f"corpus {corpus.name!r}: TFDS examples have no {field!r} feature "
                              f"(they have {sorted(ds.element_spec)}); pass text_field")
        texts = documents.clean_documents(ds.map(lambda ex: ex[field]), corpus.max_document_chars)
        return texts.map(lambda text: {"text": text})


# -------------------------------------------------------------------------------------- registry

_CORPORA: dict[str, Corpus] = {EMBEDDED: EmbeddedCorpus()}
_LISTENERS: list[Callable[[str], None]] = []


def add_corpus_listener(callback: Callable[[str], None]) -> None:
    """Call `callback(name)` for every corpus registered now and later (tasks use this)."""
    _LISTENERS.append(callback)
    for name in list(_CORPORA):
        callback(name)


def get_corpus(name: str) -> Corpus:
    if name not in _CORPORA:
        raise CorpusError(f"no corpus named {name!r}; registered: {sorted(_CORPORA)}. Register one "
                          "with t5x_like.data.register_corpus(name, text_glob=...) or the gin binding "
                          "register_corpora.corpora = {name: {...}}")
    return _CORPORA[name]


def corpus_names() -> list[str]:
    return sorted(_CORPORA)


def _split_globs(globs: Globs, what: str, name: str) -> dict[str, tuple[str, ...]]:
    if isinstance(globs, str):
        globs = {"train": [globs]}
    elif not isinstance(globs, Mapping):
        globs = {"train": list(globs)}
    out = {}
    for split, patterns in globs.items():
        patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
        for pattern in patterns:
            if not any(os.path.isfile(p) for p in globlib.glob(os.path.expanduser(pattern))):
                raise CorpusError(
                    f"register_corpus({name!r}): {what} {pattern!r} (split {split!r}) matches no file; "
                    "check the path, or give a glob such as '/data/books/*.txt'")
        out[split] = patterns
    return out


@gin.configurable
def register_corpus(name: str, *, text_glob: Optional[Globs] = None, jsonl_glob: Optional[Globs] = None,
                    text_field: str = "text", tfds_name: Optional[str] = None,
                    tfds_data_dir: Optional[str] = None, split_map: Optional[Mapping[str, str]] = None,
                    documents: str = "line", validation_fraction: float = 0.0,
                    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
                    on_bad_text: str = "error", max_bad_lines: Optional[int] = None,
                    overwrite: bool = False) -> Corpus:
    """Register a corpus (and, through the tasks module, its seqio tasks) under `name`.

    Exactly one of: `text_glob` (plain text, `documents="line"` or `"blank_line"`), `jsonl_glob`
    (records with a `text_field`), `tfds_name` (+ `tfds_data_dir`, `split_map`). A glob is a string
    or list (all "train") or a {split: glob} mapping; `validation_fraction` > 0 instead splits the
    documents of all files into train/validation by a stable hash of each document.

    Files are checked when first read (`FileCorpus.check_file`): binary files are refused; text
    that is not UTF-8 is refused, or repaired with U+FFFD (and a warning) with
    `on_bad_text="replace"`; JSONL lines without a string `text_field` are skipped with a warning
    naming them, and fail the read when more than `max_bad_lines` per file (None: 1% of its lines).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise CorpusError(f"corpus name {name!r} must be letters and digits joined by single "
                          "underscores, starting with a letter (it becomes part of task names)")
    if name in _CORPORA and not overwrite:
        raise CorpusError(f"corpus {name!r} is already registered; pass overwrite=True to replace it")
    if sum(x is not None for x in (text_glob, jsonl_glob, tfds_name)) != 1:
        raise CorpusError(f"register_corpus({name!r}) needs exactly one of text_glob, jsonl_glob, tfds_name")
    if not 0.0 <= validation_fraction < 1.0:
        raise CorpusError(f"register_corpus({name!r}): validation_fraction must be in [0, 1), got "
                          f"{validation_fraction}")
    if tfds_name is not None:
        if ":" not in tfds_name:
            raise CorpusError(f"register_corpus({name!r}): tfds_name {tfds_name!r} needs a version, "
                              "e.g. 'c4/en:3.0.1' or 'wikitext/wikitext-103-raw-v1:1.0.0'")
        corpus: Corpus = TfdsCorpus(name, tfds_name, tfds_data_dir, split_map, text_field,
                                    max_document_chars)
    elif jsonl_glob is not None:
        corpus = FileCorpus(name, _split_globs(jsonl_glob, "jsonl_glob", name), "jsonl", text_field,
                            max_document_chars, validation_fraction, on_bad_text, max_bad_lines)
    else:
        if documents == "jsonl" or documents not in DOCUMENT_FORMATS:
            raise CorpusError(f"register_corpus({name!r}): documents must be 'line' or 'blank_line' for "
                              f"text_glob (got {documents!r}); use jsonl_glob for JSONL")
        corpus = FileCorpus(name, _split_globs(text_glob, "text_glob", name), documents, text_field,
                            max_document_chars, validation_fraction, on_bad_text, max_bad_lines)
    _CORPORA[name] = corpus
    for callback in _LISTENERS:
        callback(name)
    return corpus


@gin.configurable
def register_corpora(corpora: Mapping[str, Mapping] = gin.REQUIRED) -> list[str]:
    """One gin binding registers any number of corpora, e.g.
    `register_corpora.corpora = {"wiki": {"text_glob": "/data/wiki/*.txt", "documents": "blank_line"}}`.
    Already registered names with identical settings are left alone, so calling it twice is harmless.
    """
    done = []
    for name, kwargs in dict(corpora).items():
        kwargs = dict(kwargs)
        if name in _CORPORA and getattr(_CORPORA[name], "_registered_with", None) == kwargs:
            done.append(name)
            continue
        register_corpus(name, overwrite=name in _CORPORA, **kwargs)
        _CORPORA[name]._registered_with = kwargs
        done.append(name)
    return done

