"""Weight-only quantized kernels (layers/quantization.py): NF4 / int4 / int8 numerics, DenseGeneral
and Embed reading them (also under nn.scan), the embedding and output projection of a serving
checkpoint, sharding specs, byte counts and Orbax round trips."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import scope as flax_scope
from jax.sharding import PartitionSpec as P

from t5x_like import partitioning
from t5x_like.layers import DenseGeneral
from t5x_like.layers.embeddings import Embed
from t5x_like.layers.quantization import (NF4_LEVELS, WITH_EMBEDDINGS_REGEX, QuantizedArray, dequantize,
                                          dequantize_params, nbytes, quantize, quantize_params,
                                          quantized_logical_axes)
from t5x_like.objectives.loss import CrossEntropyLoss
from t5x_like.models.config import DecoderOnlyConfig
from t5x_like.models.decoder_only import DecoderOnlyModel

is_q = lambda x: isinstance(x, QuantizedArray)  # noqa: E731


def _unpack_np(codes, axis):
    """Independent numpy unpacking: the first value of each pair is the high nibble."""
    codes = np.asarray(codes)
    out = np.stack([codes >> 4, codes & 0xF], axis=axis + 1)
    return out.reshape(codes.shape[:axis] + (2 * codes.shape[axis],) + codes.shape[axis + 1:])


def _nf4_reference(x, block, axis):
    """NF4 in float64 numpy: absmax per block of `block` values along `axis`, nearest level (ties:
    the lower one); returns (codes, dequantized, normalised values)."""
    x = np.asarray(x, np.float64)
    n = x.shape[axis]
    blocks = x.reshape(x.shape[:axis] + (n // block, block) + x.shape[axis + 1:])
    absmax = np.max(np.abs(blocks), axis=axis + 1, keepdims=True)
    xn = blocks / np.where(absmax > 0, absmax, 1.0)
    levels = np.asarray(NF4_LEVELS, np.float64)
    codes = np.argmin(np.abs(xn[..., None] - levels), axis=-1)
    deq = levels[codes] * absmax
    return codes.reshape(x.shape), deq.reshape(x.shape), xn.reshape(x.shape)


def test_int8_per_channel_and_int4_error_bounds():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 20, 64)).astype(np.float32)  # [heads, kv, embed]: two input axes
    q = quantize(x, "int8", in_axes=(0, 1))
    assert q.codes.dtype == jnp.int8 and q.codes.shape == x.shape and q.scale.shape == (1, 1, 64)
    np.testing.assert_allclose(q.scale[0, 0], np.abs(x).max(axis=(0, 1)) / 127, rtol=1e-6)
    err = np.abs(np.asarray(dequantize(q)) - x)
    assert (err <= np.asarray(q.scale) / 2 * (1 + 1e-5) + 1e-7).all(), err.max()

    q4 = quantize(x, "int4", in_axes=(0, 1))  # groups along kv (20 < 128: the whole axis)
    assert q4.codes.dtype == jnp.uint8 and q4.codes.shape == (3, 10, 64) and q4.scale.shape == (3, 1, 64)
    assert q4.block_size == 20
    err4 = np.abs(np.asarray(dequantize(q4)) - x)
    assert (err4 <= np.asarray(q4.scale) / 2 * (1 + 1e-5) + 1e-7).all()
    codes4 = _unpack_np(q4.codes, 1)
    assert codes4.min() >= 1 and codes4.max() <= 15  # symmetric q in [-7, 7] stored as q + 8

    # A stacked [layers, in, out] kernel: each layer gets its own scales.
    w = rng.standard_normal((2, 256, 16)).astype(np.float32) * np.array([1.0, 100.0])[:, None, None]
    qs = quantize(w, "int4", in_axes=(1,))
    assert qs.shape == (256, 16) and qs.full_shape == w.shape and qs.scale.shape == (2, 2, 16)
    for layer in range(2):
        one = quantize(w[layer], "int4")
        np.testing.assert_array_equal(qs.codes[layer], one.codes)
        np.testing.assert_array_equal(qs.scale[layer], one.scale)


def test_an_axis_that_is_not_a_multiple_of_the_block_is_zero_padded():
    """The quickstart model's MLP width 688 = 10.75 blocks of 64: stored as 11 blocks, each value
    quantized exactly as in an array padded with zeros by hand, and the padding never returned."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((688, 8)).astype(np.float32)
    for scheme, rows in (("nf4", 704), ("int4", 768)):  # blocks of 64 and 128
        padded = np.concatenate([x, np.zeros((rows - 688, 8), np.float32)])
        q, ref = quantize(x, scheme), quantize(padded, scheme)
        assert q.shape == (688, 8) and q.codes.shape == (rows // 2, 8)
        np.testing.assert_array_equal(q.codes, ref.codes)
        np.testing.assert_array_equal(q.scale, ref.scale)
        np.testing.assert_array_equal(dequantize(q), np.asarray(dequantize(ref))[:688])
    odd = quantize(rng.standard_normal((5, 3)).astype(np.float32), "nf4")  # shorter than a block: one block
    assert odd.block_size == 6 and dequantize(odd).shape == (5, 3)


@pytest.mark.parametrize("stacked", [False, True])
def test_nf4_matches_float64_reference(stacked):
    rng = np.random.default_rng(1)
    shape = (2, 192, 24) if stacked else (192, 24)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., :64, 0] = 0.0  # an all-zero block dequantizes to zeros
    axis = 1 if stacked else 0
    q = quantize(x, "nf4", in_axes=(axis,))
    assert q.codes.dtype == jnp.uint8 and q.block_size == 64 and q.dtype == "float32"
    assert q.codes.shape == shape[:axis] + (96,) + shape[axis + 1:] and q.scale.shape == shape[:axis] + (3, 24)
    codes = _unpack_np(q.codes, axis)
    ref_codes, ref_deq, xn = _nf4_reference(x, 64, axis)
    # Same codes exactly, except (possibly) values within float32 rounding of a decision threshold.
    mids = (np.asarray(NF4_LEVELS[:-1]) + np.asarray(NF4_LEVELS[1:])) / 2
    near_tie = np.min(np.abs(xn[..., None] - mids), axis=-1) < 1e-6
    assert ((codes == ref_codes) | near_tie).all() and near_tie.sum() <= 2
    deq = np.asarray(dequantize(q))
    np.testing.assert_allclose(deq, ref_deq, rtol=1e-6, atol=1e-7)
    assert (deq[..., :64, 0] == 0).all()
    # Nearest level: the error is at most half the widest gap between levels, times the absmax.
    absmax = np.repeat(np.asarray(q.scale), 64, axis=axis)
    assert (np.abs(deq - x) <= absmax * np.max(np.diff(NF4_LEVELS)) / 2 + 1e-7).all()
    assert dequantize(q, jnp.bfloat16).dtype == jnp.bfloat16


