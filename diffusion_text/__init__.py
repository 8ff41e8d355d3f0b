"""diffusion_text: continuous and discrete text diffusion in one JAX core."""

__version__ = "0.1.0"
