"""Instruction tuning data: JSONL prompt/response or chat records as seqio tasks with "inputs" and "targets".

    name = register_instruction_task("my_sft", {"train": ["sft/*.jsonl"], "validation": ["dev.jsonl"]})
    # gin: MIXTURE_OR_TASK_NAME = @register_instruction_task()   (gin/runs/instruction_tuning.gin)

Records, one JSON object per line (`format="auto"` tells them apart per record):

- prompt/response: `{"prompt": ..., "response": ...}` (field names: `prompt_field`, `response_field`)
  is the chat `[user: prompt, assistant: response]`;
- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`.

A conversation gives ONE EXAMPLE PER ASSISTANT MESSAGE: `inputs` = the conversation before it
rendered with the generation prompt (the assistant header), `targets` = the rest of the conversation
rendered up to and including that message: the reply plus the template's end-of-turn text. So only
assistant text is ever a target (the loss of every model family's converter), and the tasks keep
seqio's (inputs, targets) convention: an encoder-decoder reads inputs -> targets, a decoder-only
model inputs + targets with the loss on the targets.

Templates (`template=`):

- "plain" (default): `<|system|>\\n{content}`, `<|user|>\\n{content}`, `<|assistant|>\\n{content}`
  joined by "\\n"; the generation prompt is "\\n<|assistant|>\\n". A prompt/response record becomes
  inputs "<|user|>\\n{prompt}\\n<|assistant|>\\n", targets "{response}".
- "alpaca": the Alpaca prompt; a system message replaces its preamble ("Below is an instruction
  that describes a task. ..."), user turns are "### Instruction:\\n{content}", assistant turns
  "### Response:\\n{content}", joined by "\\n\\n". Targets are the reply alone.
- "hf:<dir>": a Hugging Face tokenizer folder's own Jinja chat template (`chat_template.jinja`, else
  `chat_template` in `tokenizer_config.json`), rendered as transformers' `apply_chat_template` does
  (sandboxed Jinja, `messages`, `add_generation_prompt`, `bos_token`/`eos_token`/... from the
  tokenizer config). Splitting at assistant turns renders prefixes: inputs = render(messages[:i],
  add_generation_prompt=True), targets = render(messages[:i+1])[len(inputs):]; a template for which
  the first is no prefix of the second is refused. Special tokens such as `<|eot_id|>` stay text:
  the task's vocabulary tokenizes them.
- any other string containing "{{" or "{%": such a Jinja template itself.

EOS: targets end with EOS, and so do inputs (`inputs_eos=True`, seqio/T5X's convention for
(inputs, targets) tasks and what an encoder-decoder's `prompt_ids` gives at inference); pass
`inputs_eos=False` for a prompt that a decoder-only model continues directly. A prompt longer than
its feature length keeps its end (the latest turns and the assistant header); targets keep their
start.

Every file is read once, at registration, and every record checked: a bad one is an
`InstructionError` naming `path:LINE` and the fix, before any training starts. The rendered
examples are kept in memory (instruction sets are small) and streamed in file order, or, when
shuffled, in a seeded permutation of the whole split per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import glob as globlib
import hashlib
import json
import os
import re
from typing import Callable, Mapping, Optional, Sequence, Union

import gin
import seqio
import tensorflow as tf

from t5x_like.data import vocabularies as vocab_lib
from t5x_like.data.chat_templates import ROLES, ChatTemplate, InstructionError, get_template, split_conversation

FORMATS = ("auto", "prompt_response", "chat")
_TASK_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:]*$")

Files = Union[str, Sequence[str], Mapping[str, Union[str, Sequence[str]]]]


# --------------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class RecordFormat:
    """How records are read: `format` and the field names."""
    format: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"


def _type_name(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__)


def record_messages(record, fmt: RecordFormat, where: str) -> list[dict]:
    """The conversation of one parsed JSONL record, checked (errors name `where`, i.e. path:LINE)."""
    if not isinstance(record, dict):
        raise InstructionError(f"{where}: a record must be a JSON object, got a {_type_name(record)}; write one "
                               "object per line")
    chat = fmt.format == "chat" or (fmt.format == "auto" and fmt.messages_field in record)
    if not chat:
        fields = []
        for field in (fmt.prompt_field, fmt.response_field):
            if field not in record:
                hint = (f" (nor a {fmt.messages_field!r} list)" if fmt.format == "auto" else "")
                setting = "prompt_field" if field == fmt.prompt_field else "response_field"
                raise InstructionError(
                    f"{where}: record has no {field!r} field{hint}; it has {sorted(record)[:8]}: add it, or name "
                    f"the record's field with {setting}=...")
            if not isinstance(record[field], str):
                raise InstructionError(f"{where}: field {field!r} must be a string, got a "
                                       f"{_type_name(record[field])}")
            fields.append(record[field])
        return [{"role": "user", "content": fields[0]}, {"role": "assistant", "content": fields[1]}]
    messages = record.get(fmt.messages_field)
    if messages is None:
        raise InstructionError(f"{where}: record has no {fmt.messages_field!r} field; it has {sorted(record)[:8]}: "
                               "add a list of {\"role\", \"content\"} messages, or name it with messages_field=...")
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else "a " + _type_name(messages)
        raise InstructionError(f"{where}: {fmt.messages_field!r} must be a non-empty list of {{\"role\", "
                               f"\"content\"}} messages, got {got}")
    out = []
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise InstructionError(f"{where}: message {n} must be an object with \"role\" and \"content\", got a "
                                   f"{_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            what = f"has role {role!r}" if "role" in message else "has no 'role'"
            raise InstructionError(f"{where}: message {n} {what}; roles are {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            what = "has no 'content'" if content is None else f"has content of type {_type_name(content)}"
            raise InstructionError(f"{where}: message {n} {what}; each message needs its text as a "
                                   "\"content\" string")
        out.append({k: v for k, v in message.items() if v is not None})
    if not any(m["role"] == "assistant" for m in out):
        raise InstructionError(f"{where}: conversation has no assistant message, so nothing to learn; add the "
                               "assistant's reply (role 'assistant') or drop the record")
    return out


def read_jsonl(path: str):
    """(line number, parsed record) for each non-blank line; bad UTF-8 or JSON is an error at path:LINE."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InstructionError(f"{path}:{n}: not valid UTF-8 (byte {e.start + 1} of the line); convert "
                                       "the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if n == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise InstructionError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line "
                                       "must be one JSON object") from None


