"""Checkpointer: round trips, retention, interval saves, corrupt and unfinished steps, other meshes."""

import glob
import json
import logging
import os
import subprocess
import sys
import textwrap

import flax.struct
import jax
import numpy as np
import optax
import pytest

from t5x_like.training import checkpointing
from t5x_like.training.checkpointing import Checkpointer, CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: object
    rng: jax.Array


def make_state(step, scale=1.0):
    params = {"dense": {"kernel": np.full((4, 3), scale, np.float32), "bias": np.arange(3, dtype=np.float32)}}
    opt_state = optax.adam(1e-3).init(params)
    return State(step=np.int32(step), params=params, opt_state=opt_state, rng=jax.random.key(step))


TARGET = jax.eval_shape(lambda: make_state(0))


def assert_state_equal(a, b):
    assert jax.random.key_impl(a.rng) == jax.random.key_impl(b.rng)
    np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))
    for x, y in zip(jax.tree_util.tree_leaves(a.replace(rng=0)), jax.tree_util.tree_leaves(b.replace(rng=0))):
        np.testing.assert_array_equal(x, y)


def save_steps(ckpt, steps, perplexities=None, **kw):
    for s in steps:
        ppl = (perplexities or {}).get(s)
        ckpt.save(s, make_state(s, scale=s), data_state={"batches": s}, gin_config=f"TRAIN_STEPS = {s}",
                  metrics=None if ppl is None else {"perplexity": ppl}, **kw)
    ckpt.wait_until_finished()


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_with_typed_key_data_state_and_gin(tmp_path, async_save):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=async_save) as ckpt:
        state = make_state(7, scale=0.5)
        assert ckpt.save(7, state, data_state={"seed": 3, "batches": 70}, gin_config="MODEL = @M()\n",
                         metrics={"perplexity": np.float32(12.5)})
        ckpt.wait_until_finished()
        assert not glob.glob(str(tmp_path / "*orbax-checkpoint-tmp*"))
        restored = ckpt.restore_latest(TARGET)
    assert restored.step == 7
    assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
    assert_state_equal(restored.state, state)
    assert restored.data_state == {"seed": 3, "batches": 70}
    assert restored.gin_config == "MODEL = @M()\n"
    assert restored.metrics == {"perplexity": 12.5}
    # Params alone, for evaluation or fine-tuning, from the same training checkpoint.
    params = checkpointing.restore_params(tmp_path)
    np.testing.assert_array_equal(params["dense"]["kernel"], state.params["dense"]["kernel"])


def test_keeps_last_n_plus_best_across_restarts(tmp_path):
    ppl = {1: 9.0, 2: 3.0, 3: 5.0, 5: 7.0, 6: 8.0}  # step 2 is best; 4 had no eval
    with Checkpointer(tmp_path, save_interval_steps=1, keep_last=2, keep_best=1) as ckpt:
        save_steps(ckpt, [1, 2, 3, 4], ppl)
        assert ckpt.all_steps() == [2, 3, 4]
    # A restarted run must still know step 2 is best (Orbax only persists metrics when best_fn is set).
    with Checkpointer(tmp_path, save_interval_steps=1, keep_last=2, keep_best=1) as ckpt:
        save_steps(ckpt, [5, 6], ppl)
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.best_step() == 2
    assert sorted(os.listdir(tmp_path)) == ["2", "5", "6"]


def test_saves_on_interval_and_when_forced(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=3, keep_last=None) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.save(s, make_state(s), force=(s == 7))]
        ckpt.wait_until_finished()
        # Orbax also saves the first step of a run with no checkpoint yet (InitialSavePolicy).
        assert saved == [1, 3, 6, 7] and ckpt.all_steps() == [1, 3, 6, 7]
        assert not ckpt.save(7, make_state(7), force=True)  # already there: skipped, not an error
        assert ckpt.best_step() is None


# A failed TensorStore read leaves a callback for Orbax's closed event loop; harmless noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete_data", "truncate_data", "delete_item"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog, damage):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1, 2, 3])
    files = [f for f in glob.glob(str(tmp_path / "3" / "state" / "**"), recursive=True) if os.path.isfile(f)]
    data = [f for f in files if f"{os.sep}d{os.sep}" in f]
    if damage == "delete_data":
        for f in data:
            os.remove(f)
    elif damage == "truncate_data":
        for f in data:
            with open(f, "r+b") as fh:
                fh.truncate(7)
    else:
        os.rename(tmp_path / "3" / "state", tmp_path / "state-elsewhere")

    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
            restored = ckpt.restore_latest(TARGET)
        assert restored.step == 2 and restored.data_state == {"batches": 2}
        assert_state_equal(restored.state, make_state(2, scale=2))
        warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert "checkpoint step 3" in warnings and "corrupt" in warnings
        # The bad step is kept aside (not deleted) and the resumed run can save step 3 again.
        (moved,) = glob.glob(str(tmp_path / "corrupt" / "3-*"))
        assert os.path.isdir(moved) and ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, make_state(3), force=True)
        ckpt.wait_until_finished()
        assert ckpt.restore_latest(TARGET).step == 3


def test_unfinished_tmp_directory_is_ignored_and_kept(tmp_path, caplog):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1, 2])
    tmp = tmp_path / "3.orbax-checkpoint-tmp"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00partial")
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
            assert ckpt.all_steps() == [1, 2]
            assert ckpt.restore_latest(TARGET).step == 2
    assert "3.orbax-checkpoint-tmp" in caplog.text and tmp.is_dir()


