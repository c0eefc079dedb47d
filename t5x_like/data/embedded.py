"""The embedded default corpus: standard-library docstrings and pydoc topics, built offline on first use.

Every Python install carries this text, so a fresh machine with no network can train and test. The
build is deterministic for a given Python build and recipe; a fingerprint file records both, so a
different interpreter or a changed recipe triggers a rebuild, and an interrupted or concurrent build
never leaves a half-written cache (build in a temporary folder under a lock, then rename).
Free of TensorFlow so the build stays cheap to import and to run in a subprocess.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

RECIPE_VERSION = 1
NUM_TRAIN_SHARDS = 32          # >= 16 so that hosts shard by file
NUM_VALIDATION_SHARDS = 4
VALIDATION_PER_MILLE = 50      # 5% of documents, chosen by a stable hash of each document
MIN_DOCSTRING_CHARS = 20       # shorter docstrings ("Return self+value.") teach nothing
MIN_DOCUMENT_CHARS = 100       # a document: a module with its functions, or a class with its methods
MAX_DOCUMENT_CHARS = 20_000    # longer documents are chunked on paragraph boundaries
FINGERPRINT_FILE = "FINGERPRINT.json"
EMBEDDED_NAME = "embedded"

_COLLECTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_text.py")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BLANK_RUNS = re.compile(r"\n{3,}")
_verified: dict[str, str] = {}   # corpus dir -> fingerprint already checked in this process
builds_in_this_process = 0       # lets tests observe whether a call rebuilt


def data_dir() -> str:
    """Root of every cached artefact: $T5X_LIKE_DATA_DIR, else ~/.cache/t5x_like/data."""
    root = os.environ.get("T5X_LIKE_DATA_DIR")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "t5x_like", "data")
    return os.path.abspath(root)


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def recipe() -> dict:
    """Everything the corpus content depends on; its hash is the fingerprint."""
    return {
        "recipe_version": RECIPE_VERSION,
        "python": sys.version,
        "implementation": sys.implementation.name,
        "collector_sha256": _sha256_file(_COLLECTOR),
        "builder_sha256": _sha256_file(os.path.abspath(__file__).replace(".pyc", ".py")),
        "num_train_shards": NUM_TRAIN_SHARDS,
        "num_validation_shards": NUM_VALIDATION_SHARDS,
        "validation_per_mille": VALIDATION_PER_MILLE,
        "min_docstring_chars": MIN_DOCSTRING_CHARS,
        "min_document_chars": MIN_DOCUMENT_CHARS,
        "max_document_chars": MAX_DOCUMENT_CHARS,
    }


def fingerprint_of(recipe_dict: dict) -> str:
    return hashlib.sha256(json.dumps(recipe_dict, sort_keys=True).encode()).hexdigest()


def read_fingerprint(corpus_dir: str) -> dict | None:
    """The fingerprint record of a built corpus, or None when absent or unreadable."""
    try:
        with open(os.path.join(corpus_dir, FINGERPRINT_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def shard_files(corpus_dir: str, split: str) -> list[str]:
    num = NUM_TRAIN_SHARDS if split == "train" else NUM_VALIDATION_SHARDS
    return [os.path.join(corpus_dir, f"{split}-{i:05d}-of-{num:05d}.jsonl") for i in range(num)]


def embedded_corpus_dir(*, rebuild: bool = False) -> str:
    """Folder of the built embedded corpus, building it first when missing or stale."""
    root = data_dir()
    final = os.path.join(root, EMBEDDED_NAME)
    expected = fingerprint_of(recipe())
    if not rebuild and _verified.get(final) == expected:
        return final
    if not rebuild and _is_current(final, expected):
        _verified[final] = expected
        return final
    os.makedirs(root, exist_ok=True)
    with exclusive_lock(os.path.join(root, f".{EMBEDDED_NAME}.lock")):
        # Another process may have finished the build while this one waited for the lock.
        if rebuild or not _is_current(final, expected):
            _build_into(final, root)
    _verified[final] = expected
    return final


def _is_current(corpus_dir: str, expected: str) -> bool:
    record = read_fingerprint(corpus_dir)
    return bool(record) and record.get("fingerprint") == expected and all(
        os.path.isfile(p) for split in ("train", "validation") for p in shard_files(corpus_dir, split))


@contextlib.contextmanager
def exclusive_lock(path: str):
    """Serialises builders of one cache entry across processes (hosts sharing a disk)."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_into(final: str, root: str) -> None:
    global builds_in_this_process
    start = time.time()
    tmp = tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.tmp-", dir=root)
    try:
        raw = _collect_raw_text(tmp)
        documents, stats = assemble_documents(raw)
        splits = split_documents(documents)
        for split, shards in splits.items():
            for path, docs in zip(shard_files(tmp, split), shards):
                with open(path, "w", encoding="utf-8") as f:
                    for doc in docs:
                        f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        stats["documents"] = {s: sum(len(d) for d in shards) for s, shards in splits.items()}
        stats["shards"] = {s: len(shards) for s, shards in splits.items()}
        stats["bytes"] = {s: sum(os.path.getsize(p) for p in shard_files(tmp, s)) for s in splits}
        stats["build_seconds"] = round(time.time() - start, 2)
        rec = recipe()
        record = {"fingerprint": fingerprint_of(rec), "recipe": rec, "stats": stats,
                  "content_sha256": content_sha256(tmp)}
        with open(os.path.join(tmp, FINGERPRINT_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        stale = None
        if os.path.exists(final):
            stale = os.path.join(root, f".{EMBEDDED_NAME}.stale-{uuid.uuid4().hex}")
            os.rename(final, stale)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache must stay readable
        os.rename(tmp, final)
        if stale:
            shutil.rmtree(stale, ignore_errors=True)
        builds_in_this_process += 1
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _collect_raw_text(workdir: str) -> dict:
    """Run the collector in an isolated interpreter (-I -S: no site-packages, no env vars)."""
    out = os.path.join(workdir, "raw.json")
    proc = subprocess.run([sys.executable, "-I", "-S", _COLLECTOR, out], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = proc.stderr.decode("utf-8", "replace")[-400:]
        raise RuntimeError(f"building the embedded corpus failed: the standard-library text collector "
                           f"exited with {proc.returncode}: {tail}")
    with open(out, encoding="utf-8") as f:
        raw = json.load(f)
    os.remove(out)
    return raw


def clean_text(text: str, counts: dict) -> str:
    """Normalise line ends, tabs, control characters and blank-line runs; repair invalid Unicode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates survive json; they are not valid UTF-8
        counts["invalid_utf8"] = counts.get("invalid_utf8", 0) + 1
        text = text.encode("utf-8", "replace").decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    text = _CONTROL_CHARS.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip()


def chunk_document(text: str, max_chars: int) -> list[str]:
    """Split on paragraph boundaries (then on whitespace) into pieces of at most max_chars."""
    if len(text) <= max_chars:
        return [text]
    chunks, current = [], ""
    for para in text.split("\n\n"):
        while len(para) > max_chars:
            cut = para.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            piece, para = para[:cut].rstrip(), para[cut:].lstrip()
            if current:
                chunks.append(current)
                current = ""
            chunks.append(piece)
        if current and len(current) + 2 + len(para) > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def assemble_documents(raw: dict) -> tuple[list[str], dict]:
    """One document per module (with its functions), per class (with its methods), per pydoc topic.

    Docstrings go under their qualified names; repeated docstrings (inherited, re-exported) are kept
    once, at their first appearance in sorted module order.
    """
    counts = {"invalid_utf8": 0}
    stats = {"modules": 0, "topics": 0, "docstrings_seen": 0, "skipped_empty": 0, "skipped_short": 0,
             "dedup_removed": 0, "chunked_documents": 0}
    seen: set[bytes] = set()

    def fresh(text: str) -> bool:
        key = hashlib.sha256(text.encode("utf-8")).digest()
        if key in seen:
            stats["dedup_removed"] += 1
            return False
        seen.add(key)
        return True

    grouped: list[str] = []
    for _, entries in raw["modules"]:
        groups: dict[str, list[str]] = {}
        for group, qualname, doc in entries:
            stats["docstrings_seen"] += 1
            text = clean_text(doc or "", counts)
            if not text:
                stats["skipped_empty"] += 1
            elif len(text) < MIN_DOCSTRING_CHARS:
                stats["skipped_short"] += 1
            elif fresh(text):
                groups.setdefault(group, []).append(f"{qualname}\n{text}")
        stats["modules"] += bool(groups)
        grouped.extend("\n\n".join(blocks) for blocks in groups.values())
    for _, text in raw["topics"]:
        text = clean_text(text or "", counts)
        if not text:
            stats["skipped_empty"] += 1
        elif fresh(text):
            stats["topics"] += 1
            grouped.append(text)
    documents = []
    for doc in grouped:
        if len(doc) < MIN_DOCUMENT_CHARS:
            stats["skipped_short"] += 1
            continue
        chunks = chunk_document(doc, MAX_DOCUMENT_CHARS)
        stats["chunked_documents"] += len(chunks) > 1
        documents.extend(c for c in chunks if fresh(c))
    stats["invalid_utf8"] = counts["invalid_utf8"]
    stats["characters"] = sum(len(d) for d in documents)
    return documents, stats


def stable_hash(text: str) -> int:
    """64 bits of SHA-256: the same on every host, Python and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def split_documents(documents: list[str]) -> dict[str, list[list[str]]]:
    """Validation by hash; shard by another part of the same hash; keep assembly order in a shard."""
    splits = {"train": [[] for _ in range(NUM_TRAIN_SHARDS)],
              "validation": [[] for _ in range(NUM_VALIDATION_SHARDS)]}
    for doc in documents:
        h = stable_hash(doc)
        split = "validation" if h % 1000 < VALIDATION_PER_MILLE else "train"
        shards = splits[split]
        shards[(h // 1000) % len(shards)].append(doc)
    return splits


def content_sha256(corpus_dir: str) -> str:
    digest = hashlib.sha256()
    for split in ("train", "validation"):
        for path in shard_files(corpus_dir, split):
            digest.update(os.path.basename(path).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def embedded_stats() -> dict:
    """Counts recorded at build time: documents per split, bytes, skipped, deduplicated, chunked."""
    return read_fingerprint(embedded_corpus_dir())["stats"]
