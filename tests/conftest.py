"""Test set-up: 8 fake CPU devices, so sharding is exercised without an accelerator."""
import os
import tempfile

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many tests compile the same tiny models; a persistent compilation cache (shared with the
# subprocesses they start) turns repeated XLA compiles into cache reads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"latent_diffusion_jax_cache_{os.getuid()}"))

# TensorFlow imported before torchvision (which loads triton) crashes the interpreter; the other
# order is fine, so the PyTorch references are imported first when they are installed.
try:
    import torch  # noqa: E402,F401
    import torchvision  # noqa: E402,F401
except ImportError:
    pass

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """The 'tiny' shapes dataset (32x32, 64 train / 16 test examples), built once per test session."""
    from latent_diffusion.data.shapes import ensure_built
    path = str(tmp_path_factory.mktemp("tfds"))
    ensure_built(path, "tiny")
    return path