def test_flax_param_shape_checks_a_quantized_kernel():
    """Why DenseGeneral reads a QuantizedArray with `get_variable`: `self.param` compares the
    stored leaves' shapes with the init function's and rejects packed codes."""

    class Plain(nn.Module):
        @nn.compact
        def __call__(self):
            return self.param("kernel", nn.initializers.zeros, (64, 8))

    q = quantize(np.ones((64, 8), np.float32), "nf4")
    with pytest.raises(flax_scope.errors.ScopeParamShapeError):
        Plain().apply({"params": {"kernel": q}})


@pytest.mark.parametrize("scheme", ["nf4", "int8", "int4"])
def test_dense_general_with_quantized_kernel_equals_dequantized(scheme, random_params):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 4, 32)).astype(np.float32)  # [batch, length, heads, kv]
    mod = DenseGeneral(48, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True)
    params = random_params(mod, x)
    qparams = {**params, "kernel": quantize(params["kernel"], scheme, in_axes=(0, 1))}
    dparams = dequantize_params(qparams)
    got = jax.jit(mod.apply)({"params": qparams}, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(mod.apply({"params": dparams}, x)))
    ref = mod.apply({"params": params}, x)
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.15
    bf16 = DenseGeneral(48, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(bf16.apply({"params": qparams}, x), np.float32),
                                  np.asarray(bf16.apply({"params": dparams}, x), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        mod.apply({"params": qparams}, x[..., :16])
    if scheme != "nf4":
        return
    # The backward pass recomputes the kernel from its codes (jax.checkpoint): no full-size residual.
    grad = jax.grad(lambda v: mod.apply({"params": qparams}, v).sum())
    np.testing.assert_array_equal(np.asarray(grad(x)),
                                  np.asarray(jax.grad(lambda v: mod.apply({"params": dparams}, v).sum())(x)))
    _, residuals = jax.vjp(lambda v: mod.apply({"params": qparams}, v), x)
    kernel_size = int(np.prod(params["kernel"].shape))
    assert not [r for r in jax.tree_util.tree_leaves(residuals)
                if jnp.issubdtype(r.dtype, jnp.floating) and r.size == kernel_size]


def _tiny_model(scan_layers: bool, **kw):
    cfg = DecoderOnlyConfig(vocab_size=96, d_model=64, num_heads=2, head_dim=32, mlp_dim=128, num_layers=2,
                            mlp_activations=("silu", "linear"), scan_layers=scan_layers, **kw)
    return DecoderOnlyModel(cfg)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decoder_only_nf4_forward(scan_layers, random_params):
    """NF4 params run the tiny model (scanned: sliced per layer by nn.scan; there, laid out on a
    1-device mesh by `quantized_logical_axes`) exactly as their dequantized values do, close to f32."""
    model = _tiny_model(scan_layers, tie_embeddings=False)
    batch = model.random_batch(2, 8)
    params = random_params(model.module, **model._inputs(batch))
    if scan_layers:  # random_params scales kernels by their first axis, here the stacked one
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x * np.sqrt(x.shape[0] / x.shape[1]) if "layers" in jax.tree_util.keystr(p)
            and jax.tree_util.keystr(p).endswith("['kernel']") else x, params)
    qparams = quantize_params(params, "nf4", min_size=0)
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(qparams, is_leaf=is_q)}
    quantized = {k for k, x in leaves.items() if is_q(x)}
    assert len(quantized) == (7 if scan_layers else 2 * 7) and all(k.endswith("['kernel']") for k in quantized)
    assert not is_q(leaves["['logits_dense']['kernel']"])  # the output projection is excluded by default
    out = next(x for k, x in leaves.items() if "['out']" in k and is_q(x))
    assert out.in_ndim == 2 and out.shape == (2, 32, 64) and out.block_size == 32
    assert out.batch_shape == ((2,) if scan_layers else ())

    forward = jax.jit(lambda p: model.forward(p, batch)[0])
    if scan_layers:
        mesh = partitioning.create_mesh(devices=jax.devices()[:1])
        specs = quantized_logical_axes(model.logical_axes()["params"], qparams)
        placed = jax.device_put(qparams, partitioning.logical_to_sharding(specs, mesh))
        assert placed["decoder"]["layers"]["mlp"]["wo"]["kernel"].codes.sharding.mesh.shape == mesh.shape
        with partitioning.activation_context(mesh):
            logits_q = forward(placed)
    else:
        logits_q = forward(qparams)
    logits_d, logits_f = forward(dequantize_params(qparams)), forward(params)
    np.testing.assert_allclose(np.asarray(logits_q), np.asarray(logits_d), rtol=1e-5, atol=1e-5)
    rel = float(jnp.linalg.norm(logits_q - logits_f) / jnp.linalg.norm(logits_f))
    assert rel < 0.3, rel


