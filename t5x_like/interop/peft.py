"""LoRA adapters in Hugging Face `peft`'s format <-> our `lora_a` / `lora_b` leaves (layers/lora.py).

A peft LoRA folder holds `adapter_config.json` (peft_type "LORA", r, lora_alpha, target_modules,
...) and `adapter_model.safetensors` with, per adapted torch Linear,
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. The base model
itself is a separate Hugging Face checkpoint (`interop.hf.load` / `save`).

Kernel <-> module names are not tabled per family: they come from the family's registered
converter (`converter.for_config(config).params_to_hf`), probed with every dense kernel filled with
a distinct constant (which HF weight does it become, and times which factor: T5 export folds the
1/sqrt(head_dim) score scale into `q`), then with a position pattern to check that the HF weight
is factor * kernel.reshape(in, out).T, the layout a LoRA pair maps through as
A_hf = A.reshape(in, r).T and B_hf = factor * B.reshape(r, out).T. A kernel that does not map
this way (fused or permuted weights) raises a `PeftError` naming it. Probes use zero-strided
arrays except for the adapted kernels' layout check, which allocates those kernels once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from typing import TYPE_CHECKING, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from t5x_like.interop import converter, hf
from t5x_like.interop.converter import HFInteropError, stack_layers, unstack_layers
from t5x_like.layers.lora import LORA_A, LORA_B, PRESETS, LoraConfig, LoraModule, join, split_adapters

if TYPE_CHECKING:
    from t5x_like.models import BaseModel

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
_PATTERN_PERIOD = 65521  # layout-probe values 1..65521 are exact in float32


class PeftError(HFInteropError):
    """An adapter folder or adapter tree that cannot be converted; the message names the file, tensor or kernel."""


@dataclasses.dataclass(frozen=True)
class _Kernel:
    path: str                  # our module path, unscanned: decoder/layers_0/self_attention/query
    hf_module: str             # torch module name: model.layers.0.self_attn.q_proj
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    factor: float              # HF weight = factor * kernel.reshape(in, out).T

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)


def _variables_params(variables) -> tuple[dict, bool]:
    """(params tree, whether it came wrapped as {'params': ...})."""
    if isinstance(variables, Mapping) and "params" in variables:
        return variables["params"], True
    return variables, False


def _probe_model(model: BaseModel, config, lora_config: LoraConfig):
    """`model` with this config and adapters (a shallow copy; `model` is unchanged)."""
    probe = copy.copy(model)
    probe.config, probe.lora = config, lora_config
    probe.weight_quantization = None  # float shapes, even for a QLoRA model
    probe.module = LoraModule(model.network_cls(config), lora_config)
    return probe


def _converter(model: BaseModel):
    conv = converter.for_config(model.config)
    if conv is None:
        raise PeftError(f"no Hugging Face architecture matches {type(model.config).__name__} with "
                        f"position_embedding={model.config.position_embedding!r}, so its adapters have no peft "
                        f"module names; supported: {', '.join(hf.supported_architectures())}")
    return conv


class _KernelTable:
    """Every dense kernel of the (unscanned) model and the HF module it maps to, from the converter."""

    def __init__(self, model: BaseModel):
        self.model, self.conv = model, _converter(model)
        self.config = model.config.replace(scan_layers=False)
        shapes = _probe_model(model, self.config, LoraConfig(rank=1, targets="all-linear")).param_shapes()
        flat = traverse_util.flatten_dict(shapes)
        self.base = {k: tuple(v.shape) for k, v in flat.items() if k[-1] not in (LORA_A, LORA_B)}
        # Every adaptable kernel (all DenseGeneral but the output projection), in tree order.
        self.kernels: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for key, a in flat.items():
            if key[-1] == LORA_A:
                kernel = self.base[key[:-1] + ("kernel",)]
                n_in = len(a.shape) - 1
                self.kernels["/".join(key[:-1])] = (kernel[:n_in], kernel[n_in:])
        self.mapped: dict[str, _Kernel] = {}
        self.unmapped: dict[str, str] = {}
        self._identify()
        self.by_module = {k.hf_module: k for k in self.mapped.values()}
        self._verified: set[str] = set()

    def _tree(self, fill) -> dict:
        return traverse_util.unflatten_dict({k: fill(k, s) for k, s in self.base.items()})

    def _to_hf(self, fill) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.conv.params_to_hf(self._tree(fill), self.config).items()}

    def _identify(self) -> None:
        index = {tuple(p.split("/")) + ("kernel",): i for i, p in enumerate(self.kernels)}

        def constant(value_of):
            return lambda k, s: np.broadcast_to(np.float32(value_of(index[k]) if k in index else 0.0), s)
        numbered, ones = self._to_hf(constant(lambda i: i + 1)), self._to_hf(constant(lambda i: 1))
        found: dict[int, list[tuple[str, float]]] = {}
        for name, w in numbered.items():
            w1 = ones.get(name)
            if w.size == 0 or w1 is None or w1.shape != w.shape:
                continue
            v, v1 = float(w.flat[0]), float(w1.flat[0])
            if v == 0 or v1 == 0 or not (np.all(w == w.flat[0]) and np.all(w1 == w1.flat[0])):
                continue
            ratio = v / v1
            i = int(round(ratio)) - 1
            if abs(ratio - (i + 1)) < 1e-3 and 0 <= i < len(self.kernels):
                found.setdefault(i, []).append((name, v1))
        for i, (path, (in_shape, out_shape)) in enumerate(self.kernels.items()):
            hits = found.get(i, [])
            if len(hits) != 1 or not hits[0][0].endswith(".weight"):
                what = "no Hugging Face weight of its own" if not hits else \
                    f"Hugging Face weights {[h[0] for h in hits]}"
                self.unmapped[path] = (f"dense kernel {path} becomes {what} in the {type(self.config).__name__} "
                                       "converter, so it has no peft LoRA module; exclude it from LoraConfig.targets")
                continue
            name, factor = hits[0]
            self.mapped[path] = _Kernel(path, name[:-len(".weight")], in_shape, out_shape, factor)

    def get(self, path: str) -> _Kernel:
        if path in self.unmapped:
            raise PeftError(self.unmapped[path])
        if path not in self.mapped:
            raise PeftError(f"{path} is not a dense kernel of this {type(self.config).__name__} model (kernels: "
                            f"{', '.join(list(self.kernels)[:4])}, ...)")
        return self.mapped[path]

    def verify(self, paths) -> None:
        """Check HF weight == factor * kernel.reshape(in, out).T for these kernels (one probe)."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._verified]
        if not todo:
            return
        kernels = [self.get(p) for p in todo]
        keys = {tuple(k.path.split("/")) + ("kernel",): k for k in kernels}

        def pattern(shape):
            n = math.prod(shape)
            return ((np.arange(n) % _PATTERN_PERIOD) + 1).astype(np.float32).reshape(shape)
        out = self._to_hf(lambda k, s: pattern(s) if k in keys else np.broadcast_to(np.float32(0), s))
        for k in kernels:
            expected = pattern(k.in_shape + k.out_shape).reshape(k.fan_in, k.fan_out).T * np.float32(k.factor)
            got = out[k.hf_module + ".weight"]
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-6, atol=0):
                raise PeftError(f"dense kernel {k.path} is not a plain transposed copy of {k.hf_module}.weight in "
                                "the converter (permuted or reshaped rows), so a LoRA pair cannot be mapped onto it; "
                                "exclude it from LoraConfig.targets")
            self._verified.add(k.path)