def examples_from_file(path: str, fmt: RecordFormat, template: ChatTemplate) -> list[tuple[str, str]]:
    """Every (inputs, targets) example of a JSONL file, in order."""
    out = []
    for n, record in read_jsonl(path):
        where = f"{path}:{n}"
        out.extend(split_conversation(template, record_messages(record, fmt, where), where))
    return out


def _split_files(files: Files, what: str) -> dict[str, list[str]]:
    """{split: sorted absolute paths} from a glob, a list of globs (both "train") or {split: globs}."""
    if isinstance(files, str):
        files = {"train": [files]}
    elif not isinstance(files, Mapping):
        if files is None or not isinstance(files, (list, tuple)):
            raise InstructionError(f"{what}: files={files!r} must be a path or glob, a list of them (the train "
                                   "split), or {split: [paths or globs]}, e.g. {'train': ['sft/*.jsonl']}")
        files = {"train": list(files)}
    if not files:
        raise InstructionError(f"{what}: files is empty; give e.g. {{'train': ['sft/*.jsonl']}}")
    out = {}
    for split, patterns in files.items():
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        if not patterns:
            raise InstructionError(f"{what}: split {split!r} names no files; give paths or globs, or drop the split")
        found = set()
        for pattern in patterns:
            matched = {os.path.abspath(p) for p in globlib.glob(os.path.expanduser(str(pattern)))
                       if os.path.isfile(p)}
            if not matched:
                raise InstructionError(f"{what}: {pattern!r} (split {split!r}) matches no file; check the path, "
                                       "or give a glob such as '/data/sft/*.jsonl'")
            found |= matched
        out[str(split)] = sorted(found)
    return out


