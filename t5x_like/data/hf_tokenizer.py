"""Tokenizers that come with Hugging Face checkpoints, as seqio vocabularies.

- `HFTokenizerVocabulary(path)`: a `tokenizer.json` read by the `tokenizers` library (GPT-2 byte-level
  BPE, Llama 3, Mistral, Qwen, ...).
- `SentencePieceModelVocabulary(path)`: a SentencePiece `.model` with any special-token layout: T5's
  (pad 0, eos 1, unk 2) as this project trains them, or Llama's / Mistral's (unk 0, bos 1, eos 2, no pad).

Special tokens. BOS / EOS / UNK ids come from the tokenizer itself (the SentencePiece model's
`bos_id()` ...; `tokenizer.json`'s added tokens and post-processor) and, where present, from the HF
files next to it: `tokenizer_config.json` / `special_tokens_map.json` (token strings such as
`"bos_token": "<s>"`, and `add_bos_token` / `add_eos_token`; the map wins, as in transformers) and
`config.json` (`bos_token_id`, `eos_token_id`, `pad_token_id`: only where the tokenizer names none).
`add_bos` / `add_eos` say whether `transformers`' `tokenizer(text)` puts BOS in front / EOS after a
text: a `tokenizer.json` says so in its post-processor (as transformers >= 5 reads it); a `.model`
follows `add_bos_token` / `add_eos_token` of tokenizer_config.json, else a tokenizer.json next to it,
else adds BOS when the model has a BOS id (LlamaTokenizer's documented default) and never EOS.

Padding. seqio pads every feature with id 0 (`pad_id` is 0 for every vocabulary, whatever the
tokenizer calls padding; the tokenizer's own pad id is `tokenizer_pad_id`, None for Llama and GPT-2).
Padding is then recognised by position, not by id: packed rows have segment id 0 there, and the loss
weights seqio's converters write are 0 on padding. Where the tokenizer's id 0 is a real token
(`zero_is_padding` False: Llama's `<unk>`, GPT-2's `!`), id 0 inside a text must count as text, so
the LM converter for such a vocabulary takes its loss weights from the segment ids / lengths
(`tasks.LengthWeightedLMFeatureConverter`) and the decoder-only network masks padding by position.

Encoding never adds special tokens (seqio appends EOS itself where a task wants it; a BOS is the
model's business, see `vocabularies.leading_bos_id`). Decoding drops special tokens. The TensorFlow
path (`encode_tf` / `decode_tf`, what seqio's `tokenize` preprocessor calls inside tf.data) of a
`tokenizer.json` runs the Python `tokenizers` library through `tf.numpy_function`: it works in any
tf.data pipeline on the host, but the graph cannot be serialised and holds the GIL while it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
import seqio
import tensorflow as tf

from t5x_like.errors import UserError

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_FILES = ("tokenizer.model", "spiece.model")
# A Hugging Face checkpoint's tokenizer files (main.import_hf copies them next to model.gin).
TOKENIZER_FILES = (TOKENIZER_JSON, *SENTENCEPIECE_FILES, "tokenizer_config.json", "special_tokens_map.json")
SPECIAL_KINDS = ("bos", "eos", "unk", "pad")
# Last resort for a bare tokenizer.json (no config files, no post-processor): the usual names.
_USUAL_NAMES = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
                "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>"),
                "unk": ("<unk>", "<|unk|>", "[UNK]"), "pad": ("<pad>", "<|pad|>", "[PAD]")}


class TokenizerFileError(UserError):
    """A tokenizer file that is missing or cannot be read; the message names the file and the fix."""


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerFileError(f"{path} is not a readable JSON file ({e}); save the tokenizer again "
                                 "with save_pretrained") from None
    return value if isinstance(value, dict) else {}


def _token_string(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def hf_special_tokens(folder: str) -> dict:
    """What the HF files in `folder` say about special tokens:
    {"tokens": {kind: str}, "ids": {kind: int}, "add_bos": bool|None, "add_eos": bool|None}.
    `tokens` from tokenizer_config.json, overridden by special_tokens_map.json; `ids` from config.json."""
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    tokens = {}
    for source in (config, _read_json(os.path.join(folder, "special_tokens_map.json"))):
        for kind in SPECIAL_KINDS:
            token = _token_string(source.get(f"{kind}_token"))
            if token is not None:
                tokens[kind] = token
    model_config = _read_json(os.path.join(folder, "config.json"))
    nested = model_config.get("text_config")  # multimodal configs nest the text model's
    model_config = {**(nested if isinstance(nested, dict) else {}), **model_config}
    ids = {}
    for kind in SPECIAL_KINDS:
        value = model_config.get(f"{kind}_token_id")
        if isinstance(value, list):  # e.g. several EOS ids: the first is the tokenizer's
            value = value[0] if value else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            ids[kind] = value
    flags = {k: config.get(f"{k}_token") for k in ("add_bos", "add_eos")}
    return {"tokens": tokens, "ids": ids,
            **{k: v if isinstance(v, bool) else None for k, v in flags.items()}}


def _resolve_ids(own: dict, hf: dict, token_to_id, size: int) -> dict:
    """kind -> id: a token string of the HF files, else the tokenizer's own id, else config.json's."""
    out = {}
    for kind in SPECIAL_KINDS:
        token = hf["tokens"].get(kind)
        found = token_to_id(token) if token is not None else None
        for candidate in (found, own.get(kind), hf["ids"].get(kind)):
            if candidate is not None and 0 <= int(candidate) < size:
                out[kind] = int(candidate)
                break
        else:
            out[kind] = None
    return out


class _SpecialTokensMixin:
    """bos_id / eos_id / unk_id / tokenizer_pad_id / add_bos / add_eos / zero_is_padding from
    `self._special` (kind -> id or None) and `self._add` ({"bos": bool, "eos": bool})."""

    _special: dict
    _add: dict

    @property
    def bos_id(self) -> Optional[int]:
        return self._special["bos"]

    @property
    def eos_id(self) -> Optional[int]:
        return self._special["eos"]

    @property
    def unk_id(self) -> Optional[int]:
        return self._special["unk"]

    @property
    def pad_id(self) -> int:
        """0, the id seqio pads with (padding is told apart by position; module docstring)."""
        return 0

    @property
    def tokenizer_pad_id(self) -> Optional[int]:
        """The tokenizer's own pad token id, or None (Llama, GPT-2)."""
        return self._special["pad"]

    @property
    def add_bos(self) -> bool:
        """Whether transformers' `tokenizer(text)` starts a text with BOS (Llama: yes; GPT-2: no)."""
        return bool(self._add["bos"]) and self.bos_id is not None

    @property
    def add_eos(self) -> bool:
        """Whether transformers' `tokenizer(text)` ends a text with EOS (Llama, GPT-2: no)."""
        return bool(self._add["eos"]) and self.eos_id is not None

    @property
    def zero_is_padding(self) -> bool:
        """True when id 0 never occurs in a text (the tokenizer's pad is 0, as T5's and this
        project's); False when 0 is a real token (Llama's <unk>, GPT-2's "!")."""
        return self.tokenizer_pad_id == 0


