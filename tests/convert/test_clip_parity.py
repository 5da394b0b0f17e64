"""Parity of our CLIP towers, through our converter, with transformers' PyTorch models (random weights)."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from latent_diffusion import convert  # noqa: E402
from latent_diffusion.convert import clip as clip_convert  # noqa: E402

TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=48,
            bos_token_id=998, pad_token_id=0)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, projection_dim=48)


def _perturb(model, seed=0):
    """Random non-trivial LayerNorm/bias values, so a wrongly mapped norm or bias shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(eos, batch=3, length=77, seed=0):
    """Token ids with BOS, random words, EOS at different positions, then padding with 0."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((batch, length), np.int64)
    for b, n in enumerate((5, 20, length - 2)[:batch]):
        ids[b, 0] = 998
        ids[b, 1:n + 1] = rng.integers(3, 990, size=n)
        ids[b, n + 1] = eos
    return ids


def _scale_tol(ref):
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _text_model(cls, act, eos, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(hidden_act=act, eos_token_id=eos, **TEXT)
    return _perturb(cls(cfg), seed), cfg


@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 999), ("quick_gelu", 999)])
def test_clip_text_parity(act, eos):
    model, cfg = _text_model(transformers.CLIPTextModel, act, eos)
    ids = _ids(eos)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
    module, params = convert.from_transformers(cfg.to_dict(), model.state_dict())
    assert module.eos_token_id == eos and module.hidden_act == act
    hidden, pooled = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    last = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, last, atol=_scale_tol(last), rtol=0)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=_scale_tol(last), rtol=0)

    # SD v2: the penultimate layer's output with the final LayerNorm applied.
    penult = model.final_layer_norm(ref.hidden_states[-2]).detach().numpy()
    h2, pooled2 = module.clone(output_layer=-2).apply({"params": params}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(h2, penult, atol=_scale_tol(penult), rtol=0)
    np.testing.assert_allclose(pooled2, pooled, atol=1e-6, rtol=0)  # pooled stays the last layer's
    # SDXL: the penultimate layer's output without the final LayerNorm.
    raw = ref.hidden_states[-2].numpy()
    h3, _ = module.clone(output_layer=-2, output_final_norm=False).apply(
        {"params": params}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(h3, raw, atol=_scale_tol(raw), rtol=0)


@pytest.mark.parametrize("eos", [2, 500])
def test_eos_rules(eos):
    """Ids where the legacy rule (argmax id, eos_token_id == 2) and the first-EOS rule disagree."""
    ids = _ids(999 if eos == 2 else eos)
    ids[:, 1] = 2  # a token 2 early on: the first-EOS rule would wrongly pick it under a legacy config
    legacy, first = np.argmax(ids, -1), np.argmax(ids == eos, -1)
    assert (legacy != first).all()
    model, cfg = _text_model(transformers.CLIPTextModel, "quick_gelu", eos)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).pooler_output.numpy()
    module, params = convert.from_transformers(cfg.to_dict(), model.state_dict())
    _, pooled = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(pooled, ref, atol=_scale_tol(ref), rtol=0)


def test_clip_text_with_projection_and_padding_mask():
    model, cfg = _text_model(transformers.CLIPTextModelWithProjection, "quick_gelu", 999)
    ids = _ids(999)
    mask = (np.arange(77)[None] <= np.argmax(ids == 999, -1)[:, None]).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    config = dict(cfg.to_dict(), architectures=["CLIPTextModelWithProjection"])
    module, params = convert.from_transformers(config, model.state_dict())
    hidden, embeds = module.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    # Padded query rows see only padded keys in transformers' mask handling; compare real tokens.
    real = mask.astype(bool)
    last = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden)[real], last[real], atol=_scale_tol(last), rtol=0)
    np.testing.assert_allclose(embeds, ref.text_embeds.numpy(), atol=_scale_tol(ref.text_embeds.numpy()), rtol=0)
    assert embeds.shape == (3, TEXT["projection_dim"])


@pytest.mark.parametrize("cls", ["CLIPVisionModel", "CLIPVisionModelWithProjection"])
def test_clip_vision_parity(cls):
    torch.manual_seed(0)
    cfg = transformers.CLIPVisionConfig(**VISION)
    model = _perturb(getattr(transformers, cls)(cfg))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixels)
    config = dict(cfg.to_dict(), architectures=[cls])
    module, params = convert.from_transformers(config, model.state_dict())
    hidden, pooled = module.apply({"params": params}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    last = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, last, atol=_scale_tol(last), rtol=0)
    want = ref.image_embeds.numpy() if cls.endswith("Projection") else ref.pooler_output.numpy()
    np.testing.assert_allclose(pooled, want, atol=_scale_tol(want), rtol=0)


def test_full_clip_model_towers_and_legacy_prefix():
    """A CLIPModel checkpoint and config give both towers; the joint similarity matches."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=dict(TEXT, eos_token_id=999),
                                  vision_config=VISION, projection_dim=48)
    model = _perturb(transformers.CLIPModel(cfg))
    sd = model.state_dict()
    assert any(k.startswith("text_model.") for k in sd)
    ids = _ids(999)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=pixels)
    tm, tp = clip_convert.from_transformers("CLIPTextModelWithProjection", cfg.to_dict(), sd)
    vm, vp = clip_convert.from_transformers("CLIPVisionModelWithProjection", cfg.to_dict(), sd)
    _, t = tm.apply({"params": tp}, jnp.asarray(ids, jnp.int32))
    _, v = vm.apply({"params": vp}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)))
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    np.testing.assert_allclose(t, out.text_embeds.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(v, out.image_embeds.numpy(), atol=1e-5, rtol=0)


def test_compvis_sd1_text_encoder():
    model, cfg = _text_model(transformers.CLIPTextModel, "quick_gelu", 999)
    prefix = "cond_stage_model.transformer."
    sd = {prefix + "text_model." + k: v for k, v in model.state_dict().items()}
    sd[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.diffusion_model.foo.weight"] = torch.zeros(1)  # other parts of the checkpoint are not ours
    module, params = clip_convert.clip_text_from_compvis(sd, heads=4)
    ids = _ids(999)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    hidden, _ = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(hidden, ref, atol=_scale_tol(ref), rtol=0)
    # A stray key under the prefix is reported, not silently dropped.
    sd[prefix + "text_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key"):
        clip_convert.clip_text_from_compvis(sd, heads=4)


def _to_openclip(model, proj):
    """The same weights in OpenCLIP's layout (as SD v2 checkpoints store them under cond_stage_model.model.)."""
    sd = {k: v for k, v in model.state_dict().items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"], "ln_final.bias": sd["final_layer_norm.bias"],
           "text_projection": proj, "logit_scale": torch.tensor(4.6)}
    for i in range(TEXT["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        out[dst + "attn.in_proj_weight"] = torch.cat([sd[src + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([sd[src + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[dst + a + ".weight"], out[dst + a + ".bias"] = sd[src + b + ".weight"], sd[src + b + ".bias"]
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def test_compvis_sd2_openclip_text_encoder():
    model, cfg = _text_model(transformers.CLIPTextModel, "gelu", 999)
    proj = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    module, params = clip_convert.openclip_text_from_compvis(_to_openclip(model, proj), heads=4)
    assert module.output_layer == -2 and module.hidden_act == "gelu"
    ids = _ids(999)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), output_hidden_states=True)
        penult = model.final_layer_norm(ref.hidden_states[-2]).numpy()
        embeds = (ref.pooler_output @ proj).numpy()
    hidden, pooled = module.apply({"params": params}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(hidden, penult, atol=_scale_tol(penult), rtol=0)
    np.testing.assert_allclose(pooled, embeds, atol=_scale_tol(embeds), rtol=0)


def test_mismatched_checkpoint_fails_clearly():
    model, cfg = _text_model(transformers.CLIPTextModel, "quick_gelu", 999)
    bad = dict(cfg.to_dict(), num_hidden_layers=3)
    with pytest.raises(KeyError, match="missing key"):
        convert.from_transformers(bad, model.state_dict())
    bad = dict(cfg.to_dict(), num_hidden_layers=1)
    with pytest.raises(ValueError, match="unexpected key"):
        convert.from_transformers(bad, model.state_dict())
    bad = dict(cfg.to_dict(), hidden_size=32)
    with pytest.raises(ValueError, match="do not match"):
        convert.from_transformers(bad, model.state_dict())


def _xtransformer_reference(sd, ids, heads, prefix="cond_stage_model.transformer."):
    """CompVis' TransformerWrapper(Encoder) forward written out in torch, read straight off its key names.

    x-transformers is not installed; this follows ldm/modules/x_transformer.py with its defaults
    (pre-norm, no q/k/v bias, dim_head 64 scaling, exact GELU, final LayerNorm).
    """
    F = torch.nn.functional
    w = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    x = F.embedding(ids, w["token_emb.weight"]) + w["pos_emb.emb.weight"][: ids.shape[1]][None]
    d = x.shape[-1]
    i = 0
    while f"attn_layers.layers.{i}.0.weight" in w:
        p = lambda n: w[f"attn_layers.layers.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (d,), p("0.weight"), p("0.bias"))
        if i % 2 == 0:
            q, k, v = (h @ p(f"1.to_{n}.weight").T for n in "qkv")
            b, n, inner = q.shape
            q, k, v = (t.reshape(b, n, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
            att = ((q @ k.transpose(-1, -2)) * (inner // heads) ** -0.5).softmax(-1)
            out = (att @ v).transpose(1, 2).reshape(b, n, inner)
            x = x + out @ p("1.to_out.weight").T + p("1.to_out.bias")
        else:
            h = F.gelu(h @ p("1.net.0.0.weight").T + p("1.net.0.0.bias"))
            x = x + h @ p("1.net.2.weight").T + p("1.net.2.bias")
        i += 1
    return F.layer_norm(x, (d,), w["norm.weight"], w["norm.bias"])


def test_compvis_bert_embedder():
    """The LDM paper's text encoder from x-transformers key names (2 blocks of width 32, 2 heads of 64)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    vocab, length, d, inner, prefix = 50, 16, 32, 128, "cond_stage_model.transformer."
    sd = {"token_emb.weight": r(vocab, d), "pos_emb.emb.weight": r(length, d),
          "norm.weight": 1 + r(d), "norm.bias": r(d), "to_logits.weight": r(vocab, d), "to_logits.bias": r(vocab)}
    for layer in range(2):
        a, f = f"attn_layers.layers.{2 * layer}.", f"attn_layers.layers.{2 * layer + 1}."
        for n in (a, f):
            sd[n + "0.weight"], sd[n + "0.bias"] = 1 + r(d), r(d)
        for n in "qkv":
            sd[a + f"1.to_{n}.weight"] = r(inner, d)
        sd[a + "1.to_out.weight"], sd[a + "1.to_out.bias"] = r(d, inner), r(d)
        sd[f + "1.net.0.0.weight"], sd[f + "1.net.0.0.bias"] = r(4 * d, d), r(4 * d)
        sd[f + "1.net.2.weight"], sd[f + "1.net.2.bias"] = r(d, 4 * d), r(d)
    sd = {prefix + k: v for k, v in sd.items()}
    module, params = clip_convert.bert_embedder_from_compvis(sd)
    assert (module.depth, module.heads, module.width, module.vocab_size, module.max_length) == (2, 2, d, vocab, length)
    ids = torch.randint(0, vocab, (2, length), generator=g)
    with torch.no_grad():
        ref = _xtransformer_reference(sd, ids, heads=2).numpy()
    out = module.apply({"params": params}, jnp.asarray(ids.numpy(), jnp.int32))
    np.testing.assert_allclose(out, ref, atol=_scale_tol(ref), rtol=0)
