"""Weight-only quantized storage of dense kernels and embedding tables: NF4 (QLoRA), int4 and int8.

A `QuantizedArray` holds a kernel as integer `codes` plus float32 absmax `scale`s and is
dequantized on the fly where the kernel is read (`DenseGeneral`, `Embed`), so frozen base weights
take 4 or 8 bits per value (QLoRA's base model, int8/int4 inference) while the math stays in `dtype`.
Its static `matmul = "int8"` (int8 / int4 only) makes `DenseGeneral` multiply int8-quantized
activations by the codes instead (layers/quantized_matmul.py); the stored arrays are the same.

Layout. A kernel is `batch + in + out` axes: leading batch axes (the `layers` axis of a scanned
stack, kept so that `nn.scan` slices codes and scale per layer), the contracted input axes, then the
output axes. Codes and scale keep the kernel's rank, so each keeps the kernel's logical axis names
(`quantized_logical_axes`):
- `nf4` / `int4`: blocks of `block_size` consecutive values along the last input axis (64 for NF4
  as in QLoRA; 128 for int4, or the whole axis when it is shorter); one float32 scale per block
  (`scale` has that axis divided by the block size); codes are 4-bit, packed two per uint8 byte
  along that axis, the first of each pair in the high nibble (as bitsandbytes packs them).
  NF4 codes index the 16 NormalFloat levels (scale = block absmax); int4 codes are `q + 8` for the
  symmetric q in [-7, 7] (scale = absmax / 7).
- `int8`: per output channel: one scale per output element, reduced over all input axes (kept as
  size-1 axes); codes are int8 in [-127, 127] (scale = absmax / 127), usable as-is by an int8 dot.
An `Embed` table [vocab, embed] (`embedding` leaves, `param_in_axes`) is a stack of vocab rows, each
quantized along embed: vocab is a batch axis and embed the (blocked) input axis, with no output
axis. So int8 keeps one scale per token row (scale [vocab, 1]) and int4 / nf4 one per row and block
of embed values (scale [vocab, embed / block]), and a lookup gathers only the ids' rows of codes
and scales (layers/embeddings.py). The untied output projection `logits_dense` [embed, vocab] is a
kernel like any other: int8 one scale per vocabulary entry, int4 / nf4 blocks along embed.
Double quantization of the scales (QLoRA's 8-bit scales of scales) is not done: scales stay
float32 (0.5 bit per value for NF4 blocks of 64).

Why not qwix: qwix 0.1.8 does publicly expose `qwix.quantize(x, "nf4", tiled_axes=...)` and
`qwix.dequantize`, but it stores 4-bit codes unpacked as `jnp.uint4` arrays (one byte per value on
CPU) which Orbax/TensorStore cannot save, and it is not a dependency; our params must stay a plain
pytree of uint8/int8/float32 arrays for Orbax and logical-axis sharding, so the numerics (~50
lines, the same NF4 levels) live here.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

SCHEMES = ("nf4", "int4", "int8")
# How a layer multiplies by a quantized kernel: "dequantize" (weight-only: the kernel in float, then
# a float matmul; exact) or "int8" (int8 / int4 only: dynamic int8 activations and an integer dot,
# layers/quantized_matmul.py).
MATMULS = ("dequantize", "int8")
DEFAULT_BLOCK_SIZE = {"nf4": 64, "int4": 128}

# The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
# Quantized LLMs", Appendix E), exactly as bitsandbytes uses them (`get_4bit_type("nf4")` in
# bitsandbytes/functional.py and `dDequantizeNF4` in csrc/kernels.cu); qwix uses the same values.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# Decision thresholds between neighbouring levels (bitsandbytes' `dQuantizeNF4` compares with these
# midpoints, strictly greater: a value exactly on one takes the lower level).
NF4_MIDPOINTS = tuple(float(np.float32((a + b) / 2)) for a, b in zip(NF4_LEVELS[:-1], NF4_LEVELS[1:]))


@flax.struct.dataclass
class QuantizedArray:
    """A weight stored as integer codes and float32 absmax scales (see the module docstring).

    `shape` is the dequantized shape of one kernel, without batch axes: codes and scale may carry
    extra leading batch axes (a scanned stack's `layers` axis), which `dequantize` keeps, so that
    slicing them (as `nn.scan` does) still describes a valid array. The leading `in_ndim` axes of
    `shape` are the input (contracted) axes; `dtype` is the dequantized dtype's name. `matmul`
    (`MATMULS`) tells `DenseGeneral` how to multiply by it; static, like the rest of the metadata,
    so a restore target (`model.param_shapes()`) carries it and the checkpoint does not.
    """

    codes: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    scheme: str = flax.struct.field(pytree_node=False)
    block_size: Optional[int] = flax.struct.field(pytree_node=False)  # None: int8 per output channel
    in_ndim: int = flax.struct.field(pytree_node=False, default=1)
    matmul: str = flax.struct.field(pytree_node=False, default="dequantize")

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[:len(self.codes.shape) - len(self.shape)])

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The shape `dequantize` returns: batch axes + `shape`."""
        return self.batch_shape + tuple(self.shape)


def _is_q(x) -> bool:
    return isinstance(x, QuantizedArray)


def _block(n: int, requested: int) -> int:
    """The block size along an axis of `n` values: `requested`, or the whole (even) axis when it is
    shorter. An axis that is not a multiple is zero-padded to one (as bitsandbytes pads its last
    block): e.g. an MLP width of 688 stores 704 codes, 11 blocks of 64."""
    return requested if n >= requested else n + n % 2


def _pack(idx, axis: int):
    """uint8 values < 16 -> two per byte along `axis` (first of each pair in the high nibble)."""
    pairs = idx.reshape(idx.shape[:axis] + (idx.shape[axis] // 2, 2) + idx.shape[axis + 1:])
    hi, lo = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (hi << 4) | lo


def _unpack(codes, axis: int):
    both = jnp.stack([codes >> 4, codes & 0xF], axis=axis + 1)
    return both.reshape(codes.shape[:axis] + (2 * codes.shape[axis],) + codes.shape[axis + 1:])


def quantize(x, scheme: str, block_size: Optional[int] = None, in_axes=(0,),
             matmul: str = "dequantize") -> QuantizedArray:
    """Quantize `x` (axes: batch + `in_axes` + output) with `scheme` ('nf4' | 'int4' | 'int8').

    `in_axes`: the contracted input axes of `x`, consecutive (negative ones count from the end);
    axes before them are batch axes (quantized independently), axes after them output axes.
    `block_size`: values per scale along the last input axis for nf4 (default 64) and int4 (default
    128; the whole axis when shorter); int8 takes none (one scale per output channel). `matmul`:
    see `MATMULS` ("int8" needs int8 or int4). Pure jnp: traceable under jit and `jax.eval_shape`.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")
    ndim = np.ndim(x)
    in_axes = tuple(sorted(int(a) % ndim for a in ((in_axes,) if isinstance(in_axes, int) else in_axes)))
    if not in_axes or in_axes != tuple(range(in_axes[0], in_axes[-1] + 1)):
        raise ValueError(f"in_axes {in_axes} must be consecutive axes of an array of rank {ndim}")
    if scheme == "int8" and block_size is not None:
        raise ValueError("int8 is quantized per output channel; block_size must be None")
    check_matmul(scheme, matmul)
    # One compiled program per (shape, scheme) instead of dozens of eagerly dispatched ops.
    return _quantize(x, scheme, block_size, in_axes).replace(matmul=matmul)


def check_matmul(scheme: str, matmul: str) -> None:
    """ValueError unless `matmul` is one of MATMULS and suits `scheme` (NF4 is dequantize-only)."""
    if matmul not in MATMULS:
        raise ValueError(f"unknown quantized matmul {matmul!r}; use one of {MATMULS}")
    if matmul == "int8" and scheme == "nf4":
        raise ValueError("nf4 codes index non-uniform levels and have no integer dot: int8 activations need "
                         "int8 or int4 weights (nf4 is dequantize-only)")


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x, scheme, block_size, in_axes) -> QuantizedArray:
    x = jnp.asarray(x)
    first, axis = in_axes[0], in_axes[-1]  # axis: the blocked (last input) axis of x
    meta = dict(shape=tuple(x.shape[first:]), dtype=jnp.dtype(x.dtype).name, scheme=scheme, in_ndim=len(in_axes))
    xf = x.astype(jnp.float32)
    if scheme == "int8":
        scale = jnp.max(jnp.abs(xf), axis=in_axes, keepdims=True) / 127.0
        codes = jnp.clip(jnp.round(xf / jnp.where(scale > 0, scale, 1.0)), -127, 127).astype(jnp.int8)
        return QuantizedArray(codes=codes, scale=scale, block_size=None, **meta)
    n = x.shape[axis]
    block = _block(n, block_size or DEFAULT_BLOCK_SIZE[scheme])
    if block % 2:
        raise ValueError(f"4-bit codes are packed in pairs along the blocked axis; block size {block} is odd")
    padded = -(-n // block) * block
    if padded != n:
        xf = jnp.pad(xf, [(0, padded - n) if a == axis else (0, 0) for a in range(xf.ndim)])
    shape = xf.shape
    blocks = xf.reshape(shape[:axis] + (padded // block, block) + shape[axis + 1:])
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    inv = 1.0 / jnp.where(absmax > 0, absmax, 1.0)
    if scheme == "nf4":
        scale = absmax
        # Nearest level: the number of midpoints strictly below the normalised value.
        idx = jnp.searchsorted(jnp.asarray(NF4_MIDPOINTS, jnp.float32), blocks * inv, side="left")
    else:  # int4: symmetric, q in [-7, 7] stored as q + 8
        scale = absmax / 7.0
        idx = jnp.clip(jnp.round(blocks * (7.0 * inv)), -7, 7) + 8
    codes = _pack(idx.astype(jnp.uint8).reshape(shape), axis)
    return QuantizedArray(codes=codes, scale=jnp.squeeze(scale, axis + 1), block_size=block, **meta)


def dequantize(q: QuantizedArray, dtype=None) -> jax.Array:
    """The array `q` stores (batch axes + `q.shape`), in `dtype` (default `q.dtype`); pure jnp."""
    return _dequantize(q, jnp.dtype(q.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q: QuantizedArray, dtype) -> jax.Array:
    if q.scheme == "int8":
        return (q.codes.astype(jnp.float32) * q.scale).astype(dtype)
    axis = len(q.batch_shape) + q.in_ndim - 1
    idx = _unpack(q.codes, axis)
    if q.scheme == "nf4":
        vals = jnp.take(jnp.asarray(NF4_LEVELS, jnp.float32), idx.astype(jnp.int32))
    else:
        vals = idx.astype(jnp.float32) - 8.0
    shape = idx.shape
    padded = shape[axis]
    vals = vals.reshape(shape[:axis] + (padded // q.block_size, q.block_size) + shape[axis + 1:])
    vals = (vals * jnp.expand_dims(q.scale, axis + 1)).reshape(shape)
    return jax.lax.slice_in_dim(vals, 0, q.shape[q.in_ndim - 1], axis=axis).astype(dtype)  # drop the padding


def nbytes(tree) -> int:
    """Bytes of every array leaf of `tree` (codes and scales of QuantizedArrays; works on
    ShapeDtypeStructs too)."""
    return int(sum(np.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def dense_kernel_in_axes(path: str, shape) -> tuple[int, ...]:
    """The input (contracted) axes of the DenseGeneral kernel at `path` ('/'-joined), by this
    repo's conventions: a scanned stack (models/transformer.py) names its layer module `layers` and
    stacks its params on a leading axis; attention's output projection `out` contracts (heads, kv);
    every other DenseGeneral contracts its first axis. Pass another function to `quantize_params`
    for other layouts."""
    parts = path.split("/")
    batch = 1 if "layers" in parts[:-1] else 0
    n_in = 2 if len(parts) >= 2 and parts[-2] == "out" else 1
    if batch + n_in >= len(shape):
        raise ValueError(f"{path}: a kernel of shape {tuple(shape)} has no output axis after {batch} batch "
                         f"and {n_in} input axes; pass in_axes_fn to quantize_params")
    return tuple(range(batch, batch + n_in))


def param_in_axes(path: str, shape) -> tuple[int, ...]:
    """`dense_kernel_in_axes`, and for an `Embed` table (a leaf named `embedding`, [vocab, embed])
    its last axis: each vocab row is quantized on its own (module docstring)."""
    if path.split("/")[-1] == "embedding":
        return (len(shape) - 1,)
    return dense_kernel_in_axes(path, shape)


# What the `quantize` mode stores quantized beside the dense kernels: every `Embed` table (token,
# and learned position tables big enough) and, since it matches `kernel$`, the untied `logits_dense`.
KERNELS_REGEX = r"kernel$"
WITH_EMBEDDINGS_REGEX = r"kernel$|(^|/)embedding$"
OUTPUT_PROJECTION_REGEX = r"(^|/)logits_dense/"


def quantize_params(params, scheme: str, targets_regex: str = KERNELS_REGEX, min_size: int = 4096,
                    block_size: Optional[int] = None, exclude_regex: Optional[str] = OUTPUT_PROJECTION_REGEX,
                    in_axes_fn: Callable[[str, tuple], tuple[int, ...]] = param_in_axes, matmul: str = "dequantize"):
    """`params` with every floating leaf whose '/'-joined path matches `targets_regex` (searched),
    does not match `exclude_regex` and has at least `min_size` values replaced by a
    QuantizedArray; norms, embeddings and biases (and small kernels) stay as they are by default.

    The defaults are QLoRA's: the untied output projection (`logits_dense`) is excluded, as QLoRA /
    Hugging Face keep `lm_head` unquantized, and the embedding tables do not match. A serving
    checkpoint quantizes both too: `targets_regex=WITH_EMBEDDINGS_REGEX, exclude_regex=None`.
    `in_axes_fn(path, shape)` gives each leaf's input axes (see `param_in_axes`); `matmul` is
    stored on every QuantizedArray (`MATMULS`; `Embed` reads tables by dequantizing either way).
    Traceable: `jax.eval_shape(lambda p: quantize_params(p, "nf4"), abstract_params)` gives a
    restore target."""
    check_matmul(scheme, matmul)
    pattern = re.compile(targets_regex)
    exclude = re.compile(exclude_regex) if exclude_regex else None

    def one(path, x):
        name = _path_str(path)
        if _is_q(x) or not pattern.search(name) or (exclude is not None and exclude.search(name)) \
                or np.prod(np.shape(x)) < min_size or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        try:
            return quantize(x, scheme, block_size, in_axes_fn(name, tuple(np.shape(x))), matmul)
        except ValueError as e:
            raise ValueError(f"cannot quantize {name} {tuple(np.shape(x))} as {scheme}: {e}") from e

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_q)


def dequantize_params(params, dtype=None):
    """`params` with every QuantizedArray replaced by its dequantized array."""
    return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if _is_q(x) else x, params, is_leaf=_is_q)


def quantized_logical_axes(params_axes, quantized_params):
    """The logical PartitionSpecs of `quantized_params` (from `quantize_params`), given those of the
    unquantized params (`model.logical_axes()["params"]`).

    Each QuantizedArray becomes a QuantizedArray of PartitionSpecs: codes take the kernel's axes
    (the packed input axis keeps its name: a shard holds the same values as the kernel's shard when
    the mesh axis divides the packed length); scale takes the kernel's axes except where it is
    reduced (the blocked axis, int8's input axes), which are replicated. Other leaves keep their
    spec. `partitioning.logical_to_sharding` turns the result into NamedShardings.
    """
    def one(spec, leaf):
        if not _is_q(leaf):
            return spec
        full = leaf.full_shape
        names = tuple(spec) + (None,) * (len(full) - len(spec))
        scale = tuple(n if s == f else None for n, s, f in zip(names, leaf.scale.shape, full))
        return leaf.replace(codes=PartitionSpec(*names), scale=PartitionSpec(*scale))

    return jax.tree_util.tree_map(one, params_axes, quantized_params, is_leaf=lambda x: isinstance(x, PartitionSpec))
