"""Corpora: the embedded build (shards, splits, determinism, fingerprint), users' files, bad data."""

import collections
import json
import logging
import os
import shutil
import sys
import threading

import gin
import numpy as np
import pytest
import seqio

import t5x_like.data as data
from t5x_like.data import corpus as corpus_lib
from t5x_like.data import documents, embedded


def _docs(name, split="train", shard=None):
    source = data.get_corpus(name).source()
    ds = source.get_dataset(split, shuffle=False, seed=0, shard_info=shard)
    return [ex["text"].decode("utf-8") for ex in ds.as_numpy_iterator()]


# ----------------------------------------------------------------------------------- embedded


def test_embedded_corpus_has_shards_disjoint_splits_and_stats():
    folder = data.embedded_corpus_dir()
    train_files = embedded.shard_files(folder, "train")
    assert len(train_files) >= 16 and all(os.path.isfile(p) for p in train_files)
    assert len(embedded.shard_files(folder, "validation")) >= 2
    stats = embedded.read_fingerprint(folder)["stats"]
    assert stats["bytes"]["train"] > 1_500_000 and stats["documents"]["train"] > 1000
    train, validation = _docs("embedded", "train"), _docs("embedded", "validation")
    assert (len(train), len(validation)) == (stats["documents"]["train"], stats["documents"]["validation"])
    assert len(set(train)) == len(train) and not set(train) & set(validation)
    assert all(embedded.stable_hash(doc) % 1000 < embedded.VALIDATION_PER_MILLE for doc in validation)
    assert all(embedded.stable_hash(doc) % 1000 >= embedded.VALIDATION_PER_MILLE for doc in train)
    assert stats["dedup_removed"] > 0 and stats["skipped_short"] > 0


def test_embedded_build_is_deterministic(monkeypatch, tmp_path):
    first = embedded.read_fingerprint(data.embedded_corpus_dir())
    monkeypatch.setenv("T5X_LIKE_DATA_DIR", str(tmp_path))
    second = embedded.read_fingerprint(data.embedded_corpus_dir())
    assert second["fingerprint"] == first["fingerprint"]
    assert second["content_sha256"] == first["content_sha256"]


def test_rebuild_happens_only_when_the_fingerprint_changes(monkeypatch, tmp_path):
    monkeypatch.setenv("T5X_LIKE_DATA_DIR", str(tmp_path))
    folder = data.embedded_corpus_dir()
    builds = embedded.builds_in_this_process
    embedded._verified.clear()
    assert data.embedded_corpus_dir() == folder and embedded.builds_in_this_process == builds

    record_path = os.path.join(folder, embedded.FINGERPRINT_FILE)
    record = json.load(open(record_path))
    json.dump({**record, "fingerprint": "from-another-recipe"}, open(record_path, "w"))
    embedded._verified.clear()
    data.embedded_corpus_dir()
    assert embedded.builds_in_this_process == builds + 1
    assert embedded.read_fingerprint(folder)["fingerprint"] == record["fingerprint"]

    monkeypatch.setattr(sys, "version", sys.version + " (another build)")
    data.embedded_corpus_dir()
    assert embedded.builds_in_this_process == builds + 2
    assert embedded.read_fingerprint(folder)["recipe"]["python"].endswith("(another build)")
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".stale-" in n]


def test_concurrent_builders_build_once(monkeypatch, tmp_path):
    monkeypatch.setenv("T5X_LIKE_DATA_DIR", str(tmp_path))
    builds, results, errors = embedded.builds_in_this_process, [], []

    def build():
        try:
            results.append(embedded.embedded_corpus_dir())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert embedded.builds_in_this_process == builds + 1
    record = embedded.read_fingerprint(results[0])
    assert record["content_sha256"] == embedded.content_sha256(results[0])


# ------------------------------------------------------------------------------ users' corpora


def _python_mirror(corpus, split="train"):
    docs = []
    for path in corpus.files(split):
        documents.scan_file(path, corpus.format, corpus.text_field, corpus.max_document_chars, docs)
    return docs


def test_text_lines_skip_empty_and_repair_invalid_utf8(write_file):
    path = write_file("lines/a.txt", b"first document\n\n   \nsecond \xff document\n  third  \n")
    write_file("lines/b.txt", b"fourth\n")
    corpus = data.register_corpus("lines1", text_glob=os.path.join(os.path.dirname(path), "*.txt"),
                                  on_bad_text="replace", overwrite=True)
    docs = list(corpus.iter_documents("train"))
    assert docs == ["first document", "second \ufffd document", "third", "fourth"]
    assert docs == _python_mirror(corpus)
    stats = corpus.stats("train")
    assert (stats["documents"], stats["skipped_empty"], stats["invalid_utf8"]) == (4, 2, 1)


