"""seqio tasks for every objective on every corpus and vocabulary, mixtures, and feature converters.

Tasks are named `{corpus}_{objective}_{vocabulary}` (e.g. `embedded_span_corruption_spm`,
`wiki_lm_byte`) and exist as soon as both the corpus and the vocabulary are registered, in any
order. Registering builds nothing: the embedded corpus is written and the SentencePiece model
trained when a dataset is first requested. Each task reads `{"text"}` documents, tokenizes them
without EOS and hands one document per example to the objective's preprocessor, which chunks the
document stream and adds EOS itself.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import gin
import seqio
import tensorflow as tf

from t5x_like.data import corpus as corpus_lib
from t5x_like.data.corpus import CorpusError
from t5x_like.data import preprocessors
from t5x_like.data import vocabularies as vocab_lib

OBJECTIVES = ("span_corruption", "lm", "prefix_lm", "mlm")
_PREPROCESSORS = {
    "span_corruption": preprocessors.span_corruption,
    "lm": preprocessors.next_token_lm,
    "prefix_lm": preprocessors.prefix_lm,
    "mlm": preprocessors.masked_lm,
}
_FEATURES = {"span_corruption": ("inputs", "targets"), "lm": ("targets",),
             "prefix_lm": ("inputs", "targets"), "mlm": ("inputs", "targets")}


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a registered task or mixture is made of; the converter follows from `objective` (and,
    for an LM task read one document per row, `bos_id`: see `register_document_lm_task`)."""
    corpus: Optional[str]
    objective: str
    vocabulary: str
    bos_id: Optional[int] = None


_TASKS: dict[str, TaskInfo] = {}
_MIXTURES: dict[str, tuple[tuple[tuple[str, float], ...], str]] = {}


def task_name(corpus: str, objective: str, vocabulary: str) -> str:
    return f"{corpus}_{objective}_{vocabulary}"


def mixture_name(corpus: str, vocabulary: str) -> str:
    """Default encoder-decoder mixture of a corpus: span corruption and prefix LM, rates 1:1."""
    return f"{corpus}_mix_{vocabulary}"


# A seqio task or mixture registered outside t5x_like.data (`seqio.TaskRegistry.add` in the user's
# module, TFDS-backed, from files, ...): its examples are supervised (inputs, targets) pairs or plain
# targets, and the model picks the feature converter (`BaseModel.feature_converter`), as in T5X.
EXTERNAL = "external"
# A task whose output features include "rejected" holds preference pairs (data/preferences.py):
# inputs (the prompt), targets (the chosen completion) and rejected; `PreferenceFeatureConverter`
# reads it as adjacent (chosen, rejected) rows for objectives/preference.DPOLoss.
REJECTED = "rejected"


def is_registered(name: str) -> bool:
    return name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()


def info(name: str) -> TaskInfo:
    """Corpus, objective and vocabulary of a task or mixture registered here; objective EXTERNAL
    (no corpus, vocabulary from its features) for one registered with seqio directly."""
    if name in _TASKS:
        return _TASKS[name]
    if is_registered(name):
        return TaskInfo(None, EXTERNAL, "")
    known = sorted(_TASKS)
    raise CorpusError(f"no task or mixture {name!r} is registered (by t5x_like.data or seqio); e.g. {known[:6]} (all: "
                      "t5x_like.data.task_names()). Register a corpus with register_corpus, a mixture with "
                      "register_mixture, or your own task with seqio.TaskRegistry.add in a module your gin "
                      "file imports")


def output_features(name: str) -> tuple[str, ...]:
    """The token features ("inputs", "targets") a task or mixture's examples carry."""
    features = seqio.get_mixture_or_task(name).output_features
    return tuple(k for k in ("inputs", "targets") if k in features)


