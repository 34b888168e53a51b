"""ep-runtime: a distributed expert-parallel runtime for Mixture-of-Experts inference."""

__version__ = "0.1.0"
