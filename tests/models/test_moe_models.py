"""MoE in every family: placement every N layers, scanning, training, sparse upcycling, FLOPs."""

import jax
import numpy as np
import optax
import pytest

from t5x_like.errors import unwrap_gin
from t5x_like.interop.hf import stack_layers
from t5x_like.models.config import ConfigError
from t5x_like.models.upcycling import UpcyclingError, upcycle
from t5x_like.training import steps
from t5x_like.training.train_state import TrainState

MOE = dict(num_experts=4, moe_every_n_layers=2, moe_top_k=2)


def _batch(tiny, model, rng, rows=4, length=8):
    if "encoder_input_tokens" in model.required_features and "decoder_input_tokens" in model.required_features:
        return {"encoder_input_tokens": tiny.tokens(rng, (rows, length)),
                "decoder_input_tokens": tiny.tokens(rng, (rows, length)),
                "decoder_target_tokens": tiny.tokens(rng, (rows, length))}
    key = "decoder" if "decoder_input_tokens" in model.required_features else "encoder"
    return {f"{key}_input_tokens": tiny.tokens(rng, (rows, length)),
            f"{key}_target_tokens": tiny.tokens(rng, (rows, length))}


def _stacks(params):
    return [params[k] for k in ("encoder", "decoder") if k in params]


@pytest.mark.parametrize("kind", [  # default: t5, an encoder and a decoder stack in one model
    pytest.param("llama", marks=pytest.mark.slow), pytest.param("gpt2", marks=pytest.mark.slow), "t5",
    pytest.param("bert", marks=pytest.mark.slow)])
def test_every_family_places_moe_every_n_layers_and_trains(kind, tiny):
    model = tiny.model(kind, **MOE)  # 2 layers per stack: layers_0 dense, layers_1 MoE
    batch = _batch(tiny, model, np.random.default_rng(0))
    params = tiny.params(model)["params"]  # numpy draws: no init compile (the suite runs on 2 cores)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                       opt_state=optax.adam(3e-3).init(params), rng=jax.random.key_data(jax.random.key(0)))
    for stack in _stacks(state.params):
        for name, layer in stack.items():
            if name.startswith("layers_"):
                is_moe = int(name.split("_")[1]) % 2 == 1
                assert ("router" in layer["mlp"]) == is_moe, name
                if is_moe:
                    assert layer["mlp"]["wo"].shape == (4, 64, 32)
    step = jax.jit(lambda s, b: steps.train_step(model, optax.adam(3e-3), s, b, dropout=False))
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        assert 0.0 <= float(metrics["moe_dropped_fraction"] / metrics["tokens"]) < 1.0
        assert float(metrics["moe_aux_loss"]) > 0.0 and float(metrics["moe_z_loss"]) > 0.0
    assert losses[-1] < losses[0], losses


def test_scanned_moe_equals_unscanned(tiny):
    cfg = tiny.config("llama", num_experts=4, moe_top_k=2, moe_capacity_factor=1.0)
    model, scanned = tiny.model(cfg), tiny.model(cfg.replace(scan_layers=True))
    variables = tiny.params(model, seed=1)
    batch = {"decoder_input_tokens": tiny.tokens(np.random.default_rng(0), (2, 8))}
    logits, aux = jax.jit(model.compute_logits_and_aux)(variables, batch)
    s_logits, s_aux = jax.jit(scanned.compute_logits_and_aux)({"params": stack_layers(variables["params"])}, batch)
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    for k in aux:
        np.testing.assert_allclose(float(s_aux[k]), float(aux[k]), rtol=1e-5)
    with pytest.raises(ConfigError, match="moe_every_n_layers=2"):
        cfg.replace(scan_layers=True, moe_every_n_layers=2)


@pytest.mark.parametrize("bad, match", [(dict(moe_top_k=5), "moe_top_k=5"), (dict(moe_capacity_factor=0.0), "capacity"),
                                        (dict(moe_every_n_layers=0), "moe_every_n_layers"),
                                        (dict(moe_group_size=0), "moe_group_size"),
                                        (dict(moe_impl="megablox"), "moe_impl='megablox'")])
def test_bad_moe_config_is_refused(tiny, bad, match):
    with pytest.raises(ConfigError, match=match) as err:
        tiny.config("llama", num_experts=4, **bad)
    assert "\n" not in str(unwrap_gin(err.value))  # one line for the CLI (which unwraps gin's proxy)


