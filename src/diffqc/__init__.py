"""diffqc: good-only visual quality control with a class-conditional diffusion model."""

__version__ = "0.1.0"

__all__ = ["__version__"]
