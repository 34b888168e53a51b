"""Expert-parallel communication backends behind one `Dispatcher` interface."""

from ep_runtime.comm.base import Dispatcher, available_backends, get_backend, register

__all__ = ["Dispatcher", "available_backends", "get_backend", "register"]
