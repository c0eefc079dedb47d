"""Preference data for DPO: JSONL (prompt, chosen, rejected) records as a seqio task.

    name = register_preference_task(files={"train": ["prefs/*.jsonl"], "validation": ["dev.jsonl"]})
    # gin: MIXTURE_OR_TASK_NAME = @register_preference_task()   (gin/runs/dpo.gin)

Records, one JSON object per line (field names: `prompt_field`, `chosen_field`, `rejected_field`):

- `{"prompt": "...", "chosen": "...", "rejected": "..."}`: the prompt is one user message;
- chat: `{"messages": [...prompt turns...], "chosen": "...", "rejected": "..."}` (the turns before
  the reply: system / user / earlier assistant messages); TRL's conversational form, a `prompt` that
  is such a list and `chosen` / `rejected` given as `[{"role": "assistant", "content": ...}]`, works too.

The prompt is rendered with a chat template (`template=`, as `register_instruction_task`: "plain",
"alpaca", "hf:<dir>" or a Jinja template) with the generation prompt: "inputs"; each completion is
what rendering the prompt plus that assistant reply adds (the reply and the template's end-of-turn
text): "targets" (chosen) and "rejected". All three are tokenized with the task's vocabulary;
targets and rejected end with EOS, inputs only with `inputs_eos=True` (default False: the prompt a
decoder-only model continues).

Lengths: the user gives TASK_FEATURE_LENGTHS {"inputs": P, "targets": C}; "rejected" gets C too
(`tasks.check_task_feature_lengths` adds it; another value is refused). A prompt longer than P keeps
its END (`instructions.keep_end_of_inputs`: the latest turns and the assistant header), a completion
longer than C keeps its start and its EOS. How many prompts, chosen and rejected completions were
cut is logged (a warning of logger `t5x_like.data.preferences`) the first time a split is read with
given lengths, and returned by `truncation_counts(name, lengths, split)`.

Batches: the task's output features include "rejected", so `tasks.feature_converter_for_task` reads
it with `tasks.PreferenceFeatureConverter` around the model's own unpacked converter: each example
becomes two adjacent rows, prompt + chosen then prompt + rejected, the loss weights exactly on the
completion: the layout `objectives.preference.DPOLoss` reads, for every model family. Pairs are
never packed, and the per-host batch size must be even (`iterators.get_dataset` checks).

Every file is read once, at registration, and every record checked: a bad one is an
`InstructionError` naming `path:LINE`, before training starts. A pair whose chosen and rejected
completions are the same text is dropped with a warning and counted (`identical_dropped`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from t5x_like.data import instructions
from t5x_like.data import tasks as tasks_lib
from t5x_like.data import vocabularies as vocab_lib
from t5x_like.data.chat_templates import ChatTemplate, InstructionError, get_template, split_conversation

logger = logging.getLogger(__name__)
FEATURES = ("inputs", "targets", tasks_lib.REJECTED)


@dataclasses.dataclass(frozen=True)
class PreferenceFormat:
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    messages_field: str = "messages"


def _completion(record, field: str, where: str, fmt: PreferenceFormat) -> str:
    if field not in record:
        setting = "chosen_field" if field == fmt.chosen_field else "rejected_field"
        raise InstructionError(f"{where}: record has no {field!r} field; it has {sorted(record)[:8]}: add it, or "
                               f"name the record's field with {setting}=...")
    value = record[field]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        return value[0]["content"]  # TRL's conversational form
    if not isinstance(value, str):
        raise InstructionError(f"{where}: field {field!r} must be a string (or [{{\"role\": \"assistant\", "
                               f"\"content\": ...}}]), got a {instructions._type_name(value)}")
    return value


def record_example(record, fmt: PreferenceFormat, template: ChatTemplate, where: str) -> tuple[str, str, str]:
    """(inputs, chosen targets, rejected targets) text of one parsed JSONL record, checked."""
    if not isinstance(record, dict):
        raise InstructionError(f"{where}: a record must be a JSON object, got a {instructions._type_name(record)}; "
                               "write one object per line")
    prompt = record.get(fmt.prompt_field)
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        turns, field = prompt, fmt.prompt_field
    elif fmt.messages_field in record and prompt is None:
        turns, field = record[fmt.messages_field], fmt.messages_field
    elif prompt is None:
        raise InstructionError(f"{where}: record has no {fmt.prompt_field!r} field (nor a {fmt.messages_field!r} "
                               f"list); it has {sorted(record)[:8]}: add it, or name the record's field with "
                               "prompt_field=...")
    else:
        raise InstructionError(f"{where}: field {fmt.prompt_field!r} must be a string or a list of messages, got a "
                               f"{instructions._type_name(prompt)}")
    if not isinstance(prompt, str) and (not isinstance(turns, list) or not turns):
        raise InstructionError(f"{where}: {field!r} must be a non-empty list of {{\"role\", \"content\"}} prompt "
                               "messages")
    chosen = _completion(record, fmt.chosen_field, where, fmt)
    rejected = _completion(record, fmt.rejected_field, where, fmt)
    out = []
    for reply in (chosen, rejected):
        # record_messages checks every message (roles, content) and names the record's line.
        messages = instructions.record_messages(
            {"messages": list(turns) + [{"role": "assistant", "content": reply}]},
            instructions.RecordFormat("chat"), where)
        out.append(split_conversation(template, messages, where)[-1])
    (inputs, chosen_text), (inputs_r, rejected_text) = out
    if inputs != inputs_r:  # a template that renders the prompt depending on the reply
        raise InstructionError(f"{where}: {template.name} renders the prompt differently for the chosen and the "
                               "rejected reply; use another template")
    return inputs, chosen_text, rejected_text


def examples_from_file(path: str, fmt: PreferenceFormat, template: ChatTemplate) -> list[tuple[str, str, str]]:
    return [record_example(record, fmt, template, f"{path}:{n}") for n, record in instructions.read_jsonl(path)]


class PreferenceSource(instructions.InMemorySource):
    """The rendered {"inputs", "targets", "rejected"} strings of each split (served as
    `InMemorySource` does), without the pairs whose completions are identical, and the truncation
    counts of given lengths."""

    FEATURES = FEATURES
    KIND = "preference"

    def __init__(self, examples: Mapping[str, Sequence[tuple[str, str, str]]], vocabulary, inputs_eos: bool):
        # A pair whose two completions are the same text has no preference to learn (its DPO loss is
        # log 2 whatever the weights): it is dropped, counted and warned about.
        kept = {s: [e for e in rows if e[1] != e[2]] for s, rows in examples.items()}
        self.identical = {s: len(rows) - len(kept[s]) for s, rows in examples.items()}
        for split, n in self.identical.items():
            if n:
                logger.warning("preference split %r: %d of %d pairs have chosen == rejected and are dropped (no "
                               "preference to learn); fix the data to use them", split, n, len(examples[split]))
        self._vocabulary, self._inputs_eos = vocabulary, bool(inputs_eos)
        self._token_counts: dict[str, list[tuple[int, int, int]]] = {}
        self._reported: set = set()
        super().__init__(kept)

    def truncation_counts(self, split: str, lengths: Mapping[str, int]) -> dict[str, int]:
        """How many of the split's prompts / chosen / rejected completions the lengths cut."""
        if split not in self._token_counts:
            encode = self._vocabulary.encode
            self._token_counts[split] = [(len(encode(i)), len(encode(c)), len(encode(r)))
                                         for i, c, r in self.examples(split)]
        inputs_max = int(lengths["inputs"]) - self._inputs_eos
        targets_max = int(lengths["targets"]) - 1
        counts = self._token_counts[split]
        return {"examples": len(counts), "identical_dropped": self.identical.get(split, 0),
                "prompts_cut": sum(i > inputs_max for i, _, _ in counts),
                "chosen_cut": sum(c > targets_max for _, c, _ in counts),
                "rejected_cut": sum(r > targets_max for _, _, r in counts)}

    def _report(self, split: str, lengths: Optional[Mapping[str, int]]) -> None:
        if not lengths or "inputs" not in lengths or "targets" not in lengths:
            return
        key = (split, int(lengths["inputs"]), int(lengths["targets"]))
        if key in self._reported:
            return
        self._reported.add(key)
        c = self.truncation_counts(split, lengths)
        if c["prompts_cut"] or c["chosen_cut"] or c["rejected_cut"]:
            logger.warning("preference split %r with lengths inputs=%d targets=%d: of %d pairs, %d prompts were "
                           "cut at the front, %d chosen and %d rejected completions at the end", split, key[1],
                           key[2], c["examples"], c["prompts_cut"], c["chosen_cut"], c["rejected_cut"])

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: Optional[int] = None,
                    shard_info: Optional[seqio.ShardInfo] = None, *, sequence_length=None,
                    use_cached: bool = False, num_epochs: Optional[int] = 1) -> tf.data.Dataset:
        self.examples(split)  # an unknown split is refused before anything is reported
        self._report(split, sequence_length)
        return super().get_dataset(split, shuffle, seed, shard_info, sequence_length=sequence_length,
                                   use_cached=use_cached, num_epochs=num_epochs)


