"""Logging set-up for the command-line entry points."""
import logging


def setup() -> None:
    """Our progress at INFO; orbax, grain and other libraries only at WARNING."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("latent_diffusion").setLevel(logging.INFO)
