"""Checkpointer: round trips, retention, interval saves, corrupt and unfinished steps, other meshes;
integrity manifests, NaN checks, disk full, another model config, and the CLI falling back."""

import glob
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

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


def test_target_mismatch_raises_one_line_and_moves_nothing(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1, 2])
        wrong = TARGET.replace(params={"dense": {"kernel": jax.ShapeDtypeStruct((5, 3), np.float32),
                                                 "bias": jax.ShapeDtypeStruct((3,), np.float32)}})
        with pytest.raises(CheckpointError) as info:
            ckpt.restore_latest(wrong)
        assert str(info.value) == (f"checkpoint step 2 in {tmp_path} has parameter dense/kernel of shape (4, 3), "
                                   "the model expects (5, 3): it was written by another model config; use a new "
                                   "MODEL_DIR or the matching gin files")
        renamed = TARGET.replace(params={"dense": {"weight": TARGET.params["dense"]["kernel"],
                                                   "bias": TARGET.params["dense"]["bias"]}})
        with pytest.raises(CheckpointError, match="has no parameter dense/weight .*another model config"):
            ckpt.restore_latest(renamed)
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


# --- integrity: manifests, byte flips, NaN, explicit steps, unverified steps --------------------

def step_files(step_dir):
    return sorted(os.path.relpath(f, step_dir) for f in glob.glob(os.path.join(step_dir, "**"), recursive=True)
                  if os.path.isfile(f) and os.path.basename(f) != checkpointing.MANIFEST)


def random_params(model, seed):
    """Params of `model`'s shapes without running its init (fast)."""
    from t5x_like.training.train_state import abstract_params
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract_params(model))


def flip_bytes(step_dir):
    """Invert 4 bytes in the middle of the step's largest file: same size, different content."""
    largest = max((os.path.join(step_dir, f) for f in step_files(step_dir)), key=os.path.getsize)
    size = os.path.getsize(largest)
    with open(largest, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(4)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return largest


@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_lists_every_file_with_size_and_sha256(tmp_path, async_save):
    import hashlib
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=async_save) as ckpt:
        assert ckpt.save(1, make_state(1), data_state={"batches": 1}, metrics={"perplexity": 3.0})
        if async_save:  # written by a background thread right after Orbax's commit, without waiting
            manifest_path = tmp_path / "1" / checkpointing.MANIFEST
            for _ in range(600):
                if manifest_path.exists():
                    break
                time.sleep(0.05)
        ckpt.wait_until_finished()
        assert ckpt.latest_verified_step() == 1
    with open(tmp_path / "1" / checkpointing.MANIFEST) as f:
        manifest = json.load(f)
    assert manifest["format"] == 1 and manifest["step"] == 1 and manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == step_files(tmp_path / "1") and len(manifest["files"]) > 5
    for rel, entry in manifest["files"].items():
        data = (tmp_path / "1" / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not [n for n in os.listdir(tmp_path / "1") if n.endswith(".tmp")]
    assert checkpointing.verify_step(str(tmp_path), 1) is True


def test_byte_flipped_latest_falls_back_to_the_previous_step(tmp_path, caplog):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1, 2, 3])
    flip_bytes(tmp_path / "3")
    with pytest.raises(checkpointing.CorruptCheckpointError, match="does not match its sha256"):
        checkpointing.verify_step(str(tmp_path), 3)
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        assert ckpt.latest_verified_step() == 2
        with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
            restored = ckpt.restore_latest(TARGET)
        assert restored.step == 2 and restored.data_state == {"batches": 2}
        assert_state_equal(restored.state, make_state(2, scale=2))
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("checkpoint step 3" in w and "checksum" in w for w in warnings), warnings
        (moved,) = glob.glob(str(tmp_path / "corrupt" / "3-*"))
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, make_state(3), force=True)
        ckpt.wait_until_finished()
        assert ckpt.latest_verified_step() == 3


def test_byte_flipped_latest_eval_path_falls_back_and_moves_nothing(tmp_path, caplog):
    from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
    model = DecoderOnlyModel(DecoderOnlyConfig(vocab_size=64, d_model=16, num_heads=2, head_dim=8, mlp_dim=32,
                                               num_layers=1))
    saved = {s: random_params(model, s) for s in (1, 2)}
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        for s, params in saved.items():
            ckpt.save(s, {"step": np.int32(s), "params": params})
    flip_bytes(tmp_path / "2")
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        got = checkpointing.restore_model_params(tmp_path, model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, saved[1])
    assert "checkpoint step 2" in caplog.text and "corrupt" in caplog.text and "using checkpoint step 1" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # a reader never moves anything
    with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .* is corrupt \(file .*checksum\); request "
                                              r"another step \(found \[1\]\)"):
        checkpointing.restore_model_params(tmp_path, model, step=2)


