"""Backbones and heads, built by name through :mod:`ssl_fast.models.registry`."""
import importlib
import importlib.util

from ssl_fast.models.registry import create_backbone, create_model, is_model, list_models, register_model
from ssl_fast.models import vit  # noqa: F401  (registers the ViTs)
from ssl_fast.models.heads import DINOHead
from ssl_fast.models.vit import VisionTransformer

__all__ = ["DINOHead", "VisionTransformer", "create_backbone", "create_model", "is_model", "list_models", "register_model"]

# Model files register themselves on import. Optional ones (written in parallel) are imported
# only when their file exists; an error inside an existing file is raised, never hidden.
for _name in ("cvt", "resnet", "botnet"):
    if importlib.util.find_spec(f"ssl_fast.models.{_name}") is not None:
        importlib.import_module(f"ssl_fast.models.{_name}")
