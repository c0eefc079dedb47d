"""Reading documents from files: the TF stream hosts train on, and its Python mirror.

The stream runs on TensorFlow ops only (TextLineDataset, a blank-line split, TFRecords), because
Python callbacks inside tf.data (from_generator, py_function) can deadlock interpreter shutdown
while an iterator is alive. JSON needs Python, so each JSONL file is converted once into a cached
TFRecord of its clean documents. Bad data is counted by a Python pass that applies the same rules
(`scan_file`); tests check that both agree document for document.

Before a file is streamed, `inspect_file` reads it once (the record is cached per file version)
for what the stream would otherwise pass in silence: binary content, text that is not UTF-8, JSONL
lines that are not records with the text field, with their line numbers. `corpus.FileCorpus.
check_file` turns the record into an error or a warning.
"""

from __future__ import annotations

import codecs
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
INSPECT_VERSION = 1
SNIFF_BYTES = 8192                     # a NUL byte this early: binary (as git and grep decide)
MAX_CONTROL_FRACTION = 0.05            # more control bytes than this (NUL included): binary
MAX_LOCATIONS = 5                      # line numbers kept per kind of problem
# C0 controls that text does not use (tab, newline, vertical tab, form feed, CR and ESC are
# allowed; ESC starts terminal colour codes in logs), and DEL.
CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
_CHUNK_BYTES = 1 << 24
_SURROGATES = re.compile("[\ud800-\udfff]")


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


# ------------------------------------------------------------------------------- inspection


def _undecodable_bytes(raw: bytes) -> int:
    """How many bytes of `raw` belong to no valid UTF-8 sequence."""
    return len(raw) - len(raw.decode("utf-8", "ignore").encode("utf-8"))


def _jsonl_text(line: str, text_field: str) -> tuple[Optional[str], Optional[str]]:
    """(text, None) for a good record, (None, why) for one `_raw_documents` drops."""
    try:
        record = json.loads(line)
    except ValueError as e:
        return None, f"not JSON: {getattr(e, 'msg', e)}"
    if not isinstance(record, dict):
        return None, f"not a JSON object but {type(record).__name__}"
    text = record.get(text_field)
    if not isinstance(text, str):
        return None, f"no {text_field!r} field" if text is None else f"{text_field!r} is not a string"
    return text, None


def inspect_file(path: str, fmt: str, text_field: str = "text") -> dict:
    """What one file holds that a text stream should not pass in silence.

    `bytes`, `lines`; `nul_bytes` and `control_bytes` (CONTROL_BYTES, NUL included); `binary`: a
    NUL byte in the first SNIFF_BYTES or control bytes above MAX_CONTROL_FRACTION (nothing else is
    examined then). `invalid_lines`, `invalid_bytes`, `invalid_at`: lines holding bytes that are no
    UTF-8 (in JSONL text also lone surrogate escapes such as "\\ud800"), how many, and the first
    MAX_LOCATIONS line numbers. JSONL only: `records` (non-empty lines), `bad_records` and `bad_at`
    ([line, reason] of the first MAX_LOCATIONS): lines that are not JSON objects with a string
    `text_field`, which the stream skips.
    """
    out = {"version": INSPECT_VERSION, "bytes": 0, "lines": 0, "nul_bytes": 0, "control_bytes": 0,
           "binary": False, "invalid_lines": 0, "invalid_bytes": 0, "invalid_at": [], "records": 0,
           "bad_records": 0, "bad_at": []}
    decoder = codecs.getincrementaldecoder("utf-8")()
    utf8, last = True, b"\n"
    with open(path, "rb") as f:  # fast pass, in chunks: binary? all UTF-8?
        while chunk := f.read(_CHUNK_BYTES):
            if not out["bytes"] and b"\x00" in chunk[:SNIFF_BYTES]:
                out["binary"] = True
            out["bytes"] += len(chunk)
            out["lines"] += chunk.count(b"\n")
            out["nul_bytes"] += chunk.count(b"\x00")
            out["control_bytes"] += len(chunk) - len(chunk.translate(None, CONTROL_BYTES))
            last = chunk[-1:]
            if utf8:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    utf8 = False
    if utf8:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            utf8 = False
    out["lines"] += last != b"\n"
    out["binary"] = out["binary"] or out["control_bytes"] > MAX_CONTROL_FRACTION * out["bytes"]
    if out["binary"] or (utf8 and fmt != "jsonl"):
        return out
    with open(path, "rb") as f:  # line by line: where the problems are
        for number, raw in enumerate(f, 1):
            bad = 0 if utf8 else _undecodable_bytes(raw)
            if fmt == "jsonl" and raw.strip():
                out["records"] += 1
                text, why = _jsonl_text(raw.decode("utf-8", "replace"), text_field)
                if why is not None:
                    out["bad_records"] += 1
                    if len(out["bad_at"]) < MAX_LOCATIONS:
                        out["bad_at"].append([number, why])
                elif not bad and not text.isascii():
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:  # lone surrogate escapes, e.g. "\ud800"
                        bad = len(_SURROGATES.findall(text))
            if bad:
                out["invalid_lines"] += 1
                out["invalid_bytes"] += bad
                if len(out["invalid_at"]) < MAX_LOCATIONS:
                    out["invalid_at"].append(number)
    return out


_INSPECTED: dict[str, dict] = {}


def inspect_file_cached(path: str, fmt: str, text_field: str, folder: Optional[str] = None) -> dict:
    """`inspect_file` once per file version: remembered in this process and, when `folder` is
    given, in a small JSON file there that other processes and later runs reuse."""
    st = os.stat(path)
    key = json.dumps([INSPECT_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns, fmt,
                      text_field if fmt == "jsonl" else None])
    if key in _INSPECTED:
        return _INSPECTED[key]
    cache = None
    if folder:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache = os.path.join(folder, f"{os.path.basename(path)[:40]}-{digest}.inspect.json")
    try:
        with open(cache, encoding="utf-8") as f:
            out = json.load(f)
    except (TypeError, OSError, ValueError):
        out = None
    if not isinstance(out, dict) or out.get("version") != INSPECT_VERSION:
        out = inspect_file(path, fmt, text_field)
        if cache:
            try:
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(out, f)
                os.replace(tmp, cache)  # atomic: concurrent writers write the same record
            except OSError:  # a read-only cache only costs reading the file again next time
                pass
    _INSPECTED[key] = out
    return out


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