def task_names() -> list[str]:
    """Tasks and mixtures registered here (seqio's registries may hold others)."""
    return sorted(_TASKS)


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise CorpusError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def register_tasks(corpus_name: str, vocabulary_name: str) -> list[str]:
    """(Re)register the tasks of every objective, and the default mixture, for one corpus and
    vocabulary. Replaces existing ones, so a re-registered corpus gets fresh sources."""
    corpus = corpus_lib.get_corpus(corpus_name)
    vocabulary = vocab_lib.get_vocabulary(vocabulary_name)
    names = []
    for objective in OBJECTIVES:
        name = task_name(corpus_name, objective, vocabulary_name)
        feature = seqio.Feature(vocabulary=vocabulary, add_eos=False, dtype=tf.int32)
        seqio.TaskRegistry.remove(name)
        seqio.TaskRegistry.add(
            name,
            source=corpus.source(),
            output_features={key: feature for key in _FEATURES[objective]},
            preprocessors=[
                functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
                _PREPROCESSORS[objective],
            ],
        )
        _TASKS[name] = TaskInfo(corpus_name, objective, vocabulary_name)
        names.append(name)
    mix = mixture_name(corpus_name, vocabulary_name)
    _MIXTURES[mix] = ((
        (task_name(corpus_name, "span_corruption", vocabulary_name), 1.0),
        (task_name(corpus_name, "prefix_lm", vocabulary_name), 1.0)), "span_corruption")
    _refresh_mixtures(names)
    return names + [mix]


def register_document_lm_task(corpus_name: str, vocabulary_name: str, bos_id: int, add_eos: bool = False) -> str:
    """An "lm" task that reads each document on its own rows starting with `bos_id`, as transformers
    scores a text (`preprocessors.document_lm`): rows [BOS] + tokens (+ EOS if `add_eos`), loss on
    every token after the BOS. Named `{corpus}_lm_bos{bos_id}[_eos]_{vocabulary}`; (re)registered
    on every call, and not re-created when the corpus is (`evaluation.text_file_task` uses it)."""
    corpus = corpus_lib.get_corpus(corpus_name)
    vocabulary = vocab_lib.get_vocabulary(vocabulary_name)
    name = task_name(corpus_name, f"lm_bos{int(bos_id)}" + ("_eos" if add_eos else ""), vocabulary_name)
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=corpus.source(),
        output_features={"targets": seqio.Feature(vocabulary=vocabulary, add_eos=False, dtype=tf.int32)},
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            functools.partial(preprocessors.document_lm, add_eos=add_eos),
        ],
    )
    _TASKS[name] = TaskInfo(corpus_name, "lm", vocabulary_name, bos_id=int(bos_id))
    return name


def _refresh_mixtures(changed_tasks: Sequence[str]) -> None:
    """seqio mixtures hold Task objects, so re-create those that use a re-registered task."""
    changed = set(changed_tasks)
    for name, (tasks_and_rates, objective) in _MIXTURES.items():
        if name not in seqio.MixtureRegistry.names() or changed.intersection(t for t, _ in tasks_and_rates):
            if all(t in seqio.TaskRegistry.names() for t, _ in tasks_and_rates):
                _add_mixture(name, tasks_and_rates, objective)


def _add_mixture(name, tasks_and_rates, objective) -> None:
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, list(tasks_and_rates), default_rate=None)
    _TASKS[name] = TaskInfo(None, objective, _TASKS[tasks_and_rates[0][0]].vocabulary)


@gin.configurable
def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]] = gin.REQUIRED,
                     objective: Optional[str] = None) -> str:
    """A seqio mixture sampling its tasks with the given rates (relative weights).

    `objective` picks the feature converter; by default the tasks' common objective. Mixing
    span_corruption with prefix_lm needs objective="span_corruption" (both feed an encoder-decoder).
    """
    tasks_and_rates = tuple((str(t), float(r)) for t, r in tasks_and_rates)
    if not tasks_and_rates:
        raise CorpusError(f"mixture {name!r} needs at least one (task, rate) pair")
    objectives = set()
    for task, rate in tasks_and_rates:
        objectives.add(info(task).objective)
        if rate <= 0:
            raise CorpusError(f"mixture {name!r}: rate of {task!r} must be > 0, got {rate}")
    vocabs = {info(t).vocabulary for t, _ in tasks_and_rates}
    if len(vocabs) > 1:
        raise CorpusError(f"mixture {name!r} mixes vocabularies {sorted(vocabs)}; use one vocabulary")
    if objective is None:
        if len(objectives) > 1:
            raise CorpusError(f"mixture {name!r} mixes objectives {sorted(objectives)}; pass objective= "
                              "to choose the feature converter (e.g. 'span_corruption' for encoder-decoder)")
        objective = objectives.pop()
    _check_objective(objective)
    needed = set(_FEATURES[objective])
    for task, _ in tasks_and_rates:
        if not needed <= set(_FEATURES[info(task).objective]):
            raise CorpusError(f"mixture {name!r}: task {task!r} lacks the features {sorted(needed)} that "
                              f"objective {objective!r} feeds to its model")
    _MIXTURES[name] = (tasks_and_rates, objective)
    _add_mixture(name, tasks_and_rates, objective)
    return name