# -------------------------------------------------------------------------------------- the task


class InMemorySource(seqio.DataSource):
    """Rendered string examples of each split, one tuple per example in `FEATURES` order, served in
    file order; hosts take every n-th example (`shard_info`). With `shuffle`, each host's examples
    are shuffled in full, anew every epoch, from the seed (they are in memory; seqio's Task shuffles
    its buffer as well). Shared by the JSONL tasks (instruction and preference data); a subclass
    names its `FEATURES` and `KIND` (the task kind error messages name)."""

    FEATURES: tuple[str, ...] = ()
    KIND = "in-memory"

    def __init__(self, examples: Mapping[str, Sequence[tuple[str, ...]]]):
        self._examples = {s: list(e) for s, e in examples.items()}
        # No num_input_examples: seqio would then `cache()` a small split in memory (it already is),
        # which freezes the first epoch's order.
        super().__init__(splits=tuple(self._examples), caching_permitted=False)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def __repr__(self):
        return f"{type(self).__name__}({ {s: len(e) for s, e in self._examples.items()} })"

    def examples(self, split: str) -> list[tuple[str, ...]]:
        """The split's examples; an unknown split is an `InstructionError` naming the known ones."""
        if split not in self._examples:
            raise InstructionError(f"{self.KIND} task has no split {split!r}; it has {list(self._examples)}")
        return self._examples[split]

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        rows = self.examples(split)
        ds = tf.data.Dataset.from_tensor_slices(
            {k: tf.constant([r[n] for r in rows], tf.string) for n, k in enumerate(self.FEATURES)})
        if shard_info and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if shuffle and len(rows) > 1:
            ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
        return ds


class InstructionSource(InMemorySource):
    """The rendered {"inputs", "targets"} strings of each split (see `InMemorySource`)."""

    FEATURES = ("inputs", "targets")
    KIND = "instruction"


def keep_end_of_inputs(dataset: tf.data.Dataset, output_features, sequence_length=None) -> tf.data.Dataset:
    """Cut a too-long `inputs` from the front, so the prompt keeps its latest turns and the
    assistant header (room is left for the EOS `append_eos_after_trim` adds)."""
    if not sequence_length or sequence_length.get("inputs") is None:
        return dataset
    keep = int(sequence_length["inputs"]) - int(bool(output_features["inputs"].add_eos))

    def cut(example):
        inputs = example["inputs"]
        return {**example, "inputs": inputs[tf.maximum(tf.size(inputs) - keep, 0):]}

    return dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE)


