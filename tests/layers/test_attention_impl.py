"""`attention_impl`: jax.nn.dot_product_attention and Pallas splash (interpreted on CPU) against the
blocked XLA path, outputs and gradients (inputs and params), on the masks the models build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_like.errors import unwrap_gin
from t5x_like.layers import MultiHeadAttention, make_decoder_mask, make_encoder_mask
from t5x_like.layers import attention_kernels
from t5x_like.models.config import ConfigError, DecoderOnlyConfig

BATCH, LENGTH, EMBED, HEAD_DIM = 2, 128, 16, 8  # splash blocks are 128 positions
TOL = 1e-5


def _packed_segments():
    """Two rows: three packed examples then padding (segment 0), and two examples."""
    seg = np.zeros((BATCH, LENGTH), np.int32)
    seg[0, :37], seg[0, 37:80], seg[0, 80:107] = 1, 2, 3
    seg[1, :67], seg[1, 67:] = 1, 2
    return seg


def _positions(seg):
    """Positions restart at 0 in each packed example, as packing writes them."""
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for i in range(1, seg.shape[1]):
            pos[b, i] = 0 if seg[b, i] != seg[b, i - 1] else pos[b, i - 1] + 1
    return pos


def _causal_case(kind):
    """(mask, positions, window) for causal self-attention as `make_decoder_mask` builds it."""
    seg = _packed_segments() if kind in ("packed", "packed_window") else None
    pos = _positions(seg) if seg is not None else np.broadcast_to(np.arange(LENGTH), (BATCH, LENGTH))
    window = 5 if kind in ("window", "packed_window") else None
    mask = make_decoder_mask(LENGTH, BATCH, None, None if seg is None else jnp.asarray(seg),
                             positions=jnp.asarray(pos), sliding_window=window)
    return mask, jnp.asarray(pos), window


def _module(impl, kv_heads, window, causal=True):
    return MultiHeadAttention(num_heads=4, num_kv_heads=kv_heads, head_dim=HEAD_DIM, rotary_theta=10000.0,
                              sliding_window=window, causal=causal, attention_impl=impl,
                              causal_query_block=8 if impl == "xla" and causal else 0)  # blocked path


def _inputs(kv_len=LENGTH):
    rng = np.random.RandomState(0)
    return (jnp.asarray(rng.randn(BATCH, LENGTH, EMBED), jnp.float32),
            jnp.asarray(rng.randn(BATCH, kv_len, EMBED), jnp.float32))


def _value_and_grads(module, params, xq, xkv, mask, pos_q=None, pos_kv=None):
    """Outputs, and gradients of a random projection of them wrt params and both inputs. Queries
    that see no key (padding) are left out of the projection, as every loss leaves them out: the
    XLA path's additive mask passes them a gradient that jax.nn's `where` mask does not."""
    probe = np.random.RandomState(1).randn(BATCH, LENGTH, EMBED)
    if mask is not None:
        probe = probe * np.asarray(mask).max(axis=(1, 3))[..., None]
    probe = jnp.asarray(probe, jnp.float32)

    def f(params, xq, xkv):
        out = module.apply({"params": params}, xq, xkv, mask, None, pos_q, pos_kv)
        return jnp.sum(out * probe), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(params, xq, xkv)
    return out, grads


def _assert_close(got, want):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=TOL, rtol=TOL)


@pytest.mark.parametrize("kind,kv_heads", [
    # default: the causal mask, and the local mask with segment ids (packed_window covers packed and window)
    ("causal", 2), pytest.param("packed", 2, marks=pytest.mark.slow), pytest.param("window", 2, marks=pytest.mark.slow),
    ("packed_window", 2),
    # MHA and MQA: new shapes to compile (about 40 s each on a loaded CPU)
    pytest.param("packed_window", 4, marks=pytest.mark.slow), pytest.param("causal", 1, marks=pytest.mark.slow)])
def test_kernels_equal_blocked_xla_on_causal_masks(kind, kv_heads):
    """Causal, packed (segment ids), sliding-window and both; GQA, MHA, MQA; wrt q/k/v inputs and params."""
    mask, pos, window = _causal_case(kind)
    xq, xkv = _inputs()
    ref = _module("xla", kv_heads, window)
    params = ref.init(jax.random.PRNGKey(0), xq, xkv, mask, None, pos, pos)["params"]
    want = _value_and_grads(ref, params, xq, xkv, mask, pos, pos)
    assert float(jnp.max(jnp.abs(want[0]))) > 0.1  # not a vacuous comparison
    for impl in ("dot_product", "pallas"):
        _assert_close(_value_and_grads(_module(impl, kv_heads, window), params, xq, xkv, mask, pos, pos), want)


def test_dot_product_equals_xla_on_encoder_and_cross_masks():
    """Non-causal attention (padding, packed segments, different key length) passes the mask."""
    xq, xkv = _inputs(kv_len=24)
    tokens = np.ones((BATCH, LENGTH), np.int32)
    tokens[0, 107:] = 0
    seg = _packed_segments()
    enc_mask = make_encoder_mask(jnp.asarray(tokens), jnp.asarray(seg))
    cross = jnp.asarray(np.random.RandomState(2).rand(BATCH, 1, LENGTH, 24) > 0.3, jnp.float32)
    for mask, kv in ((enc_mask, xq), (cross, xkv)):
        ref = _module("xla", 2, None, causal=False)
        params = ref.init(jax.random.PRNGKey(0), xq, kv, mask)["params"]
        _assert_close(_value_and_grads(_module("dot_product", 2, None, causal=False), params, xq, kv, mask),
                      _value_and_grads(ref, params, xq, kv, mask))


@pytest.mark.parametrize("impl,primitive", [("pallas", "pallas_call"), ("dot_product", None)])
def test_selected_kernel_is_the_one_traced(impl, primitive, monkeypatch):
    """No silent fallback: splash appears as a pallas_call, dot_product calls jax.nn's function."""
    mask, pos, window = _causal_case("packed_window")
    xq, _ = _inputs()
    calls = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(k) or original(*a, **k))
    module = _module(impl, 2, window)
    params = module.init(jax.random.PRNGKey(0), xq, xq, mask, None, pos, pos)["params"]
    jaxpr = str(jax.make_jaxpr(lambda x: module.apply({"params": params}, x, x, mask, None, pos, pos))(xq))
    if primitive:
        assert primitive in jaxpr and not calls
    else:
        assert "pallas_call" not in jaxpr and calls[-1]["is_causal"] and calls[-1]["local_window_size"] == (4, 0)


