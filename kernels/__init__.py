"""Triton kernels of the per-rank expert compute (imported as `ep_runtime.kernels`)."""