def truncation_counts(name: str, task_feature_lengths: Mapping[str, int], split: str = "train") -> dict[str, int]:
    """{"examples", "identical_dropped", "prompts_cut", "chosen_cut", "rejected_cut"} of a registered
    preference task."""
    return seqio.get_mixture_or_task(name).source.truncation_counts(split, task_feature_lengths)


_TASKS = instructions.JsonlTasks("preferences", "register_preference_task")


@gin.configurable
def register_preference_task(name: Optional[str] = None, files: instructions.Files = gin.REQUIRED,
                             vocabulary: str = "spm", template: str = "plain", prompt_field: str = "prompt",
                             chosen_field: str = "chosen", rejected_field: str = "rejected",
                             messages_field: str = "messages", inputs_eos: bool = False) -> str:
    """Register a seqio task with "inputs", "targets" (chosen) and "rejected" from JSONL preference
    data (see the module docstring); return its name.

    `files`: {split: [paths or globs]} (a glob or a list of them is the train split). `vocabulary`:
    a registered name ("spm", "byte") or a SentencePiece .model path. `template`: as
    `register_instruction_task`. `name`: by default "preferences_" and a digest of the settings.
    Every record is read and checked now (errors name path:LINE); calling again with the same
    settings and unchanged files returns at once.
    """
    for setting, value in (("prompt_field", prompt_field), ("chosen_field", chosen_field),
                           ("rejected_field", rejected_field), ("messages_field", messages_field)):
        if not isinstance(value, str) or not value:
            raise InstructionError(f"{setting}={value!r} must be a field name")
    chat_template = get_template(template)
    vocab_name = vocab_lib.vocabulary_name(vocabulary)
    vocab = vocab_lib.get_vocabulary(vocab_name)
    fmt = PreferenceFormat(prompt_field, chosen_field, rejected_field, messages_field)
    name, examples, key = _TASKS.prepare(name, files, fmt, chat_template, vocab_name, inputs_eos,
                                         lambda path: examples_from_file(path, fmt, chat_template))
    if _TASKS.is_current(name, key):
        return name
    seqio.TaskRegistry.remove(name)
    completion = seqio.Feature(vocabulary=vocab, add_eos=True, dtype=tf.int32)
    seqio.TaskRegistry.add(
        name,
        source=PreferenceSource(examples, vocab, inputs_eos),
        output_features={
            "inputs": seqio.Feature(vocabulary=vocab, add_eos=bool(inputs_eos), dtype=tf.int32),
            "targets": completion, tasks_lib.REJECTED: completion},
        preprocessors=[
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=True),
            instructions.keep_end_of_inputs,
            seqio.preprocessors.append_eos_after_trim,
        ],
    )
    _TASKS.registered(name, key)
    return name