def test_explicit_corrupt_step_raises(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1, 2, 3])
    flip_bytes(tmp_path / "3")
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="checkpoint step 3 in .* is corrupt"):
            ckpt.restore(3, TARGET)
        assert_state_equal(ckpt.restore(2, TARGET).state, make_state(2, scale=2))
    with pytest.raises(CheckpointError, match="checkpoint step 3 in .* is corrupt"):
        checkpointing.restore_params(tmp_path, step=3)
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


def test_nan_poisoned_param_is_rejected(tmp_path, caplog):
    poisoned = make_state(2, scale=2)
    poisoned.params["dense"]["kernel"][1, 2] = np.nan
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1])
        ckpt.save(2, poisoned, data_state={"batches": 2})
        assert checkpointing.verify_step(str(tmp_path), 2)  # its files are as written: only the values are bad
    with pytest.raises(CheckpointError, match=r"step 2 .*params\['dense'\]\['kernel'\] holds NaN or Inf"):
        checkpointing.restore_params(tmp_path, step=2)
    np.testing.assert_array_equal(checkpointing.restore_params(tmp_path)["dense"]["kernel"],
                                  make_state(1).params["dense"]["kernel"])
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
            restored = ckpt.restore_latest(TARGET)
        assert restored.step == 1 and "NaN or Inf" in caplog.text
        assert ckpt.all_steps() == [1] and glob.glob(str(tmp_path / "corrupt" / "2-*"))


def test_unverified_steps_are_used_only_without_a_verified_one(tmp_path, caplog):
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1, 2, 3])
    os.remove(tmp_path / "3" / checkpointing.MANIFEST)  # killed between Orbax's commit and the manifest
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        np.testing.assert_array_equal(checkpointing.restore_params(tmp_path)["dense"]["kernel"],
                                      make_state(2, scale=2).params["dense"]["kernel"])
    assert "have no manifest" in caplog.text and sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        assert ckpt.latest_verified_step() == 2
        assert ckpt.restore_latest(TARGET).step == 2
        assert ckpt.all_steps() == [1, 2] and glob.glob(str(tmp_path / "corrupt" / "3-*"))
    # Checkpoints written before manifests existed: the newest is used, with a warning.
    for s in (1, 2):
        os.remove(tmp_path / str(s) / checkpointing.MANIFEST)
    caplog.clear()
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
            restored = ckpt.restore_latest(TARGET)
        assert restored.step == 2 and "has no manifest" in caplog.text
        assert ckpt.latest_verified_step() is None and ckpt.all_steps() == [1, 2]
        assert_state_equal(restored.state, make_state(2, scale=2))


# --- disk full ----------------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_mid_save_is_one_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capfd, async_save):
    import errno
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    async def no_space(self, x, directory):  # the JSON items fail while the arrays are being written
        raise OSError(errno.ENOSPC, "No space left on device")

    with Checkpointer(tmp_path, save_interval_steps=1, async_save=async_save) as ckpt:
        save_steps(ckpt, [1])
        monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
        with pytest.raises(CheckpointError) as info:
            ckpt.save(2, make_state(2, scale=2), data_state={"batches": 2})
            ckpt.wait_until_finished()
        assert "\n" not in str(info.value)
        assert str(info.value).startswith(f"disk full: saving checkpoint step 2 to {tmp_path} failed")
        assert "earlier checkpoints [1] are untouched" in str(info.value)
        assert sorted(os.listdir(tmp_path)) == ["1"]  # no *.orbax-checkpoint-tmp left
    err = capfd.readouterr().err
    assert "Traceback" not in err and "No space left" not in err, err[-3000:]
    monkeypatch.undo()
    with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        assert ckpt.latest_verified_step() == 1
        restored = ckpt.restore_latest(TARGET)
    assert restored.step == 1
    assert_state_equal(restored.state, make_state(1, scale=1))


def test_free_space_is_checked_before_each_save(tmp_path, monkeypatch):
    import collections
    import shutil
    with Checkpointer(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        save_steps(ckpt, [1])
        size = sum(os.path.getsize(tmp_path / "1" / f) for f in step_files(tmp_path / "1"))
        usage = collections.namedtuple("usage", "total used free")
        asked = []
        monkeypatch.setattr(shutil, "disk_usage", lambda p: asked.append(p) or usage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(CheckpointError) as info:
            ckpt.save(2, make_state(2))
        assert str(info.value).startswith(f"not enough disk space to save checkpoint step 2 in {tmp_path}: "
                                          f"1,000 bytes free, {size:,} needed")
        assert asked == [str(tmp_path)] and sorted(os.listdir(tmp_path)) == ["1"]
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, 10**9))
        assert ckpt.save(2, make_state(2))


