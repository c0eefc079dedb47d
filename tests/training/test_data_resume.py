"""A checkpoint carries each host's tf.data position, so a resume continues the data stream bitwise
without replaying it; steps saved without one (older runs) still resume by replay."""

import os

import numpy as np
import pytest

import t5x_like.data as data
from t5x_like.training.checkpointing import DATA_POSITION, Checkpointer

SC = ("embedded_span_corruption_spm", {"inputs": 64, "targets": 14})


def _make():
    return data.get_iterator(*SC, batch_size=4, seed=5, pack=True)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for a, b in zip(xs, ys):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpointed_position_resumes_bitwise(tmp_path, async_save):
    expected = _take(_make(), 8)
    run = _make()
    _take(run, 5)
    with Checkpointer(str(tmp_path), save_interval_steps=1, async_save=async_save) as ckpt:
        assert ckpt.save(5, {"w": np.ones(3, np.float32)}, data_state=run)
        _take(run, 2)  # the iterator moves on while an async save may still be writing
        ckpt.wait_until_finished()
    folder = tmp_path / "5" / DATA_POSITION / "process_0-of-1"
    assert sorted(os.listdir(folder)) == ["iterator.data-00000-of-00001", "iterator.index"]
    with Checkpointer(str(tmp_path)) as ckpt:
        restored = ckpt.restore_latest({"w": np.zeros(3, np.float32)})
    assert restored.data_state["batches_consumed"] == 5 and restored.data_position == str(folder)
    resumed = _make()
    resumed.restore(restored.data_state, restored.data_position)
    _assert_same(_take(resumed, 3), expected[5:])


def test_a_step_without_a_position_resumes_by_replay(tmp_path):
    expected = _take(_make(), 6)
    run = _make()
    _take(run, 4)
    with Checkpointer(str(tmp_path), save_interval_steps=1, async_save=False) as ckpt:
        assert ckpt.save(4, {"w": np.ones(3, np.float32)}, data_state=run.state())  # JSON only, as before
        restored = ckpt.restore_latest({"w": np.zeros(3, np.float32)})
    assert restored.data_position is None
    resumed = _make()
    resumed.restore(restored.data_state, restored.data_position)
    _assert_same(_take(resumed, 2), expected[4:])
