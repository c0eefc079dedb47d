"""Throughput of each objective's input pipeline on the embedded corpus, on this machine.

    python benchmarks/data_pipeline.py [--vocab spm|byte] [--length 512] [--batch_size 16] [--seconds 8]
                                       [--no_step]

For every objective it prints packed rows/s, task examples/s (examples before packing), tokens/s
(non-padding tokens the model reads: encoder inputs + decoder targets) and the fill ratio of the
packed rows, then how fast a resumed iterator skips consumed batches. Unless --no_step, it also
times the medium train step of the family each objective feeds (benchmarks/train_step.py: batch 8,
length 512, float32) and prints how many times faster the pipeline makes rows than the step
consumes them (each measured alone on the same cores). The last line summarises.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")  # the accelerator belongs to JAX

import t5x_like.data as data  # noqa: E402
from t5x_like.data import embedded, vocabularies  # noqa: E402


# The model family each objective trains (train_step.py's medium configs).
FAMILY_OF_OBJECTIVE = {"span_corruption": "encoder_decoder", "lm": "decoder_only", "prefix_lm": "decoder_only",
                       "mlm": "encoder_only"}


def _tokens_and_examples(batch) -> tuple[int, int, int]:
    """(non-padding tokens, task examples, token slots) in a batch."""
    tokens = slots = 0
    for key in ("encoder_input_tokens", "decoder_target_tokens"):
        if key in batch:
            tokens += int(np.count_nonzero(batch[key]))
            slots += batch[key].size
    seg = batch.get("decoder_segment_ids", batch.get("encoder_segment_ids"))
    examples = int(seg.max(axis=1).sum()) if seg is not None else len(next(iter(batch.values())))
    return tokens, examples, slots


def measure(objective: str, vocab: str, length: int, batch_size: int, seconds: float) -> dict:
    name = data.task_name("embedded", objective, vocab)
    lengths = data.default_task_feature_lengths(objective, length)
    start = time.perf_counter()
    it = data.get_iterator(name, lengths, batch_size=batch_size, seed=0, shuffle=True, pack=True)
    next(it)
    first = time.perf_counter() - start
    rows = tokens = examples = slots = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t, e, s = _tokens_and_examples(next(it))
        rows, tokens, examples, slots = rows + batch_size, tokens + t, examples + e, slots + s
    elapsed = time.perf_counter() - start
    return {"objective": objective, "lengths": lengths, "first_batch_s": first, "rows_s": rows / elapsed,
            "examples_s": examples / elapsed, "tokens_s": tokens / elapsed, "fill": tokens / slots,
            "batches": rows // batch_size}


def measure_skip(vocab: str, length: int, batch_size: int, batches: int) -> tuple[float, float]:
    """(seconds to the first batch of a fresh iterator, batches/s that `restore` replays beyond it)."""
    name = data.task_name("embedded", "span_corruption", vocab)
    lengths = data.default_task_feature_lengths("span_corruption", length)
    times = []
    for skipped in (0, batches):
        it = data.get_iterator(name, lengths, batch_size=batch_size, seed=0)
        start = time.perf_counter()
        it.restore({**it.state(), "batches_consumed": skipped})
        next(it)
        times.append(time.perf_counter() - start)
    return times[0], batches / max(times[1] - times[0], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="spm", choices=data.vocabulary_names())
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16, help="per host")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per objective")
    parser.add_argument("--skip_batches", type=int, default=200)
    parser.add_argument("--objectives", nargs="*", default=list(data.OBJECTIVES))
    parser.add_argument("--no_step", action="store_true", help="skip timing the train steps")
    args = parser.parse_args()

    start = time.perf_counter()
    folder = data.embedded_corpus_dir()
    record = embedded.read_fingerprint(folder)
    stats = record["stats"]
    print(f"corpus: {folder} ({time.perf_counter() - start:.2f}s to open or build; recorded build "
          f"{stats['build_seconds']}s): {stats['documents']['train']} train / "
          f"{stats['documents']['validation']} validation documents, "
          f"{(stats['bytes']['train'] + stats['bytes']['validation']) / 1e6:.2f} MB, "
          f"{stats['shards']['train']} + {stats['shards']['validation']} shards")
    start = time.perf_counter()
    vocab = data.get_vocabulary(args.vocab)
    size = vocab.vocab_size
    trained = vocabularies.last_training_seconds
    print(f"vocabulary {args.vocab}: {size} ids ({time.perf_counter() - start:.2f}s to load"
          f"{f', of which {trained}s training' if trained else ', nothing trained in this run'})")
    print(f"batch {args.batch_size} rows/host, length {args.length}, pack=True, {os.cpu_count()} cores")
    print(f"{'objective':<16}{'task lengths':<30}{'1st batch s':>12}{'rows/s':>10}{'examples/s':>12}"
          f"{'tokens/s':>12}{'fill':>7}")
    results = []
    for objective in args.objectives:
        r = measure(objective, args.vocab, args.length, args.batch_size, args.seconds)
        results.append(r)
        print(f"{objective:<16}{str(r['lengths']):<30}{r['first_batch_s']:>12.2f}{r['rows_s']:>10.1f}"
              f"{r['examples_s']:>12.1f}{r['tokens_s']:>12.0f}{r['fill']:>7.2f}", flush=True)
    fresh, skip = measure_skip(args.vocab, args.length, args.batch_size, args.skip_batches)
    print(f"resume: a restored span-corruption iterator replays {skip:.1f} batches/s on top of the "
          f"{fresh:.2f}s a fresh one takes to its first batch ({args.skip_batches} batches skipped)")
    slowest = min(results, key=lambda r: r["tokens_s"])
    print("summary: " + ", ".join(f"{r['objective']} {r['tokens_s']:.0f} tok/s ({r['examples_s']:.0f} ex/s)"
                                  for r in results)
          + f"; slowest {slowest['objective']}; fill ratio {np.mean([r['fill'] for r in results]):.2f}")

    if not args.no_step:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import train_step

        step_s = {}
        for r in results:
            family = FAMILY_OF_OBJECTIVE[r["objective"]]
            if family not in step_s:
                step_s[family] = train_step.time_step(family)
            consumed = train_step.BATCH / step_s[family]
            r["headroom"] = r["rows_s"] / consumed
            print(f"{r['objective']:<16} feeds {family} at {consumed:.2f} rows/s ({step_s[family]:.2f} s per "
                  f"{train_step.BATCH}-row step): pipeline {r['rows_s']:.1f} rows/s = {r['headroom']:.0f}x", flush=True)
        worst = min(results, key=lambda r: r["headroom"])
        print(f"RESULT input pipeline / train-step consumption: worst {worst['headroom']:.0f}x "
              f"({worst['objective']}; target 10x)")


if __name__ == "__main__":
    main()
