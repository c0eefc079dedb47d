"""Reading documents from files: the TF stream hosts train on, and its Python mirror.

The stream runs on TensorFlow ops only (TextLineDataset, a blank-line split, TFRecords), because
Python callbacks inside tf.data (from_generator, py_function) can deadlock interpreter shutdown
while an iterator is alive. JSON needs Python, so each JSONL file is converted once into a cached
TFRecord of its clean documents. Bad data is counted by a Python pass that applies the same rules
(`scan_file`); tests check that both agree document for document.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import tempfile
from typing import Iterator, Optional, Sequence

import seqio
import tensorflow as tf

FILE_CYCLE_LENGTH = 8
BLANK_LINES = rb"\n[\t\n\f\r\v ]*\n"   # same pattern in RE2 (TF) and Python
ASCII_SPACE = " \t\n\r\f\v"            # what tf.strings.strip removes
DEFAULT_MAX_DOCUMENT_CHARS = 20_000
STAT_FIELDS = ("documents", "characters", "skipped_empty", "invalid_utf8", "bad_records", "chunked")


# ----------------------------------------------------------------------------------- TF stream


def clean_documents(texts: tf.data.Dataset, max_chars: int) -> tf.data.Dataset:
    """Repair invalid UTF-8 (U+FFFD), strip, drop empty documents, cut long ones into windows of
    max_chars characters (tokenizers and packing cope badly with megabyte-long strings)."""
    def repair(text):
        return tf.strings.strip(tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="replace"))

    def windows(text):
        n = tf.strings.length(text, unit="UTF8_CHAR")
        starts = tf.range(0, n, max_chars)
        count = tf.size(starts)
        return tf.strings.substr(tf.fill([count], text), starts, tf.fill([count], max_chars),
                                 unit="UTF8_CHAR")

    texts = texts.map(repair).filter(lambda t: tf.strings.length(t) > 0)
    return texts.map(windows).unbatch()


def blank_line_documents(path: tf.Tensor) -> tf.data.Dataset:
    content = tf.strings.regex_replace(tf.io.read_file(path), "\x00", " ")
    content = tf.strings.regex_replace(content, BLANK_LINES.decode(), "\x00")
    return tf.data.Dataset.from_tensor_slices(tf.strings.split(content, "\x00"))


# --------------------------------------------------------------------------- Python mirror


def _raw_documents(path: str, fmt: str, text_field: str, counts: collections.Counter) -> Iterator[bytes]:
    """Undecoded documents of one file as the TF readers split them; bad JSONL records counted."""
    with open(path, "rb") as f:
        if fmt == "line":
            for raw in f:
                yield raw.rstrip(b"\n")
        elif fmt == "blank_line":
            yield from re.split(BLANK_LINES, f.read().replace(b"\x00", b" "))
        else:
            for raw in f:
                if not raw.strip():
                    counts["skipped_empty"] += 1
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    counts["invalid_utf8"] += 1
                    line = raw.decode("utf-8", "replace")
                try:
                    record = json.loads(line)
                except ValueError:
                    counts["bad_records"] += 1
                    continue
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    counts["bad_records"] += 1
                    continue
                yield text.encode("utf-8", "surrogatepass")  # lone surrogates: invalid, counted next


def scan_file(path: str, fmt: str, text_field: str = "text", max_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
              documents: Optional[list] = None) -> collections.Counter:
    """Counts for one file under the TF cleaning rules; appends the clean documents if asked."""
    counts = collections.Counter()
    for raw in _raw_documents(path, fmt, text_field, counts):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            counts["invalid_utf8"] += 1
            text = raw.decode("utf-8", "replace")
        text = text.strip(ASCII_SPACE)
        if not text:
            counts["skipped_empty"] += 1
            continue
        pieces = [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
        counts["chunked"] += len(pieces) > 1
        counts["documents"] += len(pieces)
        counts["characters"] += len(text)
        if documents is not None:
            documents.extend(pieces)
    return counts


def prepare_jsonl(path: str, text_field: str, max_chars: int, folder: str) -> str:
    """Path of a TFRecord of a JSONL file's clean documents, written once (atomically) per file
    version; a sidecar .json holds the file's bad-data counts."""
    st = os.stat(path)
    key = json.dumps([path, st.st_size, st.st_mtime_ns, text_field, max_chars])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = os.path.join(folder, f"{os.path.basename(path)[:40]}-{digest}.tfrecord")
    if os.path.isfile(out):
        return out
    os.makedirs(folder, exist_ok=True)
    docs: list[str] = []
    counts = scan_file(path, "jsonl", text_field, max_chars, docs)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    try:
        with tf.io.TFRecordWriter(tmp) as writer:
            for doc in docs:
                writer.write(doc.encode("utf-8"))
        with open(out + ".json", "w", encoding="utf-8") as f:
            json.dump({"source": path, **counts}, f)
        os.replace(tmp, out)  # atomic: concurrent writers produce identical bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


# --------------------------------------------------------------------------------- seqio source


class DocumentFileSource(seqio.DataSource):
    """seqio source over a FileCorpus that shards by file.

    With at least as many files as hosts, each host reads files index, index + n, ... (the
    order TF's Dataset.shard uses); with fewer, every host reads all and keeps every n-th
    document. Either way the hosts' documents are disjoint and together are the whole split.
    """

    def __init__(self, corpus):
        self._corpus = corpus
        super().__init__(splits=(), caching_permitted=False)

    @property
    def splits(self):
        return self._corpus.splits

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> Sequence[str]:
        return self._corpus.files(split)

    def __repr__(self):
        return f"DocumentFileSource(corpus={self._corpus.name!r})"

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        self._corpus.check_usable(split, shard_info)
        return self.documents(split, shuffle, seed, shard_info)

    def documents(self, split: str, shuffle: bool, seed: Optional[int],
                  shard_info: Optional[seqio.ShardInfo]) -> tf.data.Dataset:
        corpus = self._corpus
        files = corpus.files(split)
        by_document = None
        if shard_info and shard_info.num_shards > 1:
            if len(files) >= shard_info.num_shards:
                files = files[shard_info.index::shard_info.num_shards]
            else:
                by_document = shard_info
        files = [corpus.prepared_file(p) for p in files]
        files_ds = tf.data.Dataset.from_tensor_slices(files)
        if shuffle and len(files) > 1:  # mix documents of several files; order stays seed-determined
            files_ds = files_ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
            cycle = min(FILE_CYCLE_LENGTH, len(files))
            texts = files_ds.interleave(corpus.read_file, cycle_length=cycle, block_length=1,
                                        num_parallel_calls=cycle, deterministic=True)
        else:
            texts = files_ds.flat_map(corpus.read_file)
        if by_document is not None:
            texts = texts.shard(by_document.num_shards, by_document.index)
        texts = corpus.keep_in_split(clean_documents(texts, corpus.max_document_chars), split)
        return texts.map(lambda text: {"text": text})
