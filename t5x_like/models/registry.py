"""Which model class serves which config class, in the spirit of Levanter's model registry.

A family registers itself where it is defined (`@register(MyConfig)` on its model class), so
adding one touches no other module: `model_for_config`, HF import and gin files find it here.
"""

from __future__ import annotations

_MODEL_FOR_CONFIG: dict[type, type] = {}


def register(config_cls: type):
    """Class decorator: the decorated model class serves configs of `config_cls` (and subclasses)."""
    def decorate(model_cls: type) -> type:
        _MODEL_FOR_CONFIG[config_cls] = model_cls
        return model_cls
    return decorate


def model_for_config(config):
    """The registered model for a config's family (the nearest registered base class of its type)."""
    for cls in type(config).__mro__:
        if cls in _MODEL_FOR_CONFIG:
            return _MODEL_FOR_CONFIG[cls](config)
    raise KeyError(f"no model family is registered for {type(config).__name__}; decorate its model class "
                   f"with @t5x_like.models.registry.register({type(config).__name__})")


def registered_families() -> dict[type, type]:
    return dict(_MODEL_FOR_CONFIG)