def _file_state(paths: Sequence[str]) -> list:
    return [(p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths]


class JsonlTasks:
    """What registering seqio tasks from JSONL files needs besides the records themselves (shared
    by instruction and preference tasks): the task name (given, or `prefix` + a digest of the
    settings), every file read once per content state, and a re-registration only when the files or
    the settings changed (a gin macro calls the registering function wherever it is used)."""

    def __init__(self, prefix: str, caller: str):
        self.prefix, self.caller = prefix, caller
        self._examples: dict[str, tuple[str, dict]] = {}   # settings -> (file state, examples per split)
        self._registered: dict[str, tuple] = {}           # task name -> registration key

    def prepare(self, name: Optional[str], files: Files, fmt, template: ChatTemplate, vocab_name: str,
                inputs_eos: bool, read: Callable[[str], list], extra_key: tuple = ()) -> tuple[str, dict, tuple]:
        """(task name, {split: examples}, registration key): `read(path)` gives a file's examples."""
        what = f"{self.caller}({name!r})" if name else self.caller
        split_files = _split_files(files, what)
        settings = [split_files, dataclasses.astuple(fmt), template.fingerprint()]
        if name is None:
            digest = hashlib.sha256(json.dumps([settings, vocab_name, inputs_eos]).encode()).hexdigest()
            name = f"{self.prefix}_{digest[:12]}"
        if not isinstance(name, str) or not _TASK_NAME_RE.match(name):
            raise InstructionError(f"task name {name!r} must start with a letter and hold only letters, digits, "
                                   "'_', '.' and ':'")
        if name in seqio.TaskRegistry.names() and name not in self._registered:
            raise InstructionError(f"a seqio task named {name!r} is already registered (not by {self.caller}); "
                                   "choose another name")
        settings_key = json.dumps(settings)
        state = json.dumps({s: _file_state(p) for s, p in split_files.items()})
        if self._examples.get(settings_key, (None,))[0] != state:
            examples = {}
            for split, paths in split_files.items():
                examples[split] = [ex for path in paths for ex in read(path)]
                if not examples[split]:
                    raise InstructionError(f"{what}: the files of split {split!r} ({', '.join(paths[:3])}"
                                           f"{', ...' if len(paths) > 3 else ''}) hold no records; point it at "
                                           "JSONL files with records")
            self._examples[settings_key] = (state, examples)
        key = (settings_key, state, vocab_name, bool(inputs_eos), *extra_key)
        return name, self._examples[settings_key][1], key

    def is_current(self, name: str, key: tuple) -> bool:
        """Whether `name` is registered already with exactly this key (nothing to do)."""
        return self._registered.get(name) == key and name in seqio.TaskRegistry.names()

    def registered(self, name: str, key: tuple) -> None:
        self._registered[name] = key


_TASKS = JsonlTasks("instructions", "register_instruction_task")


@gin.configurable
def register_instruction_task(name: Optional[str] = None, files: Files = gin.REQUIRED, vocabulary: str = "spm",
                              format: str = "auto", prompt_field: str = "prompt",  # noqa: A002
                              response_field: str = "response", messages_field: str = "messages",
                              template: str = "plain", metric_fns: Sequence[Callable] = (),
                              inputs_eos: bool = True) -> str:
    """Register a seqio task with "inputs" and "targets" from JSONL instruction data; return its name.

    `files`: {split: [paths or globs]} (a glob or a list of them is the train split). `vocabulary`:
    a registered name ("spm", "byte") or a SentencePiece .model path. `format`: "auto" (per record:
    a `messages_field` list is a chat, otherwise `prompt_field`/`response_field`), "prompt_response"
    or "chat". `template`: "plain", "alpaca", "hf:<tokenizer folder>" or a Jinja chat template (see
    the module docstring). `metric_fns`: seqio metric functions of the task (none by default).
    `name`: by default "instructions_" and a digest of the files and settings.

    Every file is read and every record rendered now, so bad data fails here with one line naming
    path:LINE. Calling it again with the same settings and unchanged files returns at once (a gin
    macro `@register_instruction_task()` is called wherever it is used).
    """
    if format not in FORMATS:
        raise InstructionError(f"format={format!r} is not one of {FORMATS}")
    for setting, value in (("prompt_field", prompt_field), ("response_field", response_field),
                           ("messages_field", messages_field)):
        if not isinstance(value, str) or not value:
            raise InstructionError(f"{setting}={value!r} must be a field name")
    chat_template = get_template(template)
    vocab_name = vocab_lib.vocabulary_name(vocabulary)
    vocab = vocab_lib.get_vocabulary(vocab_name)  # unknown names fail now; never trains a model
    fmt = RecordFormat(format, prompt_field, response_field, messages_field)
    metric_fns = list(metric_fns or ())
    name, examples, key = _TASKS.prepare(name, files, fmt, chat_template, vocab_name, inputs_eos,
                                         lambda path: examples_from_file(path, fmt, chat_template),
                                         extra_key=(tuple(metric_fns),))
    if _TASKS.is_current(name, key):
        return name
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=InstructionSource(examples),
        output_features={
            "inputs": seqio.Feature(vocabulary=vocab, add_eos=bool(inputs_eos), dtype=tf.int32),
            "targets": seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)},
        preprocessors=[
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
            keep_end_of_inputs,
            seqio.preprocessors.append_eos_after_trim,
        ],
        metric_fns=metric_fns,
    )
    _TASKS.registered(name, key)
    return name
