"""Throughput of each objective's input pipeline on the embedded corpus, on this machine.

    python benchmarks/data_pipeline.py [--vocab spm|byte] [--length 512] [--batch_size 16] [--seconds 8]
                                       [--resume_positions 1000 10000 100000] [--replay_max 10000] [--no_step]

For every objective it prints packed rows/s, task examples/s (examples before packing), tokens/s
(non-padding tokens the model reads: encoder inputs + decoder targets) and the fill ratio of the
packed rows. Then, for a span-corruption iterator at each of `--resume_positions` batches, the time
a resumed iterator takes to its first batch from the saved tf.data position (what a checkpoint now
holds; also its size and the time to write it) next to the old replay of every consumed batch
(`ds.skip`), measured up to `--replay_max` and beyond that extrapolated from the measured rate
(one iterator is walked to the largest position once, so that costs about one replay). Unless --no_step, it also
times the medium train step of the family each objective feeds (benchmarks/train_step.py: batch 8,
length 512, float32) and prints how many times faster the pipeline makes rows than the step
consumes them (each measured alone on the same cores). The last line summarises.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
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


def _first_batch_s(iterator) -> float:
    start = time.perf_counter()
    next(iterator)
    return time.perf_counter() - start


def _restore_s(make, state, folder) -> float:
    """Seconds from a new iterator to its first batch, restored from the position in `folder`."""
    resumed = make()
    start = time.perf_counter()
    resumed.restore(state, folder)
    next(resumed)
    return time.perf_counter() - start


def measure_resume(vocab: str, length: int, batch_size: int, positions, replay_max: int,
                   repeats: int = 3) -> tuple[float, list[dict]]:
    """(median seconds a fresh iterator takes to its first batch, and per position: the median
    seconds to the first batch restored from the saved tf.data position over `repeats` restores,
    the position's bytes and write seconds, the old replay's seconds, measured or extrapolated).
    Medians: on a shared machine single timings of pipeline construction vary 0.5-5 s."""
    name = data.task_name("embedded", "span_corruption", vocab)
    lengths = data.default_task_feature_lengths("span_corruption", length)
    make = lambda: data.get_iterator(name, lengths, batch_size=batch_size, seed=0)  # noqa: E731
    fresh = float(np.median([_first_batch_s(make()) for _ in range(repeats)]))
    walker, rows, rate = make(), [], None
    for position in sorted(positions):
        start = time.perf_counter()
        while walker.batches_consumed < position:
            next(walker)
        walk_s = time.perf_counter() - start
        start = time.perf_counter()
        files = walker.position_files()
        write_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            for file_name, blob in files.items():
                with open(os.path.join(folder, file_name), "wb") as f:
                    f.write(blob)
            restore_s = float(np.median([_restore_s(make, walker.state(), folder) for _ in range(repeats)]))
        replay_s, measured = None, position <= replay_max
        if measured:  # the old restore: rebuild the pipeline, ds.skip(position), first batch
            old = make()
            ds = old._make_dataset().skip(position)
            start = time.perf_counter()
            next(iter(ds))
            replay_s = time.perf_counter() - start
            rate = position / max(replay_s - fresh, 1e-9)
        elif rate is not None:
            replay_s = fresh + position / rate
        rows.append({"position": position, "restore_s": restore_s, "bytes": sum(len(b) for b in files.values()),
                     "write_s": write_s, "replay_s": replay_s, "replay_measured": measured, "walk_s": walk_s,
                     "fresh_s": fresh})
        print(f"  position {position:>7}: restore {restore_s:6.2f} s from a {rows[-1]['bytes'] / 1e6:.1f} MB "
              f"position (written in {write_s:.2f} s) | replay {'' if measured else '~'}"
              f"{replay_s if replay_s is not None else float('nan'):8.1f} s{'' if measured else ' (extrapolated)'}"
              f" | walked here in {walk_s:.0f} s", flush=True)
    return fresh, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="spm", choices=data.vocabulary_names())
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16, help="per host")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per objective")
    parser.add_argument("--resume_positions", type=int, nargs="*", default=[1000, 10000, 100000],
                        help="batches consumed before a resume (empty: skip the resume table)")
    parser.add_argument("--replay_max", type=int, default=10000,
                        help="replay measured up to here, extrapolated beyond")
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
    if args.resume_positions:
        print(f"resume of a span-corruption iterator (batch {args.batch_size}, length {args.length}): from the "
              "saved tf.data position vs replaying every consumed batch", flush=True)
        fresh, resume = measure_resume(args.vocab, args.length, args.batch_size, args.resume_positions,
                                       args.replay_max)
        print(f"  (a fresh iterator takes {fresh:.2f} s to its first batch; medians of 3)")
        print("RESULT resume s from the saved position: " + ", ".join(
            f"{r['position']}: {r['restore_s']:.2f}" for r in resume) + " | replay: " + ", ".join(
            f"{r['position']}: {'' if r['replay_measured'] else '~'}{r['replay_s']:.0f}" for r in resume
            if r["replay_s"] is not None), flush=True)
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
