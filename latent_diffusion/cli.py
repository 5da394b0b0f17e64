"""Shared start-up of the command-line entry points."""
import logging


def start(distributed: bool) -> None:
    """Join a multi-host job if asked; our progress at INFO, other libraries only at WARNING."""
    import jax
    from absl import logging as absl_logging
    if distributed:
        jax.distributed.initialize()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("latent_diffusion").setLevel(logging.INFO)