def test_quantized_logical_axes_shard_codes_and_scales():
    model = _tiny_model(True)
    params_axes = model.logical_axes()["params"]
    shapes = model.param_shapes()
    for scheme in ("nf4", "int8"):
        abstract = jax.eval_shape(lambda p: quantize_params(p, scheme, min_size=0), shapes)
        specs = quantized_logical_axes(params_axes, abstract)
        wi = specs["decoder"]["layers"]["mlp"]["wi_0"]["kernel"]
        assert wi.codes == P("layers", "embed", "mlp") and wi.scale == P("layers", None, "mlp")
        out = specs["decoder"]["layers"]["self_attention"]["out"]["kernel"]
        assert out.codes == P("layers", "heads", "kv", "embed")
        reduced = ("heads", None) if scheme == "nf4" else (None, None)  # nf4 blocks kv; int8 reduces heads, kv
        assert out.scale == P("layers", *reduced, "embed")
        assert specs["token_embed"]["embedding"] == P("vocab", "embed")

    # The specs split codes and scales over an 8-device mesh too (fsdp on embed, tensor on mlp).
    wo = {"kernel": quantize(np.random.default_rng(5).standard_normal((2, 128, 64)).astype(np.float32), "nf4",
                             in_axes=(1,))}
    wo_specs = quantized_logical_axes({"kernel": P("layers", "mlp", "embed")}, wo)
    mesh8 = partitioning.create_mesh(data=2, fsdp=2, tensor=2)
    placed = jax.device_put(wo, partitioning.logical_to_sharding(wo_specs, mesh8))["kernel"]
    assert placed.codes.sharding.shard_shape(placed.codes.shape) == (2, 32, 32)  # 128 values packed in 64 bytes
    assert placed.scale.sharding.shard_shape(placed.scale.shape) == (2, 2, 32)
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(placed)), np.asarray(dequantize(wo["kernel"])))


