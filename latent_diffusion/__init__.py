"""latent_diffusion: latent diffusion models in JAX/Flax."""
