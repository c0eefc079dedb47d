"""Gin plumbing shared by every mode: file search, overrides, the MODEL macro, writing configs.

Run configs name gin files (searched in the working directory and this repository's `gin/`) and
`--gin.NAME=VALUE` overrides; the model comes from the `MODEL` macro, as in T5X.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tokenize
from typing import Iterable, Sequence

import gin

import t5x_like.models  # noqa: F401  (registers the configurables gin files name)

from t5x_like.errors import UserError

REPO_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


class GinConfigError(UserError):
    """A gin file or binding that cannot be used; the message names it and what to do."""


@gin.configurable
def model_from_macro(model=gin.REQUIRED):
    return model


def resolve_gin_file(name: str) -> str:
    """`name` as given, or relative to the repository's `gin/` folder or root."""
    for candidate in (name, os.path.join(REPO_GIN_DIR, name), os.path.join(os.path.dirname(REPO_GIN_DIR), name)):
        if os.path.isfile(candidate):
            return candidate
    raise GinConfigError(f"gin file {name!r} not found (looked in the working directory and {REPO_GIN_DIR})")


def parse(gin_files: Sequence[str] = (), bindings: Iterable[str] = ()) -> None:
    """Parse files then overrides, replacing any config parsed before."""
    gin.clear_config()
    resolved = [resolve_gin_file(f) for f in gin_files]
    # `include 'models/...'` inside gin files must find our gin/ first: gin's fallback reader
    # treats `models` as a Python package name and crashes on namespace packages of that name.
    if REPO_GIN_DIR not in gin.config._LOCATION_PREFIXES:
        gin.config._LOCATION_PREFIXES.insert(0, REPO_GIN_DIR)
    logging.disable(logging.ERROR)  # gin logs every search-path miss of an include as an error
    try:
        gin.parse_config_files_and_bindings(resolved, list(bindings), finalize_config=False)
    except (ValueError, SyntaxError, OSError, tokenize.TokenError, KeyError, TypeError, ImportError) as e:
        text = e.args[0] if isinstance(e, tokenize.TokenError) else str(e)  # ('EOF in multi-line statement', pos)
        where = " ".join(line.strip() for line in text.strip().splitlines()[1:3])
        msg = (text.strip().splitlines() or [type(e).__name__])[0] + (f" ({where})" if where else "")
        if isinstance(e, (SyntaxError, tokenize.TokenError)) or "Unable to parse" in msg:
            hint = ("check the syntax: NAME = VALUE with strings quoted and brackets closed "
                    "(e.g. --gin.MODEL_DIR=\"'/tmp/run'\")")
        else:
            hint = "check the configurable and parameter names (e.g. `DecoderOnlyConfig.num_layers = 4`)"
        raise GinConfigError(f"bad gin config: {msg}; {hint}") from None
    finally:
        logging.disable(logging.NOTSET)


REQUIRED_MACROS = ("MODEL_DIR", "MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "TRAIN_STEPS", "BATCH_SIZE",
                   "CHECKPOINT_DIR", "INITIAL_CHECKPOINT")


def _declared_macros() -> list[str]:
    """Every macro the parsed config defines (gin keeps `NAME = value` as scope NAME of `gin.macro`)."""
    try:
        return [scope for scope, selector in list(gin.config._CONFIG) if selector == "gin.macro"]
    except (AttributeError, TypeError, ValueError):  # another gin version: the known names only
        return []


def check_required_macros(names: Sequence[str] = REQUIRED_MACROS) -> None:
    """Macros a run file declares `%gin.REQUIRED` must be set; gin itself would pass the marker on.
    Checks `names` and every other macro the parsed files declare."""
    missing = []
    for name in dict.fromkeys([*names, *_declared_macros()]):
        try:
            value = gin.query_parameter(f"%{name}")
        except ValueError:  # not declared by the parsed files: not needed by this run
            continue
        if isinstance(value, gin.config.ConfigurableReference) and "REQUIRED" in repr(value):
            missing.append(name)
    if missing:
        example = " ".join(f"--gin.{n}=..." for n in missing)
        raise GinConfigError(f"missing required gin macro(s) {', '.join(missing)}: set them in a gin file "
                             f"or on the command line ({example})")
    undefined = _undefined_macro_uses()
    if "MODEL" in undefined:
        raise GinConfigError(NO_MODEL)
    if undefined:
        uses = ", ".join(f"%{name} (in {where})" for name, where in undefined.items())
        raise GinConfigError(f"gin macro(s) used but never defined: {uses}; define them in a gin file or on the "
                             f"command line (e.g. --gin.{next(iter(undefined))}=...)")


def _undefined_macro_uses() -> dict[str, str]:
    """Macro name -> a binding that references it, for `%NAME` references no parsed file or
    override defines (gin would only fail when the configurable is called, with a TypeError)."""
    try:
        config = dict(gin.config._CONFIG)
    except (AttributeError, TypeError):  # another gin version: leave it to gin
        return {}
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    found: dict[str, str] = {}

    def visit(value, where):
        if isinstance(value, gin.config.ConfigurableReference):
            scoped = getattr(value, "scoped_selector", "")
            if scoped.endswith("/gin.macro") and scoped[:-len("/gin.macro")] not in defined:
                found.setdefault(scoped[:-len("/gin.macro")], where)
        elif isinstance(value, (list, tuple, set)):
            for v in value:
                visit(v, where)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, where)

    for (scope, selector), params in config.items():
        for param, value in params.items():
            visit(value, f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}.{param}")
    return found


NO_MODEL = "no MODEL defined: add a model gin file, e.g. --gin_file=gin/models/llama_tiny.gin"


def model_from_gin():
    """Build the model the parsed config's MODEL macro describes."""
    try:
        gin.parse_config("model_from_macro.model = %MODEL")
        return model_from_macro()
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0]
        if "MODEL" in msg or "macro" in msg.lower():
            raise GinConfigError(NO_MODEL) from None
        hint = ("; check the types of its gin bindings (numbers unquoted, strings quoted)"
                if isinstance(e, TypeError) else "")
        raise GinConfigError(f"cannot build MODEL from the gin config: {msg}{hint}") from None


def model_gin_text(model, header: str = "") -> str:
    """A gin file that rebuilds `model` (its wrapper class and every config field)."""
    config = model.config
    cfg_name, model_name = type(config).__name__, type(model).__name__
    lines = [f"# {line}" for line in header.splitlines()] + [
        "import t5x_like.models", "",
        f"MODEL = @{model_name}()",
        f"{model_name}.config = @{cfg_name}()",
    ]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):  # e.g. rope_scaling: a dict literal the config converts back
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        lines.append(f"{cfg_name}.{field.name} = {value!r}")
    lora = getattr(model, "lora", None)
    if lora is not None:  # adapters (layers/lora.py) are part of the architecture
        lines.append(f"{model_name}.lora = @LoraConfig()")
        lines.extend(f"LoraConfig.{f.name} = {getattr(lora, f.name)!r}" for f in dataclasses.fields(lora))
    if getattr(model, "weight_quantization", None) is not None:
        lines.append(f"{model_name}.weight_quantization = {model.weight_quantization!r}")
        if getattr(model, "quantize_embeddings", False):
            lines.append(f"{model_name}.quantize_embeddings = True")
        if getattr(model, "quantized_matmul", "dequantize") != "dequantize":
            lines.append(f"{model_name}.quantized_matmul = {model.quantized_matmul!r}")
    return "\n".join(lines) + "\n"