def test_target_mismatch_raises_and_moves_nothing(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1, 2])
        wrong = TARGET.replace(params={"dense": {"kernel": jax.ShapeDtypeStruct((5, 3), np.float32),
                                                 "bias": jax.ShapeDtypeStruct((3,), np.float32)}})
        with pytest.raises(CheckpointError, match="no checkpoint .* restores onto the given state"):
            ckpt.restore_latest(wrong)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_empty_or_missing_directory(tmp_path):
    with Checkpointer(tmp_path / "fresh") as ckpt:
        assert ckpt.restore_latest(TARGET) is None and ckpt.latest_step() is None
    for missing in (tmp_path / "fresh", tmp_path / "nowhere"):
        with pytest.raises(CheckpointError, match="no checkpoint"):
            checkpointing.restore_params(missing)


def test_save_params_restore_params(tmp_path):
    params = make_state(0, scale=3).params
    checkpointing.save_params(tmp_path, 0, params)
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    restored = checkpointing.restore_params(tmp_path, target=target)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)


def test_restore_model_params_builds_the_target_from_the_model(tmp_path):
    from t5x_like import partitioning
    from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
    from t5x_like.training.train_state import abstract_params, sharded_abstract_state

    model = DecoderOnlyModel(DecoderOnlyConfig(vocab_size=64, d_model=32, num_heads=4, head_dim=8, mlp_dim=64,
                                               num_layers=2, scan_layers=True))
    params = model.init_variables(jax.random.key(1))["params"]
    checkpointing.save_params(tmp_path, 3, params)

    plain = checkpointing.restore_model_params(tmp_path, model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, plain, params)

    mesh = partitioning.create_mesh(data=1, fsdp=-1)
    target = abstract_params(model, mesh)
    want = partitioning.logical_to_sharding(model.logical_axes()["params"], mesh)
    assert jax.tree_util.tree_map(lambda a: a.sharding, target) == want
    # The same params target as the train state's (for any batch shapes).
    batch_shapes = {"decoder_input_tokens": (4, 16)}
    state_target, _ = sharded_abstract_state(model, optax.adam(1e-3), batch_shapes, mesh)
    assert abstract_params(model, mesh, batch_shapes) == state_target.params
    sharded = checkpointing.restore_model_params(tmp_path, model, step=3, mesh=mesh)
    assert jax.tree_util.tree_map(lambda a: a.sharding, sharded) == want
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, params)
    with pytest.raises(CheckpointError, match="no checkpoint step 4"):
        checkpointing.restore_model_params(tmp_path, model, step=4)


MESH_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from t5x_like.training import checkpointing
    assert jax.device_count() == 8
    directory = sys.argv[1]
    devices = np.array(jax.devices())
    mesh1, mesh2 = Mesh(devices, ("data",)), Mesh(devices.reshape(2, 4), ("x", "y"))
    w = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    state = {"params": {"w": jax.device_put(w, NamedSharding(mesh1, P("data", None)))},
             "step": jax.device_put(np.int32(5), NamedSharding(mesh1, P())),
             "rng": jax.device_put(jax.random.key(3), NamedSharding(mesh1, P()))}
    with checkpointing.Checkpointer(directory, save_interval_steps=1) as ckpt:
        assert ckpt.save(5, state, data_state={"batches": 5})
        ckpt.wait_until_finished()
    want = {"params": {"w": NamedSharding(mesh2, P("y", "x"))}, "step": NamedSharding(mesh2, P()),
            "rng": NamedSharding(mesh2, P())}
    target = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, want)
    with checkpointing.Checkpointer(directory) as ckpt:
        got = ckpt.restore_latest(target).state
    np.testing.assert_array_equal(np.asarray(got["params"]["w"]), w)
    assert got["params"]["w"].sharding == want["params"]["w"], got["params"]["w"].sharding
    assert got["params"]["w"].addressable_shards[0].data.shape == (4, 4)
    assert int(got["step"]) == 5 and got["step"].sharding == want["step"]
    assert jax.random.key_impl(got["rng"]) == jax.random.key_impl(state["rng"])
    np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(state["rng"]))
    assert got["rng"].sharding.mesh == mesh2
    params = checkpointing.restore_params(directory, target={"w": target["params"]["w"]})
    assert params["w"].sharding == want["params"]["w"]
    np.testing.assert_array_equal(np.asarray(params["w"]), w)
    print("MESH OK")
""")


def test_restore_onto_a_different_mesh(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "ckpt")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert "MESH OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


MULTIHOST_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from t5x_like.training import checkpointing
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    w = jax.make_array_from_process_local_data(sharding, np.full((2,), pid, np.float32))
    with checkpointing.Checkpointer(directory, save_interval_steps=1) as ckpt:
        assert ckpt.save(1, {"w": w}, data_state={"host": pid, "batches": 10 + pid}, gin_config="X = 1")
        ckpt.wait_until_finished()
        got = ckpt.restore_latest({"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=sharding)})
    assert got.data_state == {"host": pid, "batches": 10 + pid}, got.data_state
    local = np.concatenate([np.asarray(s.data) for s in got.state["w"].addressable_shards])
    np.testing.assert_array_equal(local, [pid, pid])
    print(f"HOST {pid} OK")
""")


def test_two_hosts_keep_their_own_data_state(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_SCRIPT, str(i), str(port), str(tmp_path / "ckpt")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (out, err) in enumerate(outs):
        assert f"HOST {i} OK" in out, out[-2000:] + err[-5000:]
    with open(tmp_path / "ckpt" / "1" / "data_state" / "metadata") as f:  # one JSON, written by process 0
        assert json.load(f) == {"process_0": {"host": 0, "batches": 10}, "process_1": {"host": 1, "batches": 11}}
