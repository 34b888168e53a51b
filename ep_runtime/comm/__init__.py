"""Expert-parallel communication backends behind one `Dispatcher` interface.

Importing this package registers every backend (`torch`, `deepep`); none of them imports an
optional dependency at import time (`deep_ep` is imported when a DeepEP dispatcher is checked or
built), so `import ep_runtime.comm` works on any machine.
"""

from ep_runtime.comm import deepep as _deepep  # noqa: F401 - registers "deepep"
from ep_runtime.comm import torch_backend as _torch_backend  # noqa: F401 - registers "torch"
from ep_runtime.comm.base import (
    Dispatcher,
    available_backends,
    build_dispatchers,
    build_shared_state,
    get_backend,
    register,
)
from ep_runtime.comm.conservation import ConservationError, check_combined_once, check_conservation

__all__ = [
    "ConservationError",
    "Dispatcher",
    "available_backends",
    "build_dispatchers",
    "build_shared_state",
    "check_combined_once",
    "check_conservation",
    "get_backend",
    "register",
]
