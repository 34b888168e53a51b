"""Launchers: Ray, MPI, and the rank worker (imported as `ep_runtime.launch`)."""