# ---------------------------------------------------------------------------- feature converters


class MaskedLMFeatureConverter(seqio.EncoderFeatureConverter):
    """seqio's encoder converter, with loss also on the positions BERT replaced by a random token.

    seqio weights only positions whose input is the mask id; a random replacement differs from its
    target and is just as much a prediction. (The 10% of selected positions left unchanged cannot be
    told apart from the inputs and get no loss.)
    """

    def _convert_features(self, ds: tf.data.Dataset, input_lengths: Mapping[str, int]) -> tf.data.Dataset:
        def convert(features):
            inputs, targets = features["inputs"], features["targets"]
            predicted = tf.logical_or(tf.equal(inputs, self.mask_id), tf.not_equal(inputs, targets))
            out = {"encoder_input_tokens": inputs, "encoder_target_tokens": targets,
                   "encoder_loss_weights": tf.cast(predicted, tf.int32)}
            if self.pack:
                out["encoder_segment_ids"] = features["inputs_segment_ids"]
                out["encoder_positions"] = features["inputs_positions"]
            return out

        return self._pack_or_pad(ds, input_lengths).map(convert, num_parallel_calls=tf.data.AUTOTUNE)


class LengthWeightedLMFeatureConverter(seqio.LMFeatureConverter):
    """seqio's LM converter for tokenizers whose id 0 is a real token (Llama's <unk>, GPT-2's "!") or
    whose rows start with a BOS.

    seqio takes 0 for padding three times: its packer cuts each example at its count of non-zero
    tokens and gives token 0 segment id 0, and its loss weights are `targets != 0`. Here the tokens
    are packed shifted by +1 (so none is 0) and shifted back, and the loss weights mark each
    example's own positions (packed: segment id > 0; unpacked: the example's length). Each row's
    (each packed segment's) first input is `bos_id` (seqio's own argument; 0 by default, as seqio).
    """

    _REAL = "targets_real"  # unpacked: 1 on the example's tokens, 0 on the padding seqio adds

    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        def convert(features):
            segments = features.get("targets_segment_ids")
            if self.pack:
                targets = tf.where(segments > 0, features["targets"] - 1, 0)
                weights = tf.cast(segments > 0, tf.int32)
            else:
                targets, weights = features["targets"], features[self._REAL]
            out = {"decoder_target_tokens": targets,
                   "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(targets, sequence_id=segments,
                                                                                  bos_id=self.bos_id),
                   "decoder_loss_weights": weights}
            if self.pack:
                out["decoder_segment_ids"] = segments
                out["decoder_positions"] = features["targets_positions"]
            return out

        if self.pack:
            ds = ds.map(lambda f: {**f, "targets": f["targets"] + 1})
            ds = self._pack_or_pad(ds, task_feature_lengths)
        else:
            ds = ds.map(lambda f: {**f, self._REAL: tf.ones_like(f["targets"])})
            ds = self._pack_or_pad(ds, {**task_feature_lengths, self._REAL: task_feature_lengths["targets"]})
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


