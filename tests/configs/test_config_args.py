"""Config-file arguments (`--config=file.py:tiny,f=8`) are parsed strictly."""
import pytest

from configs import autoencoder_kl, common, ldm_f8_laion


@pytest.mark.parametrize("text,want", [("tiny", True), ("tiny=True", True), ("tiny=true", True), ("tiny=1", True),
                                       ("tiny=False", False), ("tiny=false", False), ("tiny=0", False), ("", False)])
def test_boolean_arguments(text, want):
    assert common.parse_arg(text, {"tiny": False}) == {"tiny": want}


def test_false_really_selects_the_full_size_config():
    # ':tiny=False' used to give the string 'False', which is truthy, and so the tiny variant.
    assert ldm_f8_laion.get_config("tiny=False").batch_size == ldm_f8_laion.get_config(None).batch_size == 680
    assert ldm_f8_laion.get_config("tiny=True").batch_size == ldm_f8_laion.get_config("tiny").batch_size


@pytest.mark.parametrize("text,message", [("tiny=yes", "expected a boolean"), ("tiny=Flase", "tiny='Flase'"),
                                          ("f=eight", "of type int"), ("f", "needs a value"),
                                          ("small", "not known")])
def test_bad_arguments_name_the_argument(text, message):
    with pytest.raises(ValueError, match=message):
        common.parse_arg(text, {"tiny": False, "f": 0})


def test_values_are_typed():
    assert common.parse_arg("f=8,tiny", {"f": 0, "tiny": False}) == {"f": 8, "tiny": True}
    assert autoencoder_kl.get_config("f=16").model.z_channels == 16
