"""Model-level properties of the three families (tiny models, random weights).

Masks are tested by what they do: perturb an input token and check which logits move. Packed rows
are compared with each example run alone. Then scan/remat equivalence, logical axes, dtypes,
dropout and the compute_logits contract.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from t5x_like.interop.hf import stack_layers, unstack_layers
from t5x_like.layers import make_cross_mask, make_decoder_mask, make_encoder_mask
from t5x_like.models.transformer import TransformerStack
from t5x_like.layers.mlp import ACTIVATION_FNS
from t5x_like.models import (DecoderOnlyModel, EncoderDecoderModel, EncoderOnlyModel, DecoderOnlyConfig,
                             EncoderDecoderConfig, EncoderOnlyConfig, model_for_config)

ATOL = 1e-4  # "unchanged" (logits are O(1..10)); a real change is far above this


def _changed(a, b, tol=1e-3) -> bool:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > tol


def _perturb(tokens, idx, vocab):
    """Copy of tokens with a different non-padding id at idx (an int or an index array)."""
    out = tokens.copy()
    out[idx] = 2 + (out[idx] - 2 + 1 + 7) % (vocab - 2)
    assert np.all(out[idx] != tokens[idx]) and np.all(out[idx] >= 2)
    return out


def _shift(targets):
    """Decoder inputs for targets: shifted right with a 0 BOS (per packed segment, as seqio packs)."""
    return np.concatenate([[0], targets[:-1]]).astype(np.int32)


def _pack(examples, length, shift=False):
    """Pack 1-D examples into one row: tokens (or shifted inputs), segment ids, positions; 0-padded."""
    tokens, seg, pos = (np.zeros(length, np.int32) for _ in range(3))
    start = 0
    for i, ex in enumerate(examples):
        n = len(ex)
        tokens[start:start + n] = _shift(ex) if shift else ex
        seg[start:start + n] = i + 1
        pos[start:start + n] = np.arange(n)
        start += n
    return tokens, seg, pos


def _pad(x, length):
    return np.pad(x, (0, length - len(x))).astype(np.int32)


def _batch(kind, rng, tiny):
    """A realistic batch for the family, with padding where the family has a padding mask."""
    if kind in ("llama", "gpt2"):
        return {"decoder_input_tokens": tiny.tokens(rng, (2, 12))}
    enc = tiny.tokens(rng, (2, 12))
    enc[1, 8:] = 0
    if kind == "bert":
        return {"encoder_input_tokens": enc}
    return {"encoder_input_tokens": enc, "decoder_input_tokens": tiny.tokens(rng, (2, 8))}


# ---------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_only_never_sees_the_future(kind, tiny):
    length = 10
    base = tiny.tokens(np.random.default_rng(0), (length,))
    rows = [base] + [_perturb(base, t, tiny.VOCAB) for t in range(length)]
    model = tiny.model(kind)
    out = tiny.logits(model, tiny.params(model), {"decoder_input_tokens": np.stack(rows)})
    ref = out[0]
    for t in range(length):
        got = out[t + 1]
        np.testing.assert_allclose(got[:t], ref[:t], atol=ATOL, err_msg=f"token {t} leaked into earlier logits")
        assert _changed(got[t], ref[t])
        if t + 1 < length:
            assert _changed(got[t + 1:], ref[t + 1:]), f"token {t} did not reach later positions"


def test_encoder_decoder_decoder_is_causal_and_cross_attends_everywhere(tiny):
    enc_len, dec_len = 9, 8
    rng = np.random.default_rng(1)
    enc = tiny.tokens(rng, (enc_len,))
    dec = tiny.tokens(rng, (dec_len,))
    rows_dec = [dec] + [_perturb(dec, t, tiny.VOCAB) for t in range(dec_len)] + [dec, dec]
    rows_enc = [enc] * (dec_len + 1) + [_perturb(enc, 0, tiny.VOCAB), _perturb(enc, enc_len - 1, tiny.VOCAB)]
    model = tiny.model("t5")
    out = tiny.logits(model, tiny.params(model), {"encoder_input_tokens": np.stack(rows_enc),
                                                  "decoder_input_tokens": np.stack(rows_dec)})
    ref = out[0]
    for t in range(dec_len):
        got = out[t + 1]
        np.testing.assert_allclose(got[:t], ref[:t], atol=ATOL, err_msg=f"decoder token {t} leaked backwards")
        assert _changed(got[t], ref[t])
        if t + 1 < dec_len:
            assert _changed(got[t + 1:], ref[t + 1:])
    for row in out[-2:]:  # any encoder token reaches every decoder position (cross-attention is not causal)
        assert all(_changed(row[i], ref[i]) for i in range(dec_len))


# ---------------------------------------------------------------------------------------------
# Packing: segments never see each other, and a packed row equals its examples run alone.


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_only_packing(kind, tiny):
    """Learned positions need decoder_positions (reset per segment); rotary gets them too."""
    length, vocab = 16, tiny.VOCAB
    rng = np.random.default_rng(2)
    a, b = tiny.tokens(rng, (5,)), tiny.tokens(rng, (7,))
    targets, seg, pos = _pack([a, b], length)
    inputs, _, _ = _pack([a, b], length, shift=True)
    model = tiny.model(kind)
    params = tiny.params(model)

    rows = [inputs, _perturb(inputs, np.arange(6, 12), vocab), _perturb(inputs, np.arange(1, 5), vocab)]
    packed = tiny.logits(model, params, {
        "decoder_input_tokens": np.stack(rows), "decoder_target_tokens": np.stack([targets] * 3),
        "decoder_segment_ids": np.stack([seg] * 3), "decoder_positions": np.stack([pos] * 3)})
    alone = tiny.logits(model, params, {
        "decoder_input_tokens": np.stack([_pad(_shift(a), length), _pad(_shift(b), length)]),
        "decoder_target_tokens": np.stack([_pad(a, length), _pad(b, length)])})
    np.testing.assert_allclose(packed[0, :5], alone[0, :5], atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(packed[0, 5:12], alone[1, :7], atol=ATOL, rtol=1e-4)
    # Changing segment 2 leaves segment 1 alone, and (not implied by causality) vice versa.
    np.testing.assert_allclose(packed[1, :5], packed[0, :5], atol=ATOL)
    assert _changed(packed[1, 6:12], packed[0, 6:12])
    np.testing.assert_allclose(packed[2, 5:12], packed[0, 5:12], atol=ATOL)
    assert _changed(packed[2, 1:5], packed[0, 1:5])


def test_encoder_decoder_packing(tiny):
    """Encoder and decoder packed together with matching segment ids (T5 relative bias)."""
    enc_len, dec_len, vocab = 14, 10, tiny.VOCAB
    rng = np.random.default_rng(3)
    ea, eb = tiny.tokens(rng, (6,)), tiny.tokens(rng, (5,))
    da, db = tiny.tokens(rng, (4,)), tiny.tokens(rng, (3,))
    enc, eseg, epos = _pack([ea, eb], enc_len)
    targets, dseg, dpos = _pack([da, db], dec_len)
    inputs, _, _ = _pack([da, db], dec_len, shift=True)
    model = tiny.model("t5")
    params = tiny.params(model)

    enc_rows = [enc, _perturb(enc, np.arange(6, 11), vocab), _perturb(enc, np.arange(0, 6), vocab), enc]
    dec_rows = [inputs, inputs, inputs, _perturb(inputs, np.arange(1, 4), vocab)]
    n = len(enc_rows)
    packed = tiny.logits(model, params, {
        "encoder_input_tokens": np.stack(enc_rows), "decoder_input_tokens": np.stack(dec_rows),
        "decoder_target_tokens": np.stack([targets] * n), "encoder_segment_ids": np.stack([eseg] * n),
        "decoder_segment_ids": np.stack([dseg] * n), "encoder_positions": np.stack([epos] * n),
        "decoder_positions": np.stack([dpos] * n)})
    alone = tiny.logits(model, params, {
        "encoder_input_tokens": np.stack([_pad(ea, enc_len), _pad(eb, enc_len)]),
        "decoder_input_tokens": np.stack([_pad(_shift(da), dec_len), _pad(_shift(db), dec_len)]),
        "decoder_target_tokens": np.stack([_pad(da, dec_len), _pad(db, dec_len)])})
    np.testing.assert_allclose(packed[0, :4], alone[0, :4], atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(packed[0, 4:7], alone[1, :3], atol=ATOL, rtol=1e-4)
    # Encoder segment 2 -> only decoder segment 2; encoder segment 1 -> only decoder segment 1.
    np.testing.assert_allclose(packed[1, :4], packed[0, :4], atol=ATOL)
    assert _changed(packed[1, 4:7], packed[0, 4:7])
    np.testing.assert_allclose(packed[2, 4:7], packed[0, 4:7], atol=ATOL)
    assert _changed(packed[2, :4], packed[0, :4])
    # Decoder segment 1 tokens do not reach decoder segment 2.
    np.testing.assert_allclose(packed[3, 4:7], packed[0, 4:7], atol=ATOL)
    assert _changed(packed[3, 1:4], packed[0, 1:4])


def test_encoder_only_packing(tiny):
    """Bidirectional: neither segment sees the other in either direction; learned positions reset."""
    length, vocab = 16, tiny.VOCAB
    rng = np.random.default_rng(4)
    a, b = tiny.tokens(rng, (6,)), tiny.tokens(rng, (7,))
    tokens, seg, pos = _pack([a, b], length)
    model = tiny.model("bert")
    params = tiny.params(model)
    rows = [tokens, _perturb(tokens, np.arange(6, 13), vocab), _perturb(tokens, np.array([5]), vocab)]
    packed = tiny.logits(model, params, {"encoder_input_tokens": np.stack(rows),
                                         "encoder_segment_ids": np.stack([seg] * 3),
                                         "encoder_positions": np.stack([pos] * 3)})
    alone = tiny.logits(model, params, {"encoder_input_tokens": np.stack([_pad(a, length), _pad(b, length)])})
    np.testing.assert_allclose(packed[0, :6], alone[0, :6], atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(packed[0, 6:13], alone[1, :7], atol=ATOL, rtol=1e-4)
    np.testing.assert_allclose(packed[1, :6], packed[0, :6], atol=ATOL)
    np.testing.assert_allclose(packed[2, 6:13], packed[0, 6:13], atol=ATOL)
    assert _changed(packed[2, 0], packed[0, 0])  # the last token of segment 1 reaches its first


# ---------------------------------------------------------------------------------------------
# Padding, prefix-LM, sliding window


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_encoder_padding_does_not_change_outputs(kind, tiny):
    """Appending pad tokens (0) to the encoder input changes no non-padding output."""
    batch = _batch(kind, np.random.default_rng(5), tiny)
    model = tiny.model(kind)
    params = tiny.params(model)
    short = tiny.logits(model, params, batch)
    enc = batch["encoder_input_tokens"]
    longer = dict(batch, encoder_input_tokens=np.pad(enc, ((0, 0), (0, 5))))
    long = tiny.logits(model, params, longer)
    if kind == "bert":
        nonpad = enc > 0
        np.testing.assert_allclose(long[:, :enc.shape[1]][nonpad], short[nonpad], atol=ATOL, rtol=1e-4)
    else:
        np.testing.assert_allclose(long, short, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama"])
def test_prefix_lm_prefix_is_bidirectional_but_never_sees_targets(kind, tiny):
    length, prefix = 10, 4
    base = tiny.tokens(np.random.default_rng(6), (length,))
    causal_attention = np.array([1] * prefix + [0] * (length - prefix), np.int32)
    rows = [base] + [_perturb(base, t, tiny.VOCAB) for t in range(length)]
    model = tiny.model(kind)
    out = tiny.logits(model, tiny.params(model), {
        "decoder_input_tokens": np.stack(rows), "decoder_causal_attention": np.stack([causal_attention] * len(rows))})
    ref = out[0]
    for j in range(1, prefix):  # prefix token j reaches every prefix position i < j
        for i in range(j):
            assert _changed(out[j + 1][i], ref[i]), f"prefix position {i} does not see prefix token {j}"
    for t in range(prefix, length):  # tokens after the prefix stay invisible to everything before them
        np.testing.assert_allclose(out[t + 1][:t], ref[:t], atol=ATOL, err_msg=f"token {t} leaked backwards")


@pytest.mark.parametrize("num_layers", [1, 2])
def test_sliding_window(num_layers, tiny):
    """One layer: position i sees tokens i-w+1..i only. Each further layer widens that by w-1."""
    length, window = 14, 3
    reach = num_layers * (window - 1)  # furthest token distance that can influence a position
    base = tiny.tokens(np.random.default_rng(7), (length,))
    rows = [base] + [_perturb(base, t, tiny.VOCAB) for t in range(length)]
    model = tiny.model("llama", sliding_window=window, num_layers=num_layers)
    out = tiny.logits(model, tiny.params(model), {"decoder_input_tokens": np.stack(rows)})
    ref = out[0]
    for t in range(length):
        got = out[t + 1]
        np.testing.assert_allclose(got[:t], ref[:t], atol=ATOL)
        np.testing.assert_allclose(got[t + reach + 1:], ref[t + reach + 1:], atol=ATOL,
                                   err_msg=f"token {t} seen from beyond the window")
        for i in range(t, min(t + reach + 1, length)):
            assert _changed(got[i], ref[i]), f"token {t} invisible at position {i}, inside the window"


# ---------------------------------------------------------------------------------------------
# Scan / remat equivalence


@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_scan_matches_unrolled_layers(kind, tiny):
    """The same weights give the same logits with scan_layers=True (stacked) and False."""
    batch = _batch(kind, np.random.default_rng(8), tiny)
    plain = tiny.model(kind)
    scanned = tiny.model(kind, scan_layers=True)
    params = tiny.params(plain, seed=1)
    stacked = {"params": stack_layers(params["params"])}
    # The stacked tree is exactly what the scanned model initialises.
    expected = jax.eval_shape(scanned.init_variables, jax.random.key(0))["params"]
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(stacked["params"])
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(expected),
                                                  jax.tree_util.tree_leaves(stacked["params"])))
    ref = tiny.logits(plain, params, batch)
    np.testing.assert_allclose(tiny.logits(scanned, stacked, batch), ref, atol=1e-5, rtol=1e-5)
    roundtrip = unstack_layers(stacked["params"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, roundtrip, params["params"])


_GRAD_FNS = {}


def _logits_and_grads(model, variables, batch):
    fn = _GRAD_FNS.get(model.config)
    if fn is None:
        def loss(params, batch):
            logits = model.compute_logits({"params": params}, batch)
            # A weighted sum of the logits, so each vocabulary entry pulls the gradient differently.
            return jnp.sum(logits * jnp.linspace(-1.0, 1.0, logits.shape[-1])), logits
        fn = _GRAD_FNS[model.config] = jax.jit(jax.grad(loss, has_aux=True))
    grads, logits = fn(variables["params"], batch)
    return np.asarray(logits), grads


@pytest.mark.parametrize("kind,policy,scan", [("llama", "minimal", True),
                                               pytest.param("bert", "full", False, marks=pytest.mark.slow)])
def test_remat_policies_change_nothing(kind, policy, scan, tiny):
    """Rematerialisation trades memory for compute; logits and gradients must be identical."""
    batch = _batch(kind, np.random.default_rng(9), tiny)
    base = tiny.model(kind, scan_layers=scan)
    remat = tiny.model(kind, scan_layers=scan, remat_policy=policy)
    params = tiny.params(base, seed=2)
    ref_logits, ref_grads = _logits_and_grads(base, params, batch)
    logits, grads = _logits_and_grads(remat, params, batch)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = jax.tree_util.tree_leaves(grads)
    assert len(flat) == len(flat_ref)
    for (path, r), g in zip(flat_ref, flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-4, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    assert any(float(np.max(np.abs(np.asarray(r)))) > 0 for _, r in flat_ref)


# ---------------------------------------------------------------------------------------------
# Logical axes, dtypes


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5", "bert"])
@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_full_logical_axes(kind, scan, tiny):
    model = tiny.model(kind, scan_layers=scan)
    specs = model.logical_axes()["params"]
    shapes = jax.eval_shape(model.init_variables, jax.random.key(0))["params"]
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    spec_leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
    shape_leaves = jax.tree_util.tree_leaves_with_path(shapes)
    assert [p for p, _ in spec_leaves] == [p for p, _ in shape_leaves]
    for (path, spec), (_, shape) in zip(spec_leaves, shape_leaves):
        name = jax.tree_util.keystr(path)
        assert is_spec(spec), f"{name} has no logical axes"
        assert len(spec) == len(shape.shape), f"{name}: spec {spec} for shape {shape.shape}"
        assert None not in tuple(spec), f"{name}: unnamed axis in {spec}"
        in_scanned_stack = "['layers']" in name
        assert ("['layers_" if scan else "['layers']") not in name, f"{name} in a {'' if scan else 'un'}scanned model"
        if in_scanned_stack:
            assert spec[0] == "layers" and list(spec).count("layers") == 1, f"{name}: {spec}"
        else:
            assert "layers" not in tuple(spec), f"{name}: {spec}"


@pytest.mark.parametrize("kind", ["llama", "t5", "bert"])
def test_bfloat16_activations(kind, tiny):
    """dtype='bfloat16': params stay float32, logits come back float32 and near the float32 model."""
    f32 = tiny.model(kind)
    bf16 = tiny.model(kind, dtype="bfloat16")
    shapes = jax.eval_shape(bf16.init_variables, jax.random.key(0))
    assert {x.dtype for x in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype("float32")}
    params = tiny.params(f32, seed=3)
    batch = _batch(kind, np.random.default_rng(10), tiny)
    ref = tiny.logits(f32, params, batch)
    got = tiny.logits(bf16, params, batch)
    assert got.dtype == np.float32
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < 0.05, f"bf16 logits off by {err:.3g} (relative)"
    assert err > 0, "dtype='bfloat16' had no effect on the computation"


# ---------------------------------------------------------------------------------------------
# compute_logits contract, dropout, output-layer options


def test_compute_logits_names_missing_feature(tiny):
    model = tiny.model("t5")
    params = tiny.params(model)
    with pytest.raises(KeyError, match="decoder_input_tokens"):
        model.compute_logits(params, {"encoder_input_tokens": np.ones((1, 4), np.int32)})
    with pytest.raises(KeyError, match="encoder_input_tokens"):
        tiny.model("bert").compute_logits({}, {"decoder_input_tokens": np.ones((1, 4), np.int32)})


def test_dropout_needs_rng(tiny):
    model = tiny.model("llama", dropout_rate=0.1)
    with pytest.raises(ValueError, match="dropout_rng"):
        model.compute_logits(tiny.params(model), {"decoder_input_tokens": np.ones((1, 4), np.int32)},
                             deterministic=False)


def test_dropout(tiny):
    """Different rngs give different logits, the same rng the same; deterministic=True = no dropout.

    Scanned, so the rng also has to travel through nn.scan.
    """
    kind = "llama"
    model = tiny.model(kind, dropout_rate=0.2, scan_layers=True)
    no_dropout = tiny.model(kind, scan_layers=True)
    params = tiny.params(model)
    batch = {k: jnp.asarray(v) for k, v in _batch(kind, np.random.default_rng(11), tiny).items()}
    train = jax.jit(lambda v, b, r: model.compute_logits(v, b, dropout_rng=r, deterministic=False))
    a = np.asarray(train(params, batch, jax.random.key(1)))
    b = np.asarray(train(params, batch, jax.random.key(2)))
    again = np.asarray(train(params, batch, jax.random.key(1)))
    ref = tiny.logits(no_dropout, params, batch)
    assert _changed(a, b) and _changed(a, ref)
    np.testing.assert_array_equal(a, again)
    np.testing.assert_allclose(tiny.logits(model, params, batch), ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_sequence_longer_than_learned_position_table_is_an_error(kind, tiny):
    """Out-of-range position lookups would silently fill NaN into every logit; refuse instead."""
    model = tiny.model(kind)  # max_position_embeddings=32
    key = "decoder_input_tokens" if kind == "gpt2" else "encoder_input_tokens"
    params = tiny.params(model)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        model.compute_logits(params, {key: np.ones((1, 33), np.int32)})
    out = jax.eval_shape(lambda v: model.compute_logits(v, {key: np.ones((1, 32), np.int32)}), params)
    assert out.shape == (1, 32, tiny.VOCAB)  # the full table is usable


def test_scale_tied_logits(tiny):
    """T5 v1.0 scales the decoder output by d_model**-0.5 before the tied projection."""
    batch = _batch("gpt2", np.random.default_rng(12), tiny)
    plain = tiny.model("gpt2")
    scaled = tiny.model("gpt2", scale_tied_logits=True)
    params = tiny.params(plain)
    ref = tiny.logits(plain, params, batch)
    np.testing.assert_allclose(tiny.logits(scaled, params, batch), ref * 32 ** -0.5, rtol=1e-5, atol=1e-5)


def test_tied_logits_use_the_embedding_table(tiny):
    """With tied embeddings there is no separate output kernel; untied models have one."""
    tied = jax.eval_shape(tiny.model("gpt2").init_variables, jax.random.key(0))["params"]
    untied = jax.eval_shape(tiny.model("llama").init_variables, jax.random.key(0))["params"]
    assert "logits_dense" not in tied and untied["logits_dense"]["kernel"].shape == (32, tiny.VOCAB)


def test_encoder_only_token_types(tiny):
    """Omitted token types mean type 0; another type changes the output."""
    model = tiny.model("bert")
    params = tiny.params(model)
    batch = _batch("bert", np.random.default_rng(13), tiny)
    tokens = batch["encoder_input_tokens"]
    types = np.zeros_like(tokens)
    out = tiny.logits(model, params, {"encoder_input_tokens": np.concatenate([tokens, tokens]),
                                      "encoder_token_types": np.concatenate([types, types + 1])})
    none = tiny.logits(model, params, batch)
    np.testing.assert_allclose(out[:2], none, atol=1e-5)
    assert _changed(out[2:], out[:2])


def test_model_for_config_and_dummy_batch():
    for cfg, cls in ((EncoderDecoderConfig(), EncoderDecoderModel), (DecoderOnlyConfig(), DecoderOnlyModel),
                     (EncoderOnlyConfig(), EncoderOnlyModel)):
        model = model_for_config(cfg)
        assert type(model) is cls and model.config is cfg
        assert set(model.dummy_batch(2, 5)) == set(cls.required_features)


# ---------------------------------------------------------------------------------------------
# Networks = embeddings -> stack(s) -> output layer, checked piece by piece


def _stack(cfg, num_layers, **kw):
    return jax.jit(TransformerStack(cfg, num_layers, **kw).apply)


def test_decoder_only_network_composition(tiny):
    """GPT-2 style: token + learned position embeddings, causal stack, tied output projection."""
    model = tiny.model("gpt2")
    params = tiny.params(model, seed=4)
    p = params["params"]
    tokens = _batch("gpt2", np.random.default_rng(14), tiny)["decoder_input_tokens"]
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    x = p["token_embed"]["embedding"][tokens] + p["position_embed"]["embedding"][pos]
    mask = make_decoder_mask(tokens.shape[1], tokens.shape[0])
    h = _stack(model.config, 2, causal=True)({"params": p["decoder"]}, x, mask, pos)
    ref = np.asarray(h, np.float64) @ p["token_embed"]["embedding"].T
    np.testing.assert_allclose(tiny.logits(model, params, {"decoder_input_tokens": tokens}), ref,
                               rtol=1e-4, atol=1e-4)


def test_encoder_only_network_composition(tiny):
    """BERT: token + position + type embeddings, embedding norm, encoder, MLM head with its bias."""
    model = tiny.model("bert")
    cfg = model.config
    params = tiny.params(model, seed=5)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
    tokens = _batch("bert", np.random.default_rng(15), tiny)["encoder_input_tokens"]
    types = (np.arange(tokens.shape[1]) >= 5).astype(np.int32)[None].repeat(tokens.shape[0], 0)
    pos = np.arange(tokens.shape[1])

    def layer_norm(v, q):
        v = v - v.mean(-1, keepdims=True)
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + cfg.norm_epsilon) * q["scale"] + q["bias"]

    x = p["token_embed"]["embedding"][tokens] + p["position_embed"]["embedding"][pos] + \
        p["type_embed"]["embedding"][types]
    x = layer_norm(x, p["embed_norm"]).astype(np.float32)
    h = np.asarray(_stack(cfg, 2)({"params": params["params"]["encoder"]}, x, make_encoder_mask(tokens)), np.float64)
    h = h @ p["mlm_transform"]["kernel"] + p["mlm_transform"]["bias"]
    h = layer_norm(np.asarray(ACTIVATION_FNS["gelu"](h)), p["mlm_norm"])
    ref = h @ p["token_embed"]["embedding"].T + p["mlm_bias"]
    got = tiny.logits(model, params, {"encoder_input_tokens": tokens, "encoder_token_types": types})
    nonpad = tokens > 0
    np.testing.assert_allclose(got[nonpad], ref[nonpad], rtol=1e-4, atol=1e-4)


def test_encoder_decoder_network_composition(tiny):
    """T5: encoder stack on the inputs; decoder stack cross-attends to it; untied output kernel."""
    model = tiny.model("t5")
    cfg = model.config
    params = tiny.params(model, seed=6)
    p = params["params"]
    batch = _batch("t5", np.random.default_rng(16), tiny)
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    emb = p["token_embed"]["embedding"]
    encoded = _stack(cfg, 2)({"params": p["encoder"]}, emb[enc], make_encoder_mask(enc))
    h = _stack(cfg, 2, has_cross_attention=True, causal=True)(
        {"params": p["decoder"]}, emb[dec], make_decoder_mask(dec.shape[1], dec.shape[0]), None, encoded,
        make_cross_mask(np.ones_like(dec), enc))
    ref = np.asarray(h, np.float64) @ p["logits_dense"]["kernel"]
    np.testing.assert_allclose(tiny.logits(model, params, batch), ref, rtol=1e-4, atol=1e-4)