# Gated MLPs: the layer test (tests/layers/test_moe.py) compares both paths' gradients.
@pytest.mark.parametrize("kind", [pytest.param("llama", marks=pytest.mark.slow), "t5"])
def test_dropless_model_equals_capacity_model_with_unlimited_capacity(kind, tiny):
    """Dropless is the default; with nothing dropped both implementations give the same logits
    and router losses (encoder and decoder stacks, gated and plain MLPs)."""
    dropless = tiny.model(kind, **MOE)
    assert dropless.config.moe_impl == "dropless"
    capacity = tiny.model(dropless.config.replace(moe_impl="capacity", moe_capacity_factor=None))
    variables = tiny.params(dropless, seed=2)
    rng = np.random.default_rng(1)
    batch = {k: tiny.tokens(rng, (2, 8)) for k in dropless.required_features}
    logits, aux = jax.jit(dropless.compute_logits_and_aux)(variables, batch)
    c_logits, c_aux = jax.jit(capacity.compute_logits_and_aux)(variables, batch)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(c_logits), rtol=1e-5, atol=1e-5)
    for k in aux:
        np.testing.assert_allclose(float(aux[k]), float(c_aux[k]), rtol=1e-5, atol=1e-7, err_msg=k)


def test_dense_models_have_no_router_aux(tiny):
    model = tiny.model("llama")
    variables = tiny.params(model)
    batch = {"decoder_input_tokens": tiny.tokens(np.random.default_rng(0), (2, 8))}
    logits, aux = model.compute_logits_and_aux(variables, batch)
    assert aux == {}
    np.testing.assert_allclose(np.asarray(logits), tiny.logits(model, variables, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, scan", [("llama", False), ("llama", True),
                                        pytest.param("t5", False, marks=pytest.mark.slow)])
def test_upcycled_model_equals_dense_when_nothing_is_dropped(kind, scan, tiny):
    dense = tiny.model(kind, scan_layers=scan)
    dense_vars = tiny.params(dense)
    moe_cfg = dense.config.replace(num_experts=4, moe_top_k=2, moe_capacity_factor=None,
                                   moe_every_n_layers=1 if scan else 2)
    moe = tiny.model(moe_cfg)
    moe_vars = upcycle(dense_vars, moe_cfg, jax.random.key(3))
    rng = np.random.default_rng(0)
    batch = {k: tiny.tokens(rng, (2, 8)) for k in dense.required_features}
    np.testing.assert_allclose(tiny.logits(moe, moe_vars, batch), tiny.logits(dense, dense_vars, batch),
                               rtol=1e-5, atol=1e-5)
    stacks = _stacks(moe_vars["params"])
    layer = stacks[0]["layers"] if scan else stacks[0]["layers_1"]
    dense_layer = _stacks(dense_vars["params"])[0]["layers"] if scan else _stacks(dense_vars["params"])[0]["layers_1"]
    for e in range(4):
        expert = layer["mlp"]["wo"][:, e] if scan else layer["mlp"]["wo"][e]
        np.testing.assert_array_equal(expert, dense_layer["mlp"]["wo"]["kernel"])


def test_upcycling_refuses_a_different_architecture(tiny):
    dense_vars = tiny.params(tiny.model("llama"))
    with pytest.raises(UpcyclingError, match="shape"):
        upcycle(dense_vars, tiny.config("llama", d_model=48, num_experts=4))


def test_flops_count_only_routed_experts(tiny):
    dense = tiny.model("llama", num_layers=2)
    moe = tiny.model("llama", num_layers=2, num_experts=8, moe_top_k=2)
    lengths = {"decoder_input_tokens": 8}
    shapes = lambda m: jax.eval_shape(m.init_variables, jax.random.key(0))["params"]  # noqa: E731
    extra = moe.flops_per_example(shapes(moe), lengths) - dense.flops_per_example(shapes(dense), lengths)
    # k = 2 of 8 experts: twice the dense MLP work per layer (2 layers), plus the routers.
    mlp = 3 * 32 * 64
    assert extra == pytest.approx(6 * 8 * 2 * (mlp + 32 * 8))


def test_train_cli_refuses_top_k_above_the_expert_count(tmp_path, capsys):
    """moe_top_k > num_experts through the command line: one `error:` line, exit 2."""
    from t5x_like import main
    status = main.main(["train", "--gin_file=tests/tiny_lm_run.gin", "--gin.TRAIN_STEPS=1",
                        f"--gin.MODEL_DIR='{tmp_path}'", "--gin.DecoderOnlyConfig.num_experts=4",
                        "--gin.DecoderOnlyConfig.moe_top_k=5"])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "moe_top_k=5 must be between 1 and num_experts=4" in lines[0]