# --- another model config -----------------------------------------------------------------------

def test_another_model_size_is_one_line_without_orbax_noise(tmp_path, capfd):
    from t5x_like.models import DecoderOnlyConfig, DecoderOnlyModel
    from t5x_like.training.train_state import abstract_params

    def model(d_model):
        return DecoderOnlyModel(DecoderOnlyConfig(vocab_size=64, d_model=d_model, num_heads=2, head_dim=8,
                                                  mlp_dim=32, num_layers=2))
    params = random_params(model(16), 0)
    checkpointing.save_params(tmp_path / "import", 0, params)
    with Checkpointer(tmp_path / "run", save_interval_steps=1, async_save=False) as ckpt:
        ckpt.save(1, {"step": np.int32(1), "params": params})
    for restore in (lambda: checkpointing.restore_model_params(tmp_path / "import", model(32)),
                    lambda: checkpointing.restore_model_params(tmp_path / "run", model(32)),
                    lambda: Checkpointer(tmp_path / "run").restore_latest(
                        {"step": jax.ShapeDtypeStruct((), np.int32), "params": abstract_params(model(32))})):
        with pytest.raises(CheckpointError) as info:
            restore()
        message = str(info.value)
        assert "\n" not in message and " has parameter " in message and "the model expects" in message, message
        assert "(16,)" in message and "(32,)" in message and "another model config" in message
    assert sorted(os.listdir(tmp_path / "run")) == ["1"]
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Traceback" not in err, err[-3000:]


# --- end to end through the CLI -----------------------------------------------------------------

TINY_RUN_GIN = os.path.join(REPO, "tests", "tiny_lm_run.gin")
TINY_MODEL = ["--gin.DecoderOnlyConfig.num_layers=2", "--gin.DecoderOnlyConfig.vocab_size=384",
              "--gin.DecoderOnlyConfig.d_model=64", "--gin.DecoderOnlyConfig.head_dim=16",
              "--gin.DecoderOnlyConfig.mlp_dim=128"]


@pytest.mark.slow
def test_cli_byte_flipped_latest_checkpoint_eval_and_train_fall_back(tmp_path, capsys, caplog):
    from t5x_like import main
    run = tmp_path / "run"
    train = ["train", f"--gin_file={TINY_RUN_GIN}", f"--gin.MODEL_DIR='{run}'", "--gin.TRAIN_STEPS=4",
             "--gin.train.checkpoint_every=2"]
    evaluate = ["eval", "--gin_file=models/llama_tiny.gin", "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_DIR='{run}'",
                "--gin.MIXTURE_OR_TASK_NAME='embedded_lm_byte'", "--gin.TASK_FEATURE_LENGTHS={'targets': 64}",
                "--gin.BATCH_SIZE=8", "--gin.EVAL_BATCHES=2", *TINY_MODEL]

    def perplexity(args):
        capsys.readouterr()
        assert main.main(args) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("validation embedded_lm_byte")][0]
        return float(line.split("perplexity=")[1].split()[0])

    assert main.main(train) == 0
    ckpts = run / "checkpoints"
    assert 2 in Checkpointer(ckpts).all_steps() and checkpointing.verify_step(str(ckpts), 4)
    expected = perplexity([*evaluate, "--gin.evaluate.step=2"])
    flip_bytes(ckpts / "4")

    with caplog.at_level(logging.INFO):
        got = perplexity(evaluate)
        assert np.isfinite(got) and got == expected
        assert "checkpoint step 4" in caplog.text and "using checkpoint step 2" in caplog.text
        assert "4" in os.listdir(ckpts)  # eval moves nothing
        capsys.readouterr()
        assert main.main([*evaluate, "--gin.evaluate.step=4"]) == 2
        assert "checkpoint step 4 in" in capsys.readouterr().err

        caplog.clear()
        assert main.main(train) == 0
        assert f"resumed from {ckpts} step 2" in caplog.text
    assert glob.glob(str(ckpts / "corrupt" / "4-*"))
    assert checkpointing.verify_step(str(ckpts), 4)  # step 4 trained and saved again

    # Resuming with another model size: one error line, none of Orbax's asyncio noise.
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-m", "t5x_like.main", *train, "--gin.TRAIN_STEPS=6",
                           "--gin.DecoderOnlyConfig.d_model=32"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "has parameter" in errors[0] and "the model expects (32,)" in errors[0], errors
    assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