def test_quantized_bytes_at_d_model_512():
    cfg = DecoderOnlyConfig(vocab_size=512, d_model=512, num_heads=8, head_dim=64, mlp_dim=1536, num_layers=2,
                            mlp_activations=("relu",))
    shapes = DecoderOnlyModel(cfg).param_shapes()
    kernels = {k: v for k, v in jax.tree_util.tree_leaves_with_path(shapes)
               if jax.tree_util.keystr(k).endswith("['kernel']")}
    f32 = nbytes(list(kernels.values()))
    ratios = {}
    for scheme in ("nf4", "int4", "int8"):
        abstract = jax.eval_shape(lambda p: quantize_params(p, scheme), shapes)
        quantized = [x for x in jax.tree_util.tree_leaves(abstract, is_leaf=is_q) if is_q(x)]
        assert len(quantized) == len(kernels) == 2 * 6
        ratios[scheme] = nbytes(quantized) / f32
    # Real arrays for one layer's MLP kernels have the bytes the abstract shapes promise.
    rng = np.random.default_rng(3)
    layer = {"wi": rng.standard_normal((512, 1536)).astype(np.float32),
             "wo": rng.standard_normal((1536, 512)).astype(np.float32)}
    for scheme in ("nf4", "int4", "int8"):
        real = quantize_params({"mlp": {k: {"kernel": v} for k, v in layer.items()}}, scheme)
        assert abs(nbytes(real) / nbytes(layer) - ratios[scheme]) < 0.01
    print("bytes of quantized / float32 kernels:", {k: round(v, 4) for k, v in ratios.items()})
    assert ratios["nf4"] <= 0.30 and ratios["int4"] <= 0.30 and ratios["int8"] <= 0.30, ratios
    assert abs(ratios["nf4"] - (0.5 + 4 / 64) / 4) < 1e-3  # 4 bits + a float32 per 64 values
    assert abs(ratios["int4"] - (0.5 + 4 / 128) / 4) < 1e-3


