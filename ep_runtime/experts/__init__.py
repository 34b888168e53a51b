"""Local expert compute over each dispatch layout and weights scheme (`torch` and `triton`)."""

from ep_runtime.experts import torch_experts, triton_experts  # noqa: F401 - registers the implementations
from ep_runtime.experts.base import Experts, available_experts, get_experts, register

__all__ = ["Experts", "available_experts", "get_experts", "register"]