def test_blank_line_separated_documents(write_file):
    path = write_file("blank/a.txt", b"Para one\nstill one\n\n\n  \nPara two\r\n\r\nPara \xfe three\n\n")
    corpus = data.register_corpus("blank1", text_glob=path, documents="blank_line", on_bad_text="replace",
                                  overwrite=True)
    docs = list(corpus.iter_documents("train"))
    assert docs == ["Para one\nstill one", "Para two", "Para \ufffd three"]
    assert docs == _python_mirror(corpus)
    assert corpus.stats("train")["invalid_utf8"] == 1


def test_jsonl_counts_bad_records(write_file):
    lines = [json.dumps({"text": "alpha"}).encode(), b"", json.dumps({"text": "   "}).encode(),
             b"{not json", json.dumps({"title": "no text"}).encode(), json.dumps({"text": 5}).encode(),
             b'{"text": "bad \xff byte"}', json.dumps({"text": "lone \ud800 surrogate"}).encode(),
             json.dumps({"text": "  omega  ", "id": 3}).encode()]
    path = write_file("j/a.jsonl", b"\n".join(lines) + b"\n")
    corpus = data.register_corpus("jsonl1", jsonl_glob=path, on_bad_text="replace", max_bad_lines=3,
                                  overwrite=True)
    docs = list(corpus.iter_documents("train"))
    assert docs == ["alpha", "bad \ufffd byte", "lone \ufffd\ufffd\ufffd surrogate", "omega"]
    stats = corpus.stats("train")
    counts = (stats["documents"], stats["skipped_empty"], stats["bad_records"], stats["invalid_utf8"])
    assert counts == (4, 2, 3, 2)
    other = data.register_corpus("jsonl2", jsonl_glob=path, text_field="title", on_bad_text="replace",
                                 max_bad_lines=8, overwrite=True)
    assert list(other.iter_documents("train")) == ["no text"]


# ------------------------------------------------------------------------------ data hygiene


def _first_error(corpus):
    with pytest.raises(corpus_lib.CorpusError) as info:
        list(corpus.iter_documents("train"))
    message = str(info.value)
    assert "\n" not in message  # the CLI prints it as one line
    return message


def test_binary_files_are_refused(write_file, tmp_path):
    binary = shutil.which("ls") or sys.executable
    path = str(tmp_path / "ls.txt")
    shutil.copy(binary, path)
    for policy in ("error", "replace"):  # binary cannot be repaired
        corpus = data.register_corpus("binary1", text_glob=path, on_bad_text=policy, overwrite=True)
        message = _first_error(corpus)
        assert path in message and "looks binary" in message and "NUL" in message
    utf16 = write_file("utf16.txt", "a line of text\nanother line\n".encode("utf-16"))
    assert "iconv -f utf-16" in _first_error(data.register_corpus("binary2", text_glob=utf16, overwrite=True))
    controls = write_file("controls.jsonl", b"".join(b'{"text": "x\x01\x02\x03"}\n' for _ in range(10)))
    assert "looks binary" in _first_error(data.register_corpus("binary3", jsonl_glob=controls, overwrite=True))
    ansi = write_file("log.txt", b"".join(b"\x1b[31mred\x1b[0m text\tand a tab\r\n" for _ in range(50)))
    assert len(list(data.register_corpus("ansi1", text_glob=ansi, overwrite=True).iter_documents("train"))) == 50