# ------------------------------------------------------------------------------ tokenizer.json


def _post_processor_adds(tokenizer) -> tuple[Optional[int], Optional[int]]:
    """(id put in front, id put after) a text by the tokenizer's post-processor, or None each."""
    bare = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    if not bare or len(full) <= len(bare):
        return None, None
    start = full.index(bare[0]) if bare[0] in full else 0
    front = full[start - 1] if start > 0 else None
    back = full[start + len(bare)] if start + len(bare) < len(full) else None
    return front, back


class HFTokenizerVocabulary(_SpecialTokensMixin, seqio.Vocabulary):
    """A `tokenizer.json` (the `tokenizers` library) as a seqio vocabulary; no extra ids.

    `path` is the tokenizer.json file or a folder holding one; tokenizer_config.json,
    special_tokens_map.json and config.json next to it are read for the special tokens (module
    docstring). Ids, encoding and decoding are exactly the `tokenizers` library's, which is what
    transformers' fast tokenizers run.
    """

    def __init__(self, path: str):
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_JSON)
        if not os.path.isfile(path):
            raise TokenizerFileError(f"tokenizer file {path!r} does not exist; give the path of a tokenizer.json "
                                     "(or a folder holding one)")
        self.path = path
        self._tokenizer = None
        super().__init__(extra_ids=0)
        tokenizer = self.tokenizer  # reads the file now: a bad one fails here, in one line
        hf = hf_special_tokens(os.path.dirname(path))
        own = {"unk": self._model_unk(tokenizer)}
        front, back = _post_processor_adds(tokenizer)
        own.update(bos=front, eos=back)
        for kind, names in _USUAL_NAMES.items():
            found = [tokenizer.token_to_id(n) for n in names if tokenizer.token_to_id(n) is not None]
            if own.get(kind) is None and found:
                own[kind] = found[0]
        self._special = _resolve_ids(own, hf, tokenizer.token_to_id, self._base_vocab_size)
        self._add = {"bos": front is not None and front == self._special["bos"],
                     "eos": back is not None and back == self._special["eos"]}

    @staticmethod
    def _model_unk(tokenizer) -> Optional[int]:
        unk = getattr(tokenizer.model, "unk_token", None)
        return tokenizer.token_to_id(unk) if isinstance(unk, str) else None

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` (loaded on first use, also after unpickling)."""
        if self._tokenizer is None:
            import tokenizers

            try:
                self._tokenizer = tokenizers.Tokenizer.from_file(self.path)
            except Exception as e:  # noqa: BLE001 (tokenizers raises a plain Exception on bad files)
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TokenizerFileError(f"{self.path!r} is not a tokenizer.json the tokenizers library reads "
                                         f"({reason}); save the tokenizer again with save_pretrained") from None
        return self._tokenizer

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_tokenizer"] = None
        return state

    @property
    def _base_vocab_size(self) -> int:
        tokenizer = self.tokenizer
        top = max(tokenizer.get_added_tokens_decoder(), default=-1)  # {id: AddedToken}
        return max(tokenizer.get_vocab_size(with_added_tokens=True), top + 1)

    def _encode(self, s: str) -> Sequence[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """Runs `_encode` in Python (tf.numpy_function): a scalar string -> int32 ids; a 1-D batch
        of strings -> a RaggedTensor of ids."""
        def encode_one(text) -> np.ndarray:
            text = text.item() if isinstance(text, np.ndarray) else text  # a 0-d array of bytes
            return np.asarray(self._encode(text.decode("utf-8")), np.int32)

        def encode_many(texts: np.ndarray):
            ids = [encode_one(t) for t in texts.reshape(-1)]
            flat = np.concatenate(ids) if ids else np.zeros([0], np.int32)
            return flat.astype(np.int32), np.asarray([len(x) for x in ids], np.int64)

        s = tf.convert_to_tensor(s, tf.string)
        if s.shape.rank == 0:
            out = tf.numpy_function(encode_one, [s], tf.int32, stateful=False)
            out.set_shape([None])
            return out
        flat, lengths = tf.numpy_function(encode_many, [s], (tf.int32, tf.int64), stateful=False)
        flat.set_shape([None])
        lengths.set_shape([None])
        return tf.RaggedTensor.from_row_lengths(flat, lengths)

    def _rows_to_text(self, ids, decode) -> tf.Tensor:
        """`decode` (a Python function of an id list) over the last axis of `ids`, in Python."""
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.to_tensor()
        ids = tf.convert_to_tensor(ids)

        def run(x: np.ndarray) -> np.ndarray:
            rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            out = []
            for row in rows:
                row = [int(t) for t in row]
                if self.zero_is_padding:  # only then is a 0 surely padding
                    row = [t for t in row if t != 0]
                out.append(decode(row).encode("utf-8"))
            return np.asarray(out, dtype=object).reshape(x.shape[:-1])

        out = tf.numpy_function(run, [ids], tf.string, stateful=False)
        out.set_shape(ids.shape[:-1])
        return out

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Runs `_decode` in Python: [length] ids -> a scalar string; [batch, length] -> [batch].
        Where id 0 is a real token (GPT-2's "!"), rows padded with 0 decode their padding too:
        cut rows to their lengths first."""
        return self._rows_to_text(ids, self._decode)

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Up to the first EOS, as `decode`; seqio's version would write pad id 0 after the EOS,
        which is a real token for GPT-2-like tokenizers."""
        if ids.shape == (0,):
            return tf.constant(b"", dtype=tf.string)
        return self._rows_to_text(ids, self.decode)

    def __eq__(self, other):
        return isinstance(other, HFTokenizerVocabulary) and other.path == self.path

    def __hash__(self):
        return hash(self.path)

    def __str__(self):
        return f"HFTokenizerVocabulary({self.path!r}, vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------ SentencePiece


@contextlib.contextmanager
def _without_seqio_pad_warning():
    """seqio warns when a model's pad id is not 0; padding here is by position (module docstring)."""
    def keep(record):
        return not str(record.msg).startswith("T5 library uses PAD_ID")

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class SentencePieceModelVocabulary(_SpecialTokensMixin, seqio.SentencePieceVocabulary):
    """A SentencePiece `.model` file with its own special-token ids (any layout; module docstring).

    Encoding is SentencePiece's own, as seqio's SentencePieceVocabulary; `eos_id` (what seqio and this
    project's preprocessors append) is the model's EOS, or the HF files' where they name another. This
    adds the HF files' special tokens, `add_bos` / `add_eos`, and None (not -1) for an id the model
    lacks. `extra_ids` sentinels are appended after the model's pieces, as T5's. transformers >= 5
    converts a bare .model to a BPE tokenizer.json, which can split a run of leading spaces
    differently; the folder with the checkpoint's tokenizer.json matches transformers exactly.
    """

    def __init__(self, path: str, extra_ids: int = 0):
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.isfile(path):
            raise TokenizerFileError(f"SentencePiece model file {path!r} does not exist; give the path of a "
                                     "local .model file (nothing is downloaded)")
        super().__init__(path, extra_ids=extra_ids)
        try:
            with _without_seqio_pad_warning():
                sp = self.tokenizer
            own = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
        except Exception as e:  # noqa: BLE001 (sentencepiece raises OSError/RuntimeError on bad files)
            raise TokenizerFileError(f"{path!r} is not a SentencePiece model ({type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        own = {k: (v if v >= 0 else None) for k, v in own.items()}
        folder = os.path.dirname(path)
        hf = hf_special_tokens(folder)

        def piece_id(token):
            i = sp.piece_to_id(token)
            return i if sp.id_to_piece(i) == token else None  # unknown pieces map to unk

        self._special = _resolve_ids(own, hf, piece_id, sp.get_piece_size())
        add_bos, add_eos = hf["add_bos"], hf["add_eos"]
        if add_bos is None and os.path.isfile(os.path.join(folder, TOKENIZER_JSON)):
            add_bos, add_eos = self._from_tokenizer_json(folder, add_eos)
        self._add = {"bos": own["bos"] is not None if add_bos is None else add_bos, "eos": bool(add_eos)}

    def _from_tokenizer_json(self, folder: str, add_eos):
        try:
            other = HFTokenizerVocabulary(folder)
        except TokenizerFileError:
            return None, add_eos
        return other.add_bos, other.add_eos if add_eos is None else add_eos

    def __str__(self):
        return (f"SentencePieceModelVocabulary({self.sentencepiece_model_file!r}, extra_ids={self.extra_ids}, "
                f"bos={self.bos_id}, eos={self.eos_id}, unk={self.unk_id}, pad={self.tokenizer_pad_id})")


def find_tokenizer_file(path: str) -> Optional[str]:
    """The tokenizer a folder holds: tokenizer.json (what transformers' AutoTokenizer loads),
    else tokenizer.model, else spiece.model; None if none."""
    for name in (TOKENIZER_JSON, *SENTENCEPIECE_FILES):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    return None


def load(path: str, extra_ids: Optional[int] = None) -> seqio.Vocabulary:
    """The vocabulary of a tokenizer file (.model or .json) or of a folder holding one."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        found = find_tokenizer_file(path)
        if found is None:
            raise TokenizerFileError(f"folder {path!r} holds no {TOKENIZER_JSON}, tokenizer.model or spiece.model")
        path = found
    if path.endswith(".json"):
        return HFTokenizerVocabulary(path)
    return SentencePieceModelVocabulary(path, extra_ids or 0)
