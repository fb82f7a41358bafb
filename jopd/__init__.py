"""jopd: Lightning OPD (offline on-policy distillation) in JAX/Flax."""

__version__ = "0.1.0"