def test_orbax_round_trip_keeps_quantized_arrays(tmp_path):
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(4)
    params = {"dense": {"kernel": rng.standard_normal((2, 128, 32)).astype(np.float32),
                        "bias": rng.standard_normal((32,)).astype(np.float32)},
              "out": {"kernel": rng.standard_normal((4, 16, 64)).astype(np.float32)}}
    tree = {"nf4": quantize(params["dense"]["kernel"], "nf4", in_axes=(1,)),
            "int4": quantize(params["out"]["kernel"], "int4", in_axes=(0, 1)),
            "int8": quantize(params["dense"]["kernel"], "int8", in_axes=(1,)),
            "bias": params["dense"]["bias"]}
    path = os.path.join(tmp_path, "ckpt")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)
        ckptr.wait_until_finished()
        restored = ckptr.restore(path, jax.eval_shape(lambda: tree))
    for k in ("nf4", "int4", "int8"):
        assert is_q(restored[k]) and restored[k].scheme == k and restored[k].shape == tree[k].shape
        for a, b in ((restored[k].codes, tree[k].codes), (restored[k].scale, tree[k].scale)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(restored["bias"]), tree["bias"])


def _largest_intermediate(fn, *args) -> int:
    """Elements of the largest value any equation of `fn`'s jaxpr (nested ones included) produces."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)
    return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_embed_reads_a_quantized_table_row_by_row(scheme):
    """An Embed table quantized per vocabulary row (int8: one scale per row; int4 / nf4: per row and
    block along embed): the lookup equals the float lookup of the dequantized table exactly and
    never builds the whole dequantized table; `attend` (the tied output projection) equals the
    dequantized math."""
    rng = np.random.default_rng(6)
    vocab, d = 40, 256
    table = rng.standard_normal((vocab, d)).astype(np.float32)
    q = quantize_params({"embedding": table}, scheme, targets_regex=WITH_EMBEDDINGS_REGEX, min_size=0)["embedding"]
    block, top = {"int8": (d, 127), "int4": (128, 7), "nf4": (64, 1)}[scheme]
    assert q.full_shape == (vocab, d) and q.scale.shape == (vocab, d // block)
    np.testing.assert_allclose(q.scale, np.abs(table.reshape(vocab, d // block, block)).max(-1) / top, rtol=1e-6)
    dq = np.asarray(dequantize(q))
    emb = Embed(vocab, d)
    ids = rng.integers(0, vocab, (3, 5))
    got = jax.jit(emb.apply)({"params": {"embedding": q}}, ids)
    np.testing.assert_array_equal(np.asarray(got), dq[ids])
    np.testing.assert_array_equal(np.asarray(got), np.asarray(emb.apply({"params": {"embedding": dq}}, ids)))
    bf16 = Embed(vocab, d, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(bf16.apply({"params": {"embedding": q}}, ids), np.float32),
                                  np.asarray(bf16.apply({"params": {"embedding": dq}}, ids), np.float32))
    assert _largest_intermediate(lambda p: emb.apply({"params": p}, ids), {"embedding": q}) == ids.size * d

    x = rng.standard_normal((2, 3, d)).astype(np.float32)
    logits = emb.apply({"params": {"embedding": q}}, x, method="attend")
    ref = np.einsum("bld,vd->blv", x.astype(np.float64), dq.astype(np.float64))
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(emb.apply({"params": {"embedding": dq}}, x,
                                                                        method="attend")), rtol=1e-5, atol=1e-5)
    # Its backward pass recomputes the table from the codes (jax.checkpoint): no float copy kept.
    _, residuals = jax.vjp(lambda v: emb.apply({"params": {"embedding": q}}, v, method="attend"), x)
    assert not [r for r in jax.tree_util.tree_leaves(residuals)
                if jnp.issubdtype(r.dtype, jnp.floating) and r.size == vocab * d]
    with pytest.raises(ValueError, match="does not match"):
        Embed(vocab + 1, d).apply({"params": {"embedding": q}}, ids)


@pytest.mark.parametrize("tie, scheme", [(True, "int8"), (False, "int4")])
def test_serving_model_quantizes_embedding_and_output_projection(tie, scheme):
    """`quantize_embeddings` stores the token embedding and the untied `logits_dense` as codes; the
    logits (decoding's path: Embed.attend or DenseGeneral) and the fused loss (output_head,
    dequantized) equal the float model on the dequantized params within 1e-5. QLoRA (the default)
    keeps both float."""
    cfg = DecoderOnlyConfig(vocab_size=512, d_model=128, num_heads=2, head_dim=64, mlp_dim=256, num_layers=1,
                            mlp_activations=("silu", "linear"), tie_embeddings=tie, scale_tied_logits=tie)
    f32, serving = DecoderOnlyModel(cfg), DecoderOnlyModel(cfg, weight_quantization=scheme, quantize_embeddings=True)
    params = f32.init_variables(jax.random.key(7))["params"]
    qparams = serving.quantize_params(params)
    assert is_q(qparams["token_embed"]["embedding"]) and (tie or is_q(qparams["logits_dense"]["kernel"]))
    qlora = DecoderOnlyModel(cfg, weight_quantization=scheme).quantize_params(params)
    assert not is_q(qlora["token_embed"]["embedding"]) and (tie or not is_q(qlora["logits_dense"]["kernel"]))
    assert is_q(qlora["decoder"]["layers_0"]["mlp"]["wi_0"]["kernel"])
    assert not np.array_equal(dequantize(qparams["token_embed"]["embedding"]), params["token_embed"]["embedding"])
    # The restore target is what quantize_params gives.
    same = jax.tree_util.tree_map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), serving.param_shapes(),
                                  jax.eval_shape(lambda: qparams))
    assert all(jax.tree_util.tree_leaves(same))

    batch = serving.random_batch(2, 16)

    @functools.partial(jax.jit, static_argnums=0)
    def outputs(model, p):  # decoding's logits, the fused loss and the head it reads
        return (model.compute_logits({"params": p}, batch), CrossEntropyLoss()(model, p, batch)["nll_sum"],
                model.output_head(p).weight)

    (logits, nll, head), (ref_logits, ref_nll, ref_head) = outputs(serving, qparams), \
        outputs(f32, dequantize_params(qparams))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(nll), float(ref_nll), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(head), np.asarray(ref_head))

    specs = serving.logical_axes()["params"]
    emb = specs["token_embed"]["embedding"]
    assert emb.codes == P("vocab", "embed") and emb.scale == P("vocab", None)
    if not tie:
        out = specs["logits_dense"]["kernel"]
        assert out.codes == P("embed", "vocab") and out.scale == P(None, "vocab")


def test_int8_serving_bytes_where_the_embedding_dominates():
    """Everything quantized, int8 params take at most 30% of float32's bytes (the issue's target);
    with float embeddings they cannot (both vocabulary tables stay 4 bytes a value)."""
    cfg = DecoderOnlyConfig(vocab_size=8192, d_model=256, num_heads=4, head_dim=64, mlp_dim=688, num_layers=2,
                            mlp_activations=("silu", "linear"), tie_embeddings=False)
    f32 = nbytes(DecoderOnlyModel(cfg).param_shapes())
    every = nbytes(DecoderOnlyModel(cfg, weight_quantization="int8", quantize_embeddings=True).param_shapes())
    kernels = nbytes(DecoderOnlyModel(cfg, weight_quantization="int8").param_shapes())
    print(f"int8 bytes / f32: everything {every / f32:.3f}, kernels only {kernels / f32:.3f}")
    assert every / f32 <= 0.30 < kernels / f32
    # 1 byte a value plus a float32 scale per row of 256: (1 + 4 / 256) / 4 of the float bytes.
    assert abs(every / f32 - 0.254) < 0.01