class PreferenceFeatureConverter(seqio.FeatureConverter):
    """Preference pairs as adjacent rows: each {inputs, targets (chosen), rejected} example becomes
    {inputs, targets=chosen} then {inputs, targets=rejected} (order kept, chosen first), read by
    `converter`, the model's own unpacked (inputs, targets) converter. So rows 2i / 2i+1 are a pair
    with the loss weights on the completions, for any model family. Never packed (`pack` is ignored:
    the evaluator asks for packing). Task lengths: inputs, targets, and rejected (= targets by
    default); the rows get targets length max(targets, rejected)."""

    TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                     REJECTED: seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {}
    PACKING_FEATURE_DTYPES = {}
    rows_per_example = 2  # iterators.get_dataset keeps pairs in one batch

    def __init__(self, converter: seqio.FeatureConverter):
        super().__init__(pack=False)
        self.converter = converter

    @staticmethod
    def _row_lengths(task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        targets = int(task_feature_lengths["targets"])
        return {"inputs": int(task_feature_lengths["inputs"]),
                "targets": max(targets, int(task_feature_lengths.get(REJECTED, targets)))}

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        # Delegates to `converter`'s own __call__ and checks, as seqio's DecoderFeatureConverter does.
        def pair(ex):
            chosen = tf.data.Dataset.from_tensors({"inputs": ex["inputs"], "targets": ex["targets"]})
            return chosen.concatenate(tf.data.Dataset.from_tensors({"inputs": ex["inputs"],
                                                                    "targets": ex[REJECTED]}))

        return self.converter(ds.flat_map(pair), self._row_lengths(task_feature_lengths))

    def _convert_features(self, ds, task_feature_lengths):
        raise NotImplementedError("PreferenceFeatureConverter delegates to its converter")

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return self.converter.get_model_feature_lengths(self._row_lengths(task_feature_lengths))


@gin.configurable
def feature_converter_for(objective: str, pack: bool = True, vocabulary: Optional[seqio.Vocabulary] = None,
                          bos_id: Optional[int] = None) -> seqio.FeatureConverter:
    """The converter producing the batch names the models consume, for an objective.

    span_corruption -> encoder_input_tokens, decoder_{input,target}_tokens, decoder_loss_weights;
    lm -> decoder_*; prefix_lm -> decoder_* + decoder_causal_attention (loss on the continuation);
    mlm -> encoder_{input,target}_tokens, encoder_loss_weights. Packing adds *_segment_ids and
    *_positions. mlm needs the vocabulary to know its mask id (the first sentinel). lm rows start
    from `bos_id` (default 0); with a BOS, or a vocabulary whose id 0 is a real token, the loss
    weights come from lengths (`LengthWeightedLMFeatureConverter`).
    """
    _check_objective(objective)
    if objective == "span_corruption":
        return seqio.EncDecFeatureConverter(pack=pack)
    if objective == "lm":
        if bos_id is not None or (vocabulary is not None and not vocab_lib.zero_is_padding(vocabulary)):
            return LengthWeightedLMFeatureConverter(pack=pack, bos_id=0 if bos_id is None else int(bos_id))
        return seqio.LMFeatureConverter(pack=pack)
    if objective == "prefix_lm":
        return seqio.PrefixLMFeatureConverter(pack=pack, loss_on_targets_only=True)
    if vocabulary is None:
        raise ValueError("feature_converter_for('mlm') needs the vocabulary (its mask id is vocab_size - 1)")
    return MaskedLMFeatureConverter(mask_id=vocabulary.vocab_size - 1, pack=pack)


def feature_converter_for_task(name: str, pack: bool = True, objective: Optional[str] = None,
                               model=None) -> seqio.FeatureConverter:
    """The task's converter; `objective` overrides it, e.g. to read the prefix_lm subtask of an
    encoder-decoder mixture as encoder-decoder batches. A task registered outside t5x_like.data
    (objective EXTERNAL) gets the model's converter for its features."""
    task = info(name)
    objective = objective or task.objective
    if objective == EXTERNAL:
        if model is None:
            raise CorpusError(f"task {name!r} was registered with seqio directly, so the model picks its "
                              "feature converter: pass the model (or a feature_converter)")
        if REJECTED in seqio.get_mixture_or_task(name).output_features:
            return PreferenceFeatureConverter(model.feature_converter(("inputs", "targets"), pack=False))
        return model.feature_converter(output_features(name), pack)
    return feature_converter_for(objective, pack, vocab_lib.get_vocabulary(task.vocabulary), bos_id=task.bos_id)


# ------------------------------------------------------------------------------------- lengths


MIN_LENGTHS = {"lm": {"targets": 2}, "prefix_lm": {"inputs": 1, "targets": 1},
               "mlm": {"inputs": 2}, "span_corruption": {"inputs": 3}}


@gin.configurable
def default_task_feature_lengths(objective: str, length: int = 512) -> dict[str, int]:
    """Task feature lengths that fill model rows of `length` tokens (e.g. span corruption 512 -> 114)."""
    _check_objective(objective)
    if objective == "span_corruption":
        return {"inputs": length, "targets": preprocessors.span_corruption_lengths(length)[1]}
    if objective == "lm":
        return {"targets": length}
    if objective == "prefix_lm":  # the decoder row holds inputs + targets
        return {"inputs": length // 2, "targets": length - length // 2}
    return {"inputs": length, "targets": length}


def check_task_feature_lengths(name: str, lengths: Optional[Mapping[str, int]],
                               objective: Optional[str] = None) -> dict[str, int]:
    """One clear error for missing or too-short lengths, before any data is read."""
    objective = objective or info(name).objective
    lengths = dict(lengths or {})
    if objective == EXTERNAL:
        return _check_external_lengths(name, lengths)
    _check_objective(objective)
    needed = _FEATURES[objective]
    missing = [k for k in needed if k not in lengths]
    if missing:
        example = default_task_feature_lengths(objective)
        raise CorpusError(f"task_feature_lengths {lengths} for {name!r} ({objective}) lack {missing}; "
                          f"e.g. {example} (see default_task_feature_lengths)")
    for key, minimum in MIN_LENGTHS[objective].items():
        if int(lengths[key]) < minimum:
            raise CorpusError(f"sequence length {key}={lengths[key]} is too short for {objective} on "
                              f"{name!r}: it needs at least {minimum}")
    if objective == "span_corruption":
        targets = preprocessors.span_corruption_lengths(int(lengths["inputs"]))[1]
        if int(lengths["targets"]) < targets:
            raise CorpusError(f"span corruption with inputs length {lengths['inputs']} makes targets of "
                              f"{targets} tokens but targets length is {lengths['targets']}; set it to "
                              f"{targets}")
    return {k: int(v) for k, v in lengths.items()}


def _check_external_lengths(name: str, lengths: dict) -> dict[str, int]:
    features = output_features(name)
    if not features:
        raise CorpusError(f"task {name!r} has no 'inputs' or 'targets' output feature; a model reads "
                          "(inputs, targets) pairs or targets alone")
    # A rank-0 feature (a class id or a score, models/encoder_classifier.py) has no length: seqio
    # cannot trim a scalar, so a length given for it is dropped.
    scalars = {k for k, f in seqio.get_mixture_or_task(name).output_features.items() if f.rank == 0}
    features = [k for k in features if k not in scalars]
    missing = [k for k in features if k not in lengths]
    if missing:
        raise CorpusError(f"task_feature_lengths {lengths} for {name!r} lack {missing}; give a length for each "
                          f"of its features {list(features)}, e.g. {dict.fromkeys(features, 256)}")
    short = {k: lengths[k] for k in features if int(lengths[k]) < 1}
    if short:
        raise CorpusError(f"task_feature_lengths {short} for {name!r} must be >= 1")
    if REJECTED in seqio.get_mixture_or_task(name).output_features and "targets" in lengths:
        # Preference pairs: the rejected completion has the targets length (a row holds either).
        given = int(lengths.setdefault(REJECTED, lengths["targets"]))
        if given != int(lengths["targets"]):
            raise CorpusError(f"task_feature_lengths {lengths} for {name!r}: the rejected completion uses the "
                              f"targets length; drop 'rejected' (or set it to {lengths['targets']})")
    return {k: int(v) for k, v in lengths.items() if k not in scalars}


# ------------------------------------------------------------------------------ registration hooks


def _on_corpus(name: str) -> None:
    for vocabulary in vocab_lib.vocabulary_names():
        register_tasks(name, vocabulary)


def _on_vocabulary(name: str) -> None:
    for corpus in corpus_lib.corpus_names():
        register_tasks(corpus, name)


corpus_lib.add_corpus_listener(_on_corpus)  # registers every known (corpus, vocabulary) pair
vocab_lib.add_vocabulary_listener(_on_vocabulary, replay=False)