def _adapter_paths(adapters: dict) -> dict[str, dict]:
    """Module path -> {'lora_a': ..., 'lora_b': ...} of an (unscanned) adapters tree."""
    out: dict[str, dict] = {}
    for key, v in traverse_util.flatten_dict(adapters).items():
        out.setdefault("/".join(key[:-1]), {})[key[-1]] = v
    return out


def _task_type(hf_config: dict) -> Optional[str]:
    if hf_config.get("is_encoder_decoder"):
        return "SEQ_2_SEQ_LM"
    if any(str(a).endswith("ForCausalLM") for a in hf_config.get("architectures") or ()):
        return "CAUSAL_LM"
    return None


def _target_modules(adapted: list[str], all_modules: list[str]) -> list[str]:
    """peft target_modules: the modules' last names when they select exactly `adapted`, else full names."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in adapted})
    selected = {m for m in all_modules if any(m == s or m.endswith("." + s) for s in suffixes)}
    return suffixes if selected == set(adapted) else sorted(adapted)


def save_adapters(peft_dir: str, model: BaseModel, params, lora_config: LoraConfig,
                  base_model_name_or_path: str = "") -> None:
    """Write `params`' LoRA adapters as peft's adapter_config.json + adapter_model.safetensors, which
    `peft.PeftModel.from_pretrained(<the base model exported with hf.save>, peft_dir)` loads.

    Written to a temporary folder first and moved into place, like `hf.save`.
    """
    params, _ = _variables_params(params)
    _, adapters = split_adapters(params)
    if not adapters:
        raise PeftError("params hold no LoRA adapters (lora_a / lora_b leaves); build the model with "
                        "lora=LoraConfig(...) and initialise or load them first")
    adapters = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), adapters)
    if model.config.scan_layers:
        adapters = unstack_layers(adapters)
    table = _KernelTable(model)
    by_path = _adapter_paths(adapters)
    for path in by_path:
        table.get(path)
    table.verify(by_path)
    r = lora_config.rank
    tensors = {}
    for path, pair in by_path.items():
        k = table.get(path)
        if LORA_A not in pair or LORA_B not in pair:
            raise PeftError(f"{path} holds {sorted(pair)}: an adapter needs both {LORA_A} and {LORA_B}")
        a, b = pair[LORA_A], pair[LORA_B]
        for name, got, want in ((LORA_A, a.shape, k.in_shape + (r,)), (LORA_B, b.shape, (r,) + k.out_shape)):
            if tuple(got) != tuple(want):
                raise PeftError(f"{path}/{name} has shape {tuple(got)} but rank {r} on this model's kernel "
                                f"{k.in_shape + k.out_shape} needs {tuple(want)}; pass the LoraConfig the adapters "
                                "were built with")
        tensors[f"{PREFIX}{k.hf_module}.lora_A.weight"] = np.ascontiguousarray(a.reshape(k.fan_in, r).T)
        tensors[f"{PREFIX}{k.hf_module}.lora_B.weight"] = np.ascontiguousarray(
            b.reshape(r, k.fan_out).T * np.float32(k.factor))
    adapted = [table.get(p).hf_module for p in by_path]
    hf_config = table.conv.config_to_hf(model.config)
    config = {
        "peft_type": "LORA", "task_type": _task_type(hf_config), "r": r, "lora_alpha": lora_config.alpha,
        "lora_dropout": lora_config.dropout,
        "target_modules": _target_modules(adapted, [k.hf_module for k in table.mapped.values()]),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": "gaussian" if lora_config.init == "gaussian" else True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path or None, "revision": None,
    }

    hf.write_config_and_weights(peft_dir, CONFIG_FILE, config, WEIGHTS_FILE, tensors)


def _read_config(peft_dir: str) -> dict:
    file = os.path.join(peft_dir, CONFIG_FILE)
    if not os.path.isdir(peft_dir):
        raise PeftError(f"{peft_dir} is not a directory; pass the folder peft's save_pretrained wrote")
    if not os.path.exists(file):
        raise PeftError(f"no {CONFIG_FILE} in {peft_dir}; pass the folder peft's save_pretrained wrote")
    try:
        with open(file) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PeftError(f"{file} holds a JSON {type(cfg).__name__}, not an object of config fields")
    return cfg


def _lora_config_from_peft(cfg: dict, file: str, targets: str) -> LoraConfig:
    if cfg.get("peft_type") != "LORA":
        raise PeftError(f"{file}: peft_type={cfg.get('peft_type')!r}; only LoRA adapters (\"LORA\") are supported")
    unsupported = [msg for bad, msg in [
        (cfg.get("use_dora"), "use_dora=true (DoRA)"),
        (cfg.get("fan_in_fan_out"), "fan_in_fan_out=true (Conv1D weights)"),
        (cfg.get("bias", "none") != "none", f"bias={cfg.get('bias')!r}"),
        (cfg.get("lora_bias"), "lora_bias=true"),
        (cfg.get("rank_pattern"), "rank_pattern (per-module ranks)"),
        (cfg.get("alpha_pattern"), "alpha_pattern (per-module alphas)"),
        (cfg.get("modules_to_save"), "modules_to_save (fully trained modules)"),
        (cfg.get("layer_replication"), "layer_replication"),
    ] if bad]
    if unsupported:
        raise PeftError(f"{file}: {'; '.join(unsupported)} is not supported by t5x_like's LoRA")
    try:
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError) as e:
        raise PeftError(f"{file}: r / lora_alpha missing or not numbers ({type(e).__name__}: {e})") from None
    if cfg.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): the same scale as ours with alpha * sqrt(r)
        alpha *= math.sqrt(r)
    init = "gaussian" if str(cfg.get("init_lora_weights")).lower() == "gaussian" else "kaiming_uniform"
    return LoraConfig(rank=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=targets, init=init)


def _read_tensors(peft_dir: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    file = os.path.join(peft_dir, WEIGHTS_FILE)
    if not os.path.exists(file):
        hint = (f"it holds only {PICKLE_FILE}, which t5x_like never loads (pickles can run code); re-save with "
                "save_pretrained(dir, safe_serialization=True)" if os.path.exists(os.path.join(peft_dir, PICKLE_FILE))
                else "no adapter weights found")
        raise PeftError(f"no {WEIGHTS_FILE} in {peft_dir}: {hint}")
    try:
        with safe_open(file, framework="flax") as f:  # reads bfloat16 too
            return {k: np.asarray(f.get_tensor(k)).astype(np.float32) for k in f.keys()}
    except SafetensorError as e:
        raise PeftError(f"{file} is not a readable safetensors file ({e}); save it again") from None


def _targets_regex(adapted: set[str], all_paths: list[str], scanned: bool) -> str:
    """A LoraConfig.targets selecting exactly `adapted` among the (unscanned) kernel paths: a preset,
    else one alternative per kernel with any layer number, else (unscanned models) the exact paths."""
    for name, pattern in PRESETS.items():
        if {p for p in all_paths if re.search(pattern, p)} == adapted:
            return name
    alternatives = sorted({re.sub(r"layers_\d+", r"layers(_\\d+)?", re.escape(p)) for p in adapted})
    any_layer = "^(" + "|".join(alternatives) + ")$"
    if scanned or {p for p in all_paths if re.search(any_layer, p)} == adapted:
        return any_layer  # scanned layers share one adapter array: layers without one get zeros
    return "^(" + "|".join(sorted(re.escape(p) for p in adapted)) + ")$"


def load_adapters(peft_dir: str, model: BaseModel, params) -> tuple[dict, LoraConfig]:
    """(params with the folder's adapters as lora_a / lora_b leaves, the LoraConfig they need).

    `model` is the base model (`hf.load` of the checkpoint the adapters were trained on), with or
    without LoRA; `params` its params (or variables). Run the result with the model built with that
    config, e.g. `type(model)(model.config, lora=lora_config)`.
    """
    peft_dir = os.fspath(peft_dir)
    cfg = _read_config(peft_dir)
    file = os.path.join(peft_dir, CONFIG_FILE)
    _lora_config_from_peft(cfg, file, "all-linear")  # check the fields before reading weights
    tensors = _read_tensors(peft_dir)
    source = os.path.join(peft_dir, WEIGHTS_FILE)
    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        m = _KEY.match(key)
        if m is None:
            raise PeftError(f"{source}: tensor {key!r} is not a LoRA weight (base_model.model.<module>.lora_A/B"
                            ".weight); embedding adapters, DoRA magnitudes and saved modules are not supported")
        pairs.setdefault(m.group("module"), {})[m.group("which")] = key
    if not pairs:
        raise PeftError(f"{source} holds no LoRA weights")

    table = _KernelTable(model)
    r = int(cfg["r"])
    adapters: dict[str, dict[str, np.ndarray]] = {}
    for module, keys in sorted(pairs.items()):
        if set(keys) != {"A", "B"}:
            raise PeftError(f"{source}: module {module} has only lora_{''.join(keys)}; an adapter needs lora_A "
                            "and lora_B")
        k = table.by_module.get(module)
        if k is None:
            unmapped = list(table.unmapped)
            also = f" that t5x_like can map (unmapped: {unmapped[:3]})" if unmapped else ""
            raise PeftError(f"{source}: tensor {keys['A']!r} adapts {module}, which is no dense kernel of this "
                            f"{type(model.config).__name__} model{also}; the adapters belong to another architecture")
        a_hf, b_hf = tensors[keys["A"]], tensors[keys["B"]]
        for key, got, want in ((keys["A"], a_hf.shape, (r, k.fan_in)), (keys["B"], b_hf.shape, (k.fan_out, r))):
            if tuple(got) != want:
                raise PeftError(f"{source}: tensor {key!r} has shape {tuple(got)} but the base model's {k.path} "
                                f"(r={r}) needs {want}; the adapters were trained on another base model")
        adapters[k.path] = {LORA_A: a_hf.T.reshape(k.in_shape + (r,)),
                            LORA_B: (b_hf.T / np.float32(k.factor)).reshape((r,) + k.out_shape)}
    table.verify(adapters)

    scanned = bool(model.config.scan_layers)
    lora_config = _lora_config_from_peft(cfg, file, _targets_regex(set(adapters), list(table.kernels), scanned))
    # Every adapter the LoRA model has (unscanned): from the file, or zeros (scanned layers the file skips).
    expected = traverse_util.flatten_dict(_probe_model(model, table.config, lora_config).param_shapes())
    flat = {}
    for key, s in expected.items():
        if key[-1] in (LORA_A, LORA_B):
            path = "/".join(key[:-1])
            flat[key] = adapters[path][key[-1]] if path in adapters else np.zeros(s.shape, np.float32)
    tree = traverse_util.unflatten_dict(flat)
    if scanned:
        tree = stack_layers(tree)

    variables, wrapped = _variables_params(params)
    base, _ = split_adapters(variables)
    dtype = np.dtype(jax.numpy.dtype(model.config.param_dtype))
    joined = join(base, jax.tree_util.tree_map(lambda x: np.asarray(x, dtype), tree))
    want = traverse_util.flatten_dict(_probe_model(model, model.config, lora_config).param_shapes())
    got = {k: tuple(getattr(v, "full_shape", None) or np.shape(v))  # quantized kernels: their float shape
           for k, v in traverse_util.flatten_dict(joined).items()}
    for key in sorted(set(want) | set(got)):
        if key not in got or key not in want or got[key] != tuple(want[key].shape):
            what = ("missing" if key not in got else "has no place in the model" if key not in want else
                    f"has shape {got[key]}, the model expects {tuple(want[key].shape)}")
            raise PeftError(f"params: {'/'.join(key)} {what}; pass the base model's own params")
    if wrapped:
        return {**params, "params": joined}, lora_config
    return joined, lora_config
