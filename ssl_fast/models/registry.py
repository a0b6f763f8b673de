"""Model registry: ``@register_model(name)``, ``create_model(name, **kwargs)``, ``list_models()``.

Model files register their constructors with the decorator at import time; the trainer and the
CLI build backbones by name only, so a new model needs no change outside its own file.
"""
from typing import Callable, Dict, List, Optional

from torch import nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: Optional[str] = None) -> Callable:
    """Decorator that registers a model constructor under ``name`` (default: the function's name).

    Args:
        name: registry key, for example ``"vit_small"``. Registering one name twice is an error.

    Returns:
        The decorator; it returns the constructor unchanged.
    """
    if callable(name):  # used bare as @register_model
        fn, name = name, None
        return register_model(None)(fn)

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if not isinstance(key, str) or not key:
            raise ValueError(f"model name must be a non-empty string, got {key!r}")
        if key in _MODELS and _MODELS[key] is not fn:
            raise ValueError(f"model {key!r} is already registered (by {_MODELS[key].__module__}."
                             f"{_MODELS[key].__qualname__})")
        _MODELS[key] = fn
        return fn

    return decorator


def list_models() -> List[str]:
    """Sorted names of every registered model."""
    return sorted(_MODELS)


def is_model(name: str) -> bool:
    """Whether ``name`` is registered."""
    return name in _MODELS


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` passed to its constructor.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models()) or '(none)'}")
    return _MODELS[name](**kwargs)


def create_backbone(name: str, img_size: int, **kwargs) -> nn.Module:
    """``create_model(name, **kwargs)``, built for ``img_size`` when the model takes one input size
    only (``fixed_input_size``, as BoTNet's position tables); other models get no ``img_size``
    (they take any size, and not every constructor accepts it)."""
    model = create_model(name, **kwargs)
    if getattr(model, "fixed_input_size", False):
        model = create_model(name, img_size=img_size, **kwargs)
    return model
