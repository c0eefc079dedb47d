"""Iterators: determinism for a seed, disjoint host shards, exact resume, two hosts' rows in one global batch."""

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import seqio

import t5x_like.data as data

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SC = ("embedded_span_corruption_spm", {"inputs": 64, "targets": 14})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_gives_the_same_batches():
    first = _take(data.get_iterator(*SC, batch_size=4, seed=7), 3)
    _assert_same(first, _take(data.get_iterator(*SC, batch_size=4, seed=7), 3))
    other = _take(data.get_iterator(*SC, batch_size=4, seed=8), 3)
    assert not all(np.array_equal(a["encoder_input_tokens"], b["encoder_input_tokens"])
                   for a, b in zip(first, other))


def _documents_of_host(shard):
    """Token sequences of the documents one host's LM stream holds (EOS ends each)."""
    ds = data.get_dataset("embedded_lm_byte", {"targets": 128}, split="validation", batch_size=1,
                          shuffle=False, seed=0, pack=False, num_epochs=1, shard_info=shard)
    stream = np.concatenate([b["decoder_target_tokens"][0] for b in ds.as_numpy_iterator()])
    stream = stream[stream > 0]
    ends = np.flatnonzero(stream == 1)
    return [tuple(d) for d in np.split(stream, ends + 1)[:-1]]


def test_host_shards_are_disjoint_and_cover_the_data():
    whole = _documents_of_host(seqio.ShardInfo(0, 1))
    hosts = [_documents_of_host(seqio.ShardInfo(i, 2)) for i in range(2)]
    assert hosts[0] and hosts[1] and not set(hosts[0]) & set(hosts[1])
    assert collections.Counter(hosts[0] + hosts[1]) == collections.Counter(whole)
    assert len(whole) == len(list(data.get_corpus("embedded").iter_documents("validation")))


@pytest.mark.parametrize("pack", [True, False])
def test_restored_iterator_continues_exactly_like_an_uninterrupted_one(pack):
    uninterrupted = data.get_iterator(*SC, batch_size=4, seed=3, pack=pack)
    expected = _take(uninterrupted, 6)

    first_run = data.get_iterator(*SC, batch_size=4, seed=3, pack=pack)
    _assert_same(_take(first_run, 4), expected[:4])
    saved = first_run.state_bytes()  # what a checkpoint stores
    assert json.loads(saved)["batches_consumed"] == 4

    resumed = data.get_iterator(*SC, batch_size=4, seed=3, pack=pack)
    resumed.restore(saved)
    _assert_same(_take(resumed, 2), expected[4:])
    assert resumed.state()["batches_consumed"] == 6


def test_resume_across_epochs_of_a_small_corpus(write_file):
    data.register_corpus("tinyepochs", text_glob=write_file("tiny.txt", b"".join(
        f"document {i} has a few words\n".encode() for i in range(30))), overwrite=True)
    args = ("tinyepochs_lm_byte", {"targets": 32})
    expected = _take(data.get_iterator(*args, batch_size=4, seed=1), 40)  # ~5 epochs
    it = data.get_iterator(*args, batch_size=4, seed=1)
    _take(it, 17)
    again = data.get_iterator(*args, batch_size=4, seed=1)
    again.restore(it.state())
    _assert_same(_take(again, 23), expected[17:])


def test_restore_refuses_a_different_stream():
    it = data.get_iterator(*SC, batch_size=4, seed=3)
    state = it.state()
    with pytest.raises(ValueError, match="different settings.*seed"):
        data.get_iterator(*SC, batch_size=4, seed=4).restore(state)
    with pytest.raises(ValueError, match="shard"):
        data.get_iterator(*SC, batch_size=4, seed=3, shard_info=seqio.ShardInfo(0, 2)).restore(state)
    with pytest.raises(ValueError, match="version"):
        it.restore({**state, "version": 99})
    with pytest.raises(ValueError, match="seed must be an integer"):
        data.get_dataset(*SC, seed=None)


MULTIHOST_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh
    import t5x_like.data as data
    from t5x_like import partitioning
    it = data.get_iterator("embedded_lm_byte", {"targets": 32}, split="validation", batch_size=2,
                           shuffle=False, seed=0, pack=False, num_epochs=1)
    local = next(it)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    tokens = partitioning.to_global_batch(local, mesh)["decoder_target_tokens"]
    gathered = multihost_utils.process_allgather(tokens, tiled=True)
    print("RESULT " + json.dumps({"shard": it.state()["config"]["shard"], "shape": list(tokens.shape),
                                  "local": local["decoder_target_tokens"].tolist(),
                                  "global": np.asarray(gathered).tolist()}))