def test_invalid_utf8_is_refused_or_repaired_with_a_count(write_file, caplog):
    lines = [f"good line {i}".encode() for i in range(20)]
    lines[4] = b"caf\xe9 latin-1"
    lines[11] = b"two \xff\xfe bad bytes"
    lines[17] = b"cut \xe2\x82"  # a truncated three-byte sequence
    path = write_file("latin.txt", b"\n".join(lines) + b"\n")
    message = _first_error(data.register_corpus("badutf1", text_glob=path, overwrite=True))
    assert f"{path} is not valid UTF-8" in message
    assert "3 of 20 lines hold 5 bytes" in message and f"{path}:5, {path}:12, {path}:18" in message
    assert "on_bad_text='replace'" in message

    with caplog.at_level(logging.WARNING):
        corpus = data.register_corpus("badutf2", text_glob=path, on_bad_text="replace", overwrite=True)
        docs = list(corpus.iter_documents("train"))
        list(corpus.iter_documents("train"))  # warned once per file
    assert docs[4] == "caf\ufffd latin-1" and len(docs) == 20
    warnings = [r.getMessage() for r in caplog.records if "U+FFFD" in r.getMessage()]
    assert len(warnings) == 1 and "replaced 5 bytes that are not UTF-8 in 3 of 20 lines" in warnings[0]
    assert f"{path}:5, {path}:12, {path}:18" in warnings[0]
    with pytest.raises(corpus_lib.CorpusError, match="on_bad_text='ignore' is not one of"):
        data.register_corpus("badutf3", text_glob=path, on_bad_text="ignore", overwrite=True)


def _jsonl(n, bad):
    return b"".join(b"{broken\n" if i in bad else json.dumps({"text": f"record {i}"}).encode() + b"\n"
                    for i in range(n))


def test_jsonl_parse_failures_warn_with_file_line_or_fail_above_the_limit(write_file, caplog):
    path = write_file("one_bad.jsonl", _jsonl(200, {57}))
    with caplog.at_level(logging.WARNING):
        docs = list(data.register_corpus("jsonlbad1", jsonl_glob=path, overwrite=True).iter_documents("train"))
    assert len(docs) == 199
    (warning,) = [r.getMessage() for r in caplog.records if "JSONL" in r.getMessage()]
    assert "skipped 1 of 200 JSONL lines" in warning and f"{path}:58 (not JSON" in warning

    path = write_file("many_bad.jsonl", _jsonl(200, set(range(0, 200, 10))))
    message = _first_error(data.register_corpus("jsonlbad2", jsonl_glob=path, overwrite=True))
    assert "20 of 200 JSONL lines" in message and "more than the 2 allowed (1% of its lines)" in message
    assert f"{path}:1 (not JSON" in message and f"{path}:41 (not JSON" in message and "max_bad_lines" in message
    corpus = data.register_corpus("jsonlbad3", jsonl_glob=path, max_bad_lines=20, overwrite=True)
    assert len(list(corpus.iter_documents("train"))) == 180
    wrong_field = data.register_corpus("jsonlbad4", jsonl_glob=path, text_field="body", max_bad_lines=20,
                                       overwrite=True)
    assert "no 'body' field" in _first_error(wrong_field)


def test_inspection_agrees_with_the_python_mirror(write_file):
    lines = [json.dumps({"text": "alpha"}).encode(), b"", b"[1, 2]", b'{"text": "bad \xff byte"}',
             json.dumps({"text": "lone \ud800"}).encode(), json.dumps({"text": 5}).encode(), b"{oops"]
    path = write_file("mirror.jsonl", b"\n".join(lines))
    record = documents.inspect_file(path, "jsonl")
    counts = documents.scan_file(path, "jsonl")
    assert (record["bad_records"], record["invalid_lines"]) == (counts["bad_records"], counts["invalid_utf8"])
    assert record["bad_at"] == [[3, "not a JSON object but list"], [6, "'text' is not a string"],
                                [7, "not JSON: Expecting property name enclosed in double quotes"]]
    assert (record["records"], record["lines"], record["invalid_at"]) == (6, 7, [4, 5])


def test_long_documents_are_chunked(write_file):
    path = write_file("long.txt", ("x" * 25 + "\nshort\n").encode())
    corpus = data.register_corpus("long1", text_glob=path, max_document_chars=10, overwrite=True)
    assert list(corpus.iter_documents("train")) == ["x" * 10, "x" * 10, "x" * 5, "short"]
    assert corpus.stats("train")["chunked"] == 1


def test_validation_fraction_splits_documents_by_hash(write_file):
    path = write_file("many.txt", "".join(f"document number {i}\n" for i in range(400)).encode())
    corpus = data.register_corpus("hashsplit", text_glob=path, validation_fraction=0.25, overwrite=True)
    train, validation = _docs("hashsplit", "train"), _docs("hashsplit", "validation")
    assert sorted(train + validation) == sorted(f"document number {i}" for i in range(400))
    assert not set(train) & set(validation) and 50 < len(validation) < 150
    assert corpus.splits == ("train", "validation")


