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