def test_segment_ids_from_mask_recover_packing():
    """Same-segment pairs are exactly those the recovered ids put together (padding excepted)."""
    seg = _packed_segments()
    mask, _, _ = _causal_case("packed_window")
    ids = np.asarray(attention_kernels.segment_ids_from_mask(mask, LENGTH))
    assert (np.equal.outer(ids[0], ids[0]) == np.equal.outer(seg[0], seg[0])).all()
    assert (np.equal.outer(ids[1], ids[1]) == np.equal.outer(seg[1], seg[1])).all()


def test_resolve_picks_per_backend_and_falls_back_to_xla(monkeypatch):
    resolve = attention_kernels.resolve
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve("auto", causal=True, length=128, xla_only=False) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve("auto", causal=True, length=256, xla_only=False) == "pallas"
    assert resolve("auto", causal=True, length=256, xla_only=True) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve("auto", causal=True, length=256, xla_only=False, dtype=jnp.bfloat16) == "dot_product"
    assert resolve("auto", causal=True, length=256, xla_only=False) == "xla"  # no float32 cuDNN kernel
    assert resolve("dot_product", causal=True, length=128, xla_only=True) == "xla"  # dropout / T5 bias
    assert resolve("pallas", causal=False, length=128, xla_only=False) == "xla"  # encoder, cross, prefix-LM
    assert resolve("pallas", causal=True, length=128, xla_only=False) == "pallas"
    assert resolve("pallas", causal=True, length=96, xla_only=False) == "xla"  # not a multiple of 128


@pytest.mark.parametrize("changes,needle", [
    (dict(attention_impl="flash"), "attention_impl='flash'; use one of"),
    (dict(attention_impl="pallas", dropout_rate=0.1), "cannot apply dropout_rate=0.1"),
    (dict(attention_impl="dot_product", position_embedding="relative"), "cannot apply position_embedding='relative'"),
])
def test_config_rejects_impls_that_cannot_apply_the_model(changes, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        DecoderOnlyConfig(**{"position_embedding": "rotary", **changes})
    assert "\n" not in str(unwrap_gin(err.value))
    DecoderOnlyConfig(dropout_rate=0.1)  # "auto" with dropout and the relative bias: the xla path


@pytest.mark.slow  # three models to compile on a shared CPU
def test_decoder_only_model_loss_and_grads_equal_across_impls():
    """A user switches `attention_impl` and nothing else: a packed, sliding-window LLaMA-style model
    (rotary, GQA) gets the same loss and parameter gradients from every implementation."""
    from t5x_like.models import model_for_config

    seg = _packed_segments()
    tokens = np.random.RandomState(3).randint(1, 64, (BATCH, LENGTH)).astype(np.int32) * (seg > 0)
    batch = dict(decoder_input_tokens=tokens, decoder_target_tokens=np.roll(tokens, -1, axis=1),
                 decoder_segment_ids=seg, decoder_positions=_positions(seg))
    results = {}
    for impl in ("xla", "dot_product", "pallas"):
        cfg = DecoderOnlyConfig(num_layers=2, vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                mlp_dim=64, position_embedding="rotary", sliding_window=24, causal_query_block=16,
                                attention_impl=impl)
        model = model_for_config(cfg)
        params = model.init_variables(jax.random.PRNGKey(0), batch)["params"]

        def loss(params):
            logits, _ = model.forward(params, batch)
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["decoder_target_tokens"][..., None], -1)
            weights = batch["decoder_target_tokens"] > 0
            return jnp.sum(nll[..., 0] * weights) / jnp.sum(weights)  # per-token, as training normalises

        results[impl] = jax.value_and_grad(loss)(params)
    for impl in ("dot_product", "pallas"):
        _assert_close(results[impl], results["xla"])
