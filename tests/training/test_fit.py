"""compile_for's core (training/fit.py): the LDM train step compiled for a TPU topology with no TPU."""
import libtpu  # noqa: F401  (requirements-test.txt: the TPU compiler; missing, this test fails, not skips)
import pytest


def test_train_step_compiles_for_a_tpu_topology(shapes_data_dir):
    from latent_diffusion.training import fit
    from tests.tiny_ldm import text_ldm_config

    config = text_ldm_config(shapes_data_dir)
    config.mesh.data, config.mesh.fsdp = 2, 2
    chip = fit.chip_of("v5e:2x2")
    devices = fit.topology_devices("v5e:2x2")
    assert len(devices) == 4 and "v5" in devices[0].device_kind.lower()
    assert fit.global_batch_for(6, len(devices)) == 8
    (step,) = fit.compile_ldm(config, devices, chip, batch_size=8)
    assert step.fits and 0 < step.total_bytes < 2 ** 30 and step.argument_bytes > 0
    assert step.alias_bytes > 0  # the donated state is written in place
    # XLA's count for a 32x32 text LDM step is in the hundreds of MFLOP per sample, not zero or absurd.
    per_sample = step.flops * len(devices) / 8
    assert 1e7 < per_sample < 1e11
    assert step.seconds_at(0.4) == pytest.approx(step.flops / (197e12 * 0.4))
    text = step.table(0.4, 8, len(devices))
    assert "fits" in text and "samples/s per chip" in text
    tight = fit.Fit(**dict(step.__dict__, hbm=step.total_bytes - 1))
    assert not tight.fits and "DOES NOT FIT" in tight.table(0.4, 8, 4)
    with pytest.raises(ValueError, match="unknown TPU generation"):
        fit.chip_of("v9x:2x2")