""")


def test_two_hosts_read_their_own_shards_into_one_global_batch():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_SCRIPT, str(i), str(port)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = []
    for out, err in outs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, out[-2000:] + err[-5000:]
        results.append(json.loads(lines[0][len("RESULT "):]))
    assert [r["shard"] for r in results] == [[0, 2], [1, 2]]
    assert results[0]["shape"] == [4, 32]
    assert results[0]["global"] == results[0]["local"] + results[1]["local"] == results[1]["global"]
    assert results[0]["local"] != results[1]["local"]


def _resume_from_position(make, consumed):
    """(the first run's batches, the batches after restoring its tf.data position in a new iterator)."""
    import tempfile
    first = make()
    before = _take(first, consumed)
    files = first.position_files()
    assert files and sum(len(b) for b in files.values()) > 0
    folder = tempfile.mkdtemp()
    for name, blob in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(blob)
    resumed = make()
    resumed.restore(first.state_bytes(), folder)
    return before, resumed, folder, first.state()


@pytest.mark.parametrize("pack", [True, False])
def test_restored_position_continues_bitwise_like_an_uninterrupted_run(pack):
    make = lambda: data.get_iterator(*SC, batch_size=4, seed=3, pack=pack)  # noqa: E731
    expected = _take(make(), 7)
    before, resumed, folder, state = _resume_from_position(make, 4)
    _assert_same(before, expected[:4])
    _assert_same(_take(resumed, 3), expected[4:])
    assert resumed.state()["batches_consumed"] == 7
    # The position was read, not replayed: a JSON state at another batch than the saved position is refused.
    wrong = make()
    wrong.restore({**state, "batches_consumed": 5}, folder)
    with pytest.raises(data.iterators.DataResumeError, match="at batch 4 but .* says 5"):
        next(wrong)


def test_restored_position_across_epochs_and_host_rows(write_file):
    data.register_corpus("tinyepochs2", text_glob=write_file("tiny2.txt", b"".join(
        f"document {i} has a few words\n".encode() for i in range(30))), overwrite=True)
    make = lambda: data.get_iterator("tinyepochs2_lm_byte", {"targets": 32}, batch_size=4, seed=1,  # noqa: E731
                                     host_rows=(2, 4))
    expected = _take(make(), 30)  # ~4 epochs
    _, resumed, _, _ = _resume_from_position(make, 17)
    _assert_same(_take(resumed, 13), expected[17:])


@pytest.mark.parametrize("change", [
    dict(mixture_or_task_name="embedded_lm_spm", task_feature_lengths={"targets": 64}),
    dict(task_feature_lengths={"inputs": 32, "targets": 14}),
], ids=["task", "lengths"])
def test_a_data_checkpoint_of_another_task_or_lengths_is_a_one_line_user_error(change):
    from t5x_like.errors import UserError
    saved = data.get_iterator(*SC, batch_size=4, seed=3).state()
    args = {"mixture_or_task_name": SC[0], "task_feature_lengths": SC[1], **change}
    with pytest.raises(UserError) as e:
        data.get_iterator(**args, batch_size=4, seed=3).restore(saved)
    message = str(e.value)
    assert "\n" not in message and "different settings" in message
    assert ("mixture_or_task_name" if "mixture_or_task_name" in change else "task_feature_lengths") in message


def test_a_pipeline_tf_data_cannot_save_falls_back_to_replay():
    import tensorflow as tf

    def make_dataset():  # a py_function: tf.data refuses to checkpoint it
        ds = tf.data.Dataset.range(1000).shuffle(50, seed=0).map(
            lambda x: tf.py_function(lambda v: v * 3, [x], tf.int64))
        return ds.batch(4).map(lambda b: {"x": b})

    make = lambda: data.iterators.DataIterator(make_dataset, {"name": "py"})  # noqa: E731
    expected = _take(make(), 9)
    first = make()
    _take(first, 5)
    assert first.position_files() is None
    resumed = make()
    resumed.restore(first.state(), None)
    _assert_same(_take(resumed, 4), expected[5:])
