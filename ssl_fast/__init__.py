"""ssl_fast: fused kernels for vision attention and self-supervised learning.

Backends are chosen per call (see :mod:`ssl_fast._backend`); ``python -m ssl_fast.info``
prints what is available here and why not.
"""
from ssl_fast import _ext  # noqa: F401  (loads the compiled operators when present)
from ssl_fast._backend import BACKENDS, BackendUnavailableError, get_backend, set_backend, use_backend
from ssl_fast import ops, nn  # noqa: E402
from ssl_fast.nn.momentum import update_momentum
from ssl_fast.patch import patch  # noqa: E402  (the function; the rule API hangs off it too)

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendUnavailableError", "get_backend", "set_backend", "use_backend",
           "ops", "nn", "patch", "update_momentum", "__version__"]
