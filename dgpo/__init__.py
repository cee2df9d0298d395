"""dgpo: direct group preference optimisation for diffusion / flow-matching models."""
__version__ = "0.1.0"
