"""NLayerDiscriminator weights from a taming / CompVis PyTorch state dict (`main.{i}.*`)."""
from __future__ import annotations

from typing import Any

from latent_diffusion.convert.common import StateDict, state_dict_of


def discriminator_params_from_torch(state_dict: Any) -> dict:
    """{'params', 'batch_stats'} for `NLayerDiscriminator` from the reference's `main` Sequential.

    Accepts the discriminator's own state dict or one that holds it under a prefix (e.g. an LDM
    autoencoder checkpoint's `loss.discriminator.`). `ndf` is the first conv's width and
    `n_layers` the number of BatchNorm layers; build the module with the same values.
    """
    sd = state_dict_of(state_dict)
    prefix = next((k[: -len("main.0.weight")] for k in sd
                   if k == "main.0.weight" or k.endswith(".main.0.weight")), None)
    if prefix is None:
        raise ValueError("no NLayerDiscriminator weights found: expected keys `main.0.weight`, "
                         f"`main.2.weight`, ... (taming's layout); got keys like {list(sd)[:6]}")
    view = StateDict(sd, prefix + "main.", "NLayerDiscriminator")
    if any(view.has(f"{i}.loc") for i in range(3, 40, 3)):
        raise NotImplementedError("this discriminator uses ActNorm (use_actnorm=True), which is not supported")
    # Sequential indices: conv0, lrelu, then (conv, bn, lrelu) per layer, then the output conv.
    n_layers = 0
    while view.has(f"{3 * n_layers + 3}.running_mean"):
        n_layers += 1
    if n_layers == 0:
        raise ValueError("NLayerDiscriminator state dict has no BatchNorm layers (`main.3.running_mean`)")
    params = {"conv0": view.conv("0")}
    stats = {}
    for n in range(1, n_layers + 1):
        params[f"conv{n}"] = view.conv(f"{3 * n - 1}")
        bn = f"{3 * n}"
        params[f"norm{n}"] = {"scale": view.take(bn + ".weight"), "bias": view.take(bn + ".bias")}
        stats[f"norm{n}"] = {"mean": view.take(bn + ".running_mean"), "var": view.take(bn + ".running_var")}
    params["conv_out"] = view.conv(f"{3 * n_layers + 2}")
    view.finish(ignore=("num_batches_tracked",))
    return {"params": params, "batch_stats": stats}