def test_host_shards_are_disjoint_and_cover_the_split(write_file):
    whole = _docs("embedded")
    parts = [_docs("embedded", shard=seqio.ShardInfo(i, 2)) for i in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert collections.Counter(parts[0] + parts[1]) == collections.Counter(whole)
    # Fewer files than hosts: every host reads the file and keeps every n-th document.
    path = write_file("one.txt", "".join(f"line {i}\n" for i in range(10)).encode())
    data.register_corpus("onefile", text_glob=path, overwrite=True)
    parts = [_docs("onefile", shard=seqio.ShardInfo(i, 3)) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(f"line {i}" for i in range(10))
    assert sum(len(p) for p in parts) == 10


def test_bad_inputs_give_one_clear_error(write_file, tmp_path):
    with pytest.raises(corpus_lib.CorpusError, match="matches no file"):
        data.register_corpus("missing", text_glob=str(tmp_path / "nowhere" / "*.txt"))
    path = write_file("empty.txt", b"\n   \n\t\n")
    corpus = data.register_corpus("emptytext", text_glob=path, overwrite=True)
    with pytest.raises(corpus_lib.CorpusError, match="no usable text"):
        list(corpus.iter_documents("train"))
    with pytest.raises(corpus_lib.CorpusError, match="already registered"):
        data.register_corpus("emptytext", text_glob=path)
    with pytest.raises(corpus_lib.CorpusError, match="letters and digits"):
        data.register_corpus("bad-name", text_glob=path)
    with pytest.raises(corpus_lib.CorpusError, match="exactly one"):
        data.register_corpus("both", text_glob=path, jsonl_glob=path)
    with pytest.raises(corpus_lib.CorpusError, match="use jsonl_glob"):
        data.register_corpus("wrongfmt", text_glob=path, documents="jsonl")
    with pytest.raises(corpus_lib.CorpusError, match="no corpus named"):
        data.get_corpus("never_registered")
    with pytest.raises(corpus_lib.CorpusError, match="no split"):
        list(corpus.iter_documents("test"))


def test_one_gin_binding_registers_a_corpus_and_its_tasks(write_file):
    path = write_file("gin/a.txt", b"one doc\n\nanother doc\n")
    gin.parse_config(f"register_corpora.corpora = {{'gincorpus': {{'text_glob': '{path}', "
                     "'documents': 'blank_line'}}")
    try:
        assert data.register_corpora() == ["gincorpus"]
        assert data.register_corpora() == ["gincorpus"]  # idempotent
    finally:
        gin.clear_config()
    assert "gincorpus_lm_byte" in data.task_names() and "gincorpus_span_corruption_spm" in data.task_names()
    assert list(data.get_corpus("gincorpus").iter_documents("train")) == ["one doc", "another doc"]


# ------------------------------------------------------------------------------------------ TFDS


def _tiny_tfds_builder():
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyTextCorpus(tfds.core.GeneratorBasedBuilder):
        """Three documents per split, generated locally."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train"), "validation": self._generate_examples("val")}

        def _generate_examples(self, split):
            for i in range(3):
                yield i, {"text": f"{split} document {i}" if i else "   ", "id": i}

    return TinyTextCorpus


def test_prepared_tfds_directory_is_read_without_download(tmp_path):
    builder_cls = _tiny_tfds_builder()
    corpus = data.register_corpus("tfdsnotready", tfds_name="tiny_text_corpus:1.0.0",
                                  tfds_data_dir=str(tmp_path / "empty"), split_map={"train": "train"},
                                  overwrite=True)
    with pytest.raises(corpus_lib.CorpusError, match="not prepared"):
        list(corpus.iter_documents("train"))
    unknown = data.register_corpus("tfdsunknown", tfds_name="no_such_dataset_xyz:1.0.0",
                                   tfds_data_dir=str(tmp_path), split_map={"train": "train"}, overwrite=True)
    with pytest.raises(corpus_lib.CorpusError, match="cannot be opened"):
        list(unknown.iter_documents("train"))
    with pytest.raises(corpus_lib.CorpusError, match="needs a version"):
        data.register_corpus("tfdsnoversion", tfds_name="c4/en")

    builder_cls(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    corpus = data.register_corpus("tfdsready", tfds_name="tiny_text_corpus:1.0.0",
                                  tfds_data_dir=str(tmp_path / "tfds"), overwrite=True)
    assert sorted(corpus.iter_documents("train")) == ["train document 1", "train document 2"]
    assert sorted(corpus.iter_documents("validation")) == ["val document 1", "val document 2"]
    assert "tfdsready_lm_byte" in data.task_names()
