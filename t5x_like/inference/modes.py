"""`infer` and `score` modes: text in (a file or stdin, plain lines or JSONL), JSONL out.

Text is tokenized with a vocabulary named by gin: a registered one ("spm", "byte"), a tokenizer
file (a SentencePiece .model with any special-token layout, or a tokenizer.json) or a folder holding
one, such as the import_hf output folder, where `import_hf` copies the Hugging Face checkpoint's
tokenizer files next to model.gin. Decoder-only prompts start with `bos_id`: "auto" (the default)
is the tokenizer's own BOS when its transformers `tokenizer(text)` adds one (Llama: 1), else 0, the
BOS of this project's LM tasks (none for a tokenizer whose id 0 is a real token, e.g. GPT-2's "!",
as transformers feeds GPT-2 prompts); an int or None forces one or none. EOS is the vocabulary's
own (1 for this project's and T5's, 2 for Llama's): it ends generation and the scored targets
(`target_eos`). Encoder-decoder inputs end with EOS (id 1), as T5 trains them.

JSONL records: infer reads "input" (or "prompt" / "text") and optional "max_new_tokens" and "stop";
score reads "input" and "target". A plain-text line is one prompt (infer) or "input<TAB>target"
(score). infer serves prompts in length buckets and streams results in input order (serving.py).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Iterator, Optional

import gin
import jax

from t5x_like import evaluation
from t5x_like.inference import decoding, serving, speculative
from t5x_like.errors import UserError

log = logging.getLogger(__name__)

EOS = 1


class InferenceError(UserError):
    """Bad input records or settings; the message names the line and the fix."""


def load_vocabulary(vocabulary: str):
    from t5x_like.data import vocabularies as vocab_lib
    return vocab_lib.get_vocabulary(vocab_lib.vocabulary_name(vocabulary))


def read_records(path: str, need_target: bool) -> Iterator[dict]:
    """{"input", ["target"]} per non-empty line of a JSONL / text file ('-' = stdin)."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    try:
        for n, line in enumerate(stream, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InferenceError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                text = next((rec[k] for k in ("input", "prompt", "text") if k in rec), None)
                if text is None:
                    raise InferenceError(f"{path}:{n}: a JSONL record needs an 'input' field")
                out = {"input": text}
                out.update({k: rec[k] for k in ("max_new_tokens", "stop") if k in rec and not need_target})
                if need_target:
                    if "target" not in rec:
                        raise InferenceError(f"{path}:{n}: score needs a 'target' field")
                    out["target"] = rec["target"]
            elif need_target:
                if "\t" not in line:
                    raise InferenceError(f"{path}:{n}: score reads 'input<TAB>target' lines or JSONL")
                inp, tgt = line.split("\t", 1)
                out = {"input": inp, "target": tgt}
            else:
                out = {"input": line}
            out["where"] = f"{path}:{n}"
            yield out
    finally:
        if stream is not sys.stdin:
            stream.close()


def _restore(model, checkpoint_dir: str, step: Optional[int]):
    from t5x_like.training.checkpointing import restore_model_params
    return {"params": restore_model_params(checkpoint_dir, model, step=step)}


def resolve_bos_id(vocab, bos_id="auto") -> Optional[int]:
    """The id decoder-only prompts start with: `bos_id` itself unless it is "auto" (module docstring)."""
    from t5x_like.data import vocabularies as vocab_lib

    if bos_id != "auto":
        if bos_id is not None and (isinstance(bos_id, bool) or not isinstance(bos_id, int)):
            raise InferenceError(f"bos_id={bos_id!r} must be 'auto', None or a token id")
        return bos_id
    bos = vocab_lib.leading_bos_id(vocab)
    if bos is not None:
        return bos
    return 0 if vocab_lib.zero_is_padding(vocab) else None


def eos_id_of(vocab) -> int:
    return EOS if vocab.eos_id is None else int(vocab.eos_id)


def _input_ids(model, vocab, text: str, bos_id: Optional[int]) -> list[int]:
    return model.prompt_ids(list(vocab.encode(text)), bos_id)


def _writer(path: Optional[str]):
    return sys.stdout if path in (None, "-") else open(path, "w", encoding="utf-8")


@gin.configurable(denylist=["input_path", "output_path"])
def infer(input_path: str, output_path: Optional[str], *, model=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED,
          vocabulary: str = "spm", step: Optional[int] = None, batch_size: int = 8, max_new_tokens: int = 32,
          method: str = "greedy", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
          num_beams: int = 4, length_penalty: float = 1.0, early_stopping=False, bos_id="auto",
          seed: int = 0, min_bucket: int = 16, max_pending: Optional[int] = None, draft=None, variables=None,
          draft_variables=None) -> int:
    """Decode every prompt of input_path in length-bucketed batches (inference/serving.py); one JSONL
    line {"input", "output", "tokens", "score", "finish_reason"} each, streamed in input order.
    JSONL requests may set their own "max_new_tokens" and "stop" (a string or a list). `draft`
    (`@SpeculativeDraft()`, inference/speculative.py): greedy / sampled decoding with speculative
    decoding from that smaller model (same outputs for greedy; the target's distribution sampled)."""
    vocab = load_vocabulary(vocabulary)
    bos_id, eos_id = resolve_bos_id(vocab, bos_id), eos_id_of(vocab)
    variables = _restore(model, checkpoint_dir, step) if variables is None else variables
    rng = [jax.random.key(seed)]
    if draft is not None:
        if method == "beam":
            raise InferenceError("infer.draft (speculative decoding) works with method 'greedy' or 'sample', "
                                 "not 'beam'; unset infer.draft for beam search")
        draft_model, draft_variables = draft.load(model, draft_variables)

    def requests():
        for i, r in enumerate(read_records(input_path, need_target=False)):
            mnt, stop = serving.request_options(r, r["where"], max_new_tokens)
            ids = _input_ids(model, vocab, r["input"], bos_id)
            if not ids:
                raise InferenceError(f"{r['where']}: an empty prompt with bos_id=None has nothing to start from; "
                                     "set bos_id")
            yield serving.Request(i, r["where"], {"input": r["input"]}, ids, mnt, stop)

    def decode(prompts, lengths, new):
        rng[0], sub = jax.random.split(rng[0])
        if draft is not None:
            res = speculative.speculative_generate(
                model, variables, draft_model, draft_variables, prompts, prompt_lengths=lengths, gamma=draft.gamma,
                max_new_tokens=new, method=method, temperature=temperature, top_k=top_k, top_p=top_p,
                eos_id=eos_id, rng=sub)
            draft.record(res)
            return res.tokens, res.lengths, res.scores
        res = decoding.generate(model, variables, prompts, prompt_lengths=lengths, max_new_tokens=new,
                                method=method, temperature=temperature, top_k=top_k, top_p=top_p,
                                num_beams=num_beams, length_penalty=length_penalty,
                                early_stopping=early_stopping, eos_id=eos_id, rng=sub)
        return res.tokens, res.lengths, res.scores

    out = _writer(output_path)

    def write(record):
        out.write(json.dumps(record) + "\n")
        out.flush()

    try:
        count = serving.serve(requests(), decode, write, model=model, batch_size=batch_size, eos_id=eos_id,
                              decode_text=vocab.decode, min_width=min_bucket, exact_new=method == "beam",
                              max_pending=max_pending)
        if draft is not None:
            log.info("speculative decoding: %.1f%% of the draft's tokens accepted", 100 * draft.acceptance_rate)
        return count
    finally:
        if out is not sys.stdout:
            out.close()


@gin.configurable(denylist=["input_path", "output_path"])
def score(input_path: str, output_path: Optional[str], *, model=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED,
          vocabulary: str = "spm", step: Optional[int] = None, batch_size: int = 8, bos_id="auto",
          target_eos: bool = True, variables=None) -> int:
    """Log-likelihood of each (input, target); JSONL {"input", "target", "log_likelihood", "target_tokens"}."""
    vocab = load_vocabulary(vocabulary)
    bos_id, eos_id = resolve_bos_id(vocab, bos_id), eos_id_of(vocab)
    variables = _restore(model, checkpoint_dir, step) if variables is None else variables
    records = list(read_records(input_path, need_target=True))
    inputs = [_input_ids(model, vocab, r["input"], bos_id) for r in records]
    targets = [list(vocab.encode(r["target"])) + ([eos_id] if target_eos else []) for r in records]
    if any(len(t) == 0 for t in targets):
        raise InferenceError("an empty target with target_eos=False has nothing to score")
    lls = evaluation.score_pairs(model, variables, inputs, targets, batch_size=batch_size)
    out = _writer(output_path)
    try:
        for r, t, ll in zip(records, targets, lls):
            out.write(json.dumps({"input": r["input"], "target": r["target"], "log_likelihood": float(ll),
                                  "target_tokens": len(t)}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return len(records)
