"""Backbones and heads, built by name through :mod:`ssl_fast.models.registry`."""
import importlib
import importlib.util

from ssl_fast.models.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]

# Model files register themselves on import. Optional ones (written in parallel) are imported
# only when their file exists; an error inside an existing file is raised, never hidden.
for _name in ("vit", "heads", "cvt"):
    if importlib.util.find_spec(f"ssl_fast.models.{_name}") is not None:
        importlib.import_module(f"ssl_fast.models.{_name}")
