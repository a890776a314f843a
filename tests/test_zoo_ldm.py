"""LDM zoo entries at full size: CompVis <-> diffusers conversion, the loaders, quantized sampling.

The CompVis-layout state dicts are generated here from the yaml hyper-parameters, following the structure of
``openaimodel.UNetModel`` and ``model.py``'s Encoder / Decoder (key names and shapes), with random values; they
are never produced by converting a diffusers model. The semantic checks recompute the original modules'
formulas (``QKVAttentionLegacy``, ``ResBlock``, ``timestep_embedding``, ``decode_first_stage``) from those
original tensors and compare them with the converted diffusers modules.

Each architecture's random model is built once per module (a few hundred million parameters each).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import modiff
from bench.errors import BenchError
from bench.zoo import MODELS, ldm, load_model
from modiff import ModiffConfig
from modiff.samplers import SamplerConfig, sample

TRIPPED: list[str] = []


def _tripwire(*args):  # would record that a pickled object's code ran while loading a checkpoint
    TRIPPED.append("ran")


class LightningCallbackStandIn:
    """Pickled into the fake model.ckpt like Lightning's callbacks; its reconstruction must never run."""

    def __reduce__(self):
        return (_tripwire, ("callback",))


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the original (CompVis) layout, from the yaml hyper-parameters ----

def _conv(shapes, name, cin, cout, kernel, dims=2):
    shapes[f"{name}.weight"] = (cout, cin, *(kernel,) * dims)
    shapes[f"{name}.bias"] = (cout,)


def _vector(shapes, name, n, bias=True):
    shapes[f"{name}.weight"] = (n,)
    if bias:
        shapes[f"{name}.bias"] = (n,)


def openai_heads(p: dict, channels: int) -> int:
    return p["num_heads"] if p.get("num_head_channels", -1) == -1 else channels // p["num_head_channels"]


def openai_unet_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of openaimodel.UNetModel(**p) (use_spatial_transformer off, legacy=True)."""
    mc, emb = p["model_channels"], 4 * p["model_channels"]
    mult, nrb, attn = p["channel_mult"], p["num_res_blocks"], p["attention_resolutions"]
    updown, scale_shift = p.get("resblock_updown", False), p.get("use_scale_shift_norm", False)
    s: dict[str, tuple[int, ...]] = {}

    def resblock(name, cin, cout):
        _vector(s, f"{name}.in_layers.0", cin)  # GroupNorm32
        _conv(s, f"{name}.in_layers.2", cin, cout, 3)
        s[f"{name}.emb_layers.1.weight"] = (2 * cout if scale_shift else cout, emb)
        s[f"{name}.emb_layers.1.bias"] = (2 * cout if scale_shift else cout,)
        _vector(s, f"{name}.out_layers.0", cout)
        _conv(s, f"{name}.out_layers.3", cout, cout, 3)
        if cin != cout:
            _conv(s, f"{name}.skip_connection", cin, cout, 1)

    def attention(name, ch):
        _vector(s, f"{name}.norm", ch)
        _conv(s, f"{name}.qkv", ch, 3 * ch, 1, dims=1)
        _conv(s, f"{name}.proj_out", ch, ch, 1, dims=1)

    s["time_embed.0.weight"], s["time_embed.0.bias"] = (emb, mc), (emb,)
    s["time_embed.2.weight"], s["time_embed.2.bias"] = (emb, emb), (emb,)
    _conv(s, "input_blocks.0.0", p["in_channels"], mc, 3)
    skips, ch, ds, index = [mc], mc, 1, 1
    for level, m in enumerate(mult):
        for _ in range(nrb):
            resblock(f"input_blocks.{index}.0", ch, m * mc)
            ch = m * mc
            if ds in attn:
                attention(f"input_blocks.{index}.1", ch)
            skips.append(ch)
            index += 1
        if level != len(mult) - 1:
            if updown:
                resblock(f"input_blocks.{index}.0", ch, ch)
            else:
                _conv(s, f"input_blocks.{index}.0.op", ch, ch, 3)
            skips.append(ch)
            index += 1
            ds *= 2
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    index = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(nrb + 1):
            resblock(f"output_blocks.{index}.0", ch + skips.pop(), m * mc)
            ch, layer = m * mc, 1
            if ds in attn:
                attention(f"output_blocks.{index}.1", ch)
                layer = 2
            if level and i == nrb:
                if updown:
                    resblock(f"output_blocks.{index}.{layer}", ch, ch)
                else:
                    _conv(s, f"output_blocks.{index}.{layer}.conv", ch, ch, 3)
                ds //= 2
            index += 1
    _vector(s, "out.0", ch)
    _conv(s, "out.2", mc, p["out_channels"], 3)
    return s


def ldm_autoencoder_shapes(y: dict, vq: bool) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of autoencoder.AutoencoderKL / VQModel(Interface) with model.py's coders."""
    d = y["ddconfig"]
    ch, mult, nrb, z = d["ch"], d["ch_mult"], d["num_res_blocks"], d["z_channels"]
    s: dict[str, tuple[int, ...]] = {}

    def resnet(name, cin, cout):
        _vector(s, f"{name}.norm1", cin)
        _conv(s, f"{name}.conv1", cin, cout, 3)
        _vector(s, f"{name}.norm2", cout)
        _conv(s, f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            _conv(s, f"{name}.nin_shortcut", cin, cout, 1)

    def mid(side, c):
        resnet(f"{side}.mid.block_1", c, c)
        _vector(s, f"{side}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            _conv(s, f"{side}.mid.attn_1.{part}", c, c, 1)
        resnet(f"{side}.mid.block_2", c, c)

    _conv(s, "encoder.conv_in", d["in_channels"], ch, 3)
    block_in = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * m)
            block_in = ch * m
        if i != len(mult) - 1:
            _conv(s, f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    _vector(s, "encoder.norm_out", block_in)
    _conv(s, "encoder.conv_out", block_in, 2 * z if d["double_z"] else z, 3)
    block_in = ch * mult[-1]
    _conv(s, "decoder.conv_in", z, block_in, 3)
    mid("decoder", block_in)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
        if i != 0:
            _conv(s, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    _vector(s, "decoder.norm_out", block_in)
    _conv(s, "decoder.conv_out", block_in, d["out_ch"], 3)
    e = y["embed_dim"]
    if vq:
        _conv(s, "quant_conv", z, e, 1)
        _conv(s, "post_quant_conv", e, z, 1)
        s["quantize.embedding.weight"] = (y["n_embed"], e)
    else:
        _conv(s, "quant_conv", 2 * z, 2 * e, 1)
        _conv(s, "post_quant_conv", e, z, 1)
    return s


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random tensors at sensible scales (weights ~ 1/sqrt(fan-in), norm gains ~ 1) so activations stay finite."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if len(shape) > 1:
            t /= math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):  # GroupNorm gain
            t = 1.0 + 0.1 * t
        else:
            t *= 0.1
        out[key] = t
    return out


# ---- per-architecture fixtures (one architecture alive at a time) ----

@pytest.fixture(scope="module", params=["church", "bedroom"])
def spec(request) -> ldm.LDMSpec:
    return ldm.SPECS[request.param]


@pytest.fixture(scope="module")
def original(spec):
    """Synthetic CompVis part state dicts (prefixes removed)."""
    vq = spec.autoencoder_class == "VQModel"
    return {"unet": random_state(openai_unet_shapes(spec.unet_yaml), seed=1),
            "autoencoder": random_state(ldm_autoencoder_shapes(spec.autoencoder_yaml, vq), seed=2)}


SCALE_FACTOR = {"church": 0.2345, "bedroom": None}  # church: scale_by_std buffer; bedroom: none saved


@pytest.fixture(scope="module")
def compvis_ckpt(spec, original, tmp_path_factory):
    """A Lightning-style model.ckpt in the original layout, with the extra entries LatentDiffusion saves."""
    folder = tmp_path_factory.mktemp(f"compvis-{spec.key}")
    state = {ldm.UNET_PREFIX + k: v for k, v in original["unet"].items()}
    state.update({ldm.AUTOENCODER_PREFIX + k: v for k, v in original["autoencoder"].items()})
    betas = ldm.schedule(spec).betas
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int)
    state["model_ema.diffusion_modelout2bias"] = torch.zeros(spec.unet_yaml["out_channels"])
    state[ldm.AUTOENCODER_PREFIX + "loss.logvar"] = torch.zeros(())  # a first stage's training loss
    if SCALE_FACTOR[spec.key] is not None:
        state["scale_factor"] = torch.tensor(SCALE_FACTOR[spec.key])
    path = folder / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 7, "callbacks": {"ModelCheckpoint": LightningCallbackStandIn()}},
               path)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def zoo(spec, compvis_ckpt):
    """The model loaded through the CompVis path: churches from the file, bedrooms from its folder."""
    return load_model(spec.name, compvis_ckpt if spec.key == "church" else compvis_ckpt.parent)


def _meta_model(cls_name: str, kwargs: dict):
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, cls_name)(**copy.deepcopy(kwargs))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


# ---- configs ----

@pytest.mark.parametrize("which", ["church", "bedroom"])
def test_diffusers_configs_follow_the_compvis_yaml(which):
    s = ldm.SPECS[which]
    p, d = s.unet_yaml, s.autoencoder_yaml["ddconfig"]
    assert s.unet["block_out_channels"] == [p["model_channels"] * m for m in p["channel_mult"]]
    assert s.unet["layers_per_block"] == p["num_res_blocks"]
    has_attention = [2 ** level in p["attention_resolutions"] for level in range(len(p["channel_mult"]))]
    assert ["Attn" in t for t in s.unet["down_block_types"]] == has_attention
    assert ["Attn" in t for t in s.unet["up_block_types"]] == has_attention[::-1]
    assert (s.unet["resnet_time_scale_shift"] == "scale_shift") == p.get("use_scale_shift_norm", False)
    assert (s.unet["downsample_type"] == "resnet") == p.get("resblock_updown", False)
    assert s.latent_shape == (p["in_channels"], p["image_size"], p["image_size"]) == (
        s.unet["in_channels"], s.unet["sample_size"], s.unet["sample_size"])
    assert s.autoencoder["block_out_channels"] == [d["ch"] * m for m in d["ch_mult"]]
    assert s.autoencoder["latent_channels"] == d["z_channels"] == s.unet["in_channels"]
    assert 2 ** (len(d["ch_mult"]) - 1) * p["image_size"] == d["resolution"] == 256
    betas = ldm.schedule(s).betas
    assert betas.dtype == torch.float64 and betas.numel() == 1000
    assert math.isclose(float(betas[0]), s.linear_start) and math.isclose(float(betas[-1]), s.linear_end)
    assert torch.allclose(betas.sqrt().diff(), betas.sqrt().diff()[:1].expand(999), rtol=1e-9)  # linear in sqrt
    assert s.default_steps == {"church": 200, "bedroom": 500}[which]


# ---- conversion ----

def test_compvis_state_dict_converts_strictly_and_round_trips_exactly(spec, original):
    for part, (cls_name, kwargs) in {"unet": ("UNet2DModel", spec.unet),
                                     "autoencoder": (spec.autoencoder_class, spec.autoencoder)}.items():
        which = f"{spec.key}-{part}"
        converted = ldm.original_to_diffusers(original[part], which)
        model = _meta_model(cls_name, kwargs)
        model.load_state_dict(converted, strict=True, assign=True)  # every key maps, every shape matches
        assert not any(p.is_meta for p in model.parameters())
        back = ldm.diffusers_to_original(converted, which)
        _assert_same(back, original[part])
        _assert_same(ldm.original_to_diffusers(back, which), converted)


def test_vae_conversion_agrees_with_diffusers_single_file_converter(spec, original):
    """An independent mapping of the same tensors: diffusers' own LDM VAE converter (it skips the VQ codebook)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    prefixed = {ldm.AUTOENCODER_PREFIX + k: v for k, v in original["autoencoder"].items()}
    theirs = convert_ldm_vae_checkpoint(prefixed, spec.autoencoder)
    ours = ldm.original_to_diffusers(original["autoencoder"], f"{spec.key}-autoencoder")
    ours.pop("quantize.embedding.weight", None)
    _assert_same(ours, theirs)


def test_converters_report_missing_unknown_and_misshapen_tensors(spec, original):
    which = f"{spec.key}-unet"
    broken = dict(original["unet"])
    broken.pop("middle_block.1.qkv.weight")
    broken["input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(BenchError, match=r"missing middle_block\.1\.qkv\.weight; unexpected input_blocks\.99") as e:
        ldm.original_to_diffusers(broken, which)
    assert "\n" not in str(e.value)
    misshapen = dict(original["unet"])
    misshapen["out.2.weight"] = misshapen["out.2.weight"][:1]
    with pytest.raises(BenchError, match=r"wrong shape: out\.2\.weight"):
        ldm.original_to_diffusers(misshapen, which)
    converted = ldm.original_to_diffusers(original["unet"], which)
    converted.pop("conv_out.bias")
    with pytest.raises(BenchError, match=r"missing conv_out\.bias"):
        ldm.diffusers_to_original(converted, which)
    with pytest.raises(BenchError, match="unknown LDM part"):
        ldm.original_to_diffusers(original["unet"], "church-vae")


# ---- semantics of the converted modules, recomputed from the original tensors ----

def _legacy_attention(x, sd, prefix, heads, new_order=False):
    """openaimodel AttentionBlock._forward with QKVAttentionLegacy (or QKVAttention), in float64."""
    w = {k[len(prefix) + 1:]: v.double() for k, v in sd.items() if k.startswith(prefix + ".")}
    b, c, *spatial = x.shape
    x = x.double().reshape(b, c, -1)
    h = F.group_norm(x, 32, w["norm.weight"], w["norm.bias"], eps=1e-5)
    qkv = F.conv1d(h, w["qkv.weight"], w["qkv.bias"])
    ch, length = c // heads, x.shape[-1]
    if new_order:  # QKVAttention: q, k, v first, then heads
        q, k, v = (t.reshape(b * heads, ch, length) for t in qkv.chunk(3, dim=1))
    else:  # QKVAttentionLegacy: heads first, each holding its own q, k, v rows
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, length)
    return (x + F.conv1d(a, w["proj_out.weight"], w["proj_out.bias"])).reshape(b, c, *spatial)


ATTENTIONS = {  # original module -> converted module (one below the mid block, with several heads, and the mid one)
    "church": [("input_blocks.4.1", "down_blocks.1.attentions.0"), ("middle_block.1", "mid_block.attentions.0")],
    "bedroom": [("input_blocks.4.1", "down_blocks.1.attentions.0"), ("middle_block.1", "mid_block.attentions.0")],
}


def test_converted_attention_matches_the_original_legacy_qkv_attention(spec, original, zoo):
    torch.manual_seed(0)
    for old, new in ATTENTIONS[spec.key]:
        module = zoo.unet.get_submodule(new)
        channels = module.inner_dim
        heads = openai_heads(spec.unet_yaml, channels)
        assert heads > 1 and module.heads == heads
        x = torch.randn(2, channels, 4, 3)
        with torch.no_grad():
            ours = module(x).double()
        want = _legacy_attention(x, original["unet"], old, heads)
        assert torch.allclose(ours, want, atol=2e-5, rtol=1e-4), (new, (ours - want).abs().max())
        # a wrong row order or head count gives clearly different numbers, so the check above has teeth
        for wrong in (_legacy_attention(x, original["unet"], old, heads, new_order=True),
                      _legacy_attention(x, original["unet"], old, heads * 2)):
            assert (ours - wrong).abs().max() > 1e-2


def test_every_attention_has_the_original_head_count(spec, zoo):
    from diffusers.models.attention_processor import Attention

    attentions = [m for m in zoo.unet.modules() if isinstance(m, Attention)]
    down = sum("Attn" in t for t in spec.unet["down_block_types"]) * spec.unet["layers_per_block"]
    up = sum("Attn" in t for t in spec.unet["up_block_types"]) * (spec.unet["layers_per_block"] + 1)
    assert len(attentions) == down + 1 + up
    for m in attentions:
        assert m.heads == openai_heads(spec.unet_yaml, m.inner_dim)
        assert math.isclose(m.scale, (m.inner_dim // m.heads) ** -0.5)
    if spec.key == "church":
        assert {m.heads for m in attentions} == {8} and {m.inner_dim // 8 for m in attentions} == {24, 48, 96}


def _original_resblock(x, emb, sd, prefix, scale_shift, resample=None):
    """openaimodel ResBlock._forward (with its Down/Upsample(use_conv=False) for resblock_updown)."""
    w = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    h = F.silu(F.group_norm(x, 32, w["in_layers.0.weight"], w["in_layers.0.bias"], eps=1e-5))
    if resample == "down":
        h, x = F.avg_pool2d(h, 2, 2), F.avg_pool2d(x, 2, 2)
    elif resample == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    h = F.conv2d(h, w["in_layers.2.weight"], w["in_layers.2.bias"], padding=1)
    e = F.linear(F.silu(emb), w["emb_layers.1.weight"], w["emb_layers.1.bias"])[..., None, None]
    if scale_shift:
        scale, shift = e.chunk(2, dim=1)
        h = F.group_norm(h, 32, w["out_layers.0.weight"], w["out_layers.0.bias"], eps=1e-5) * (1 + scale) + shift
    else:
        h = F.group_norm(h + e, 32, w["out_layers.0.weight"], w["out_layers.0.bias"], eps=1e-5)
    h = F.conv2d(F.silu(h), w["out_layers.3.weight"], w["out_layers.3.bias"], padding=1)
    if "skip_connection.weight" in w:
        x = F.conv2d(x, w["skip_connection.weight"], w["skip_connection.bias"])
    return x + h


def test_resblocks_and_timestep_embedding_match_the_original_formulas(spec, original, zoo):
    torch.manual_seed(0)
    p = spec.unet_yaml
    t = torch.tensor([0, 17, 999])
    half = p["model_channels"] // 2
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    assert torch.allclose(zoo.unet.time_proj(t), torch.cat([torch.cos(args), torch.sin(args)], dim=-1), atol=1e-6)
    emb = torch.randn(2, 4 * p["model_channels"])
    blocks = [("input_blocks.4.0", "down_blocks.1.resnets.0", None)]  # widens, so it has a skip conv
    if p.get("resblock_updown"):  # the level-0 downsampler and the deepest level's upsampler
        blocks += [("input_blocks.3.0", "down_blocks.0.downsamplers.0", "down"),
                   ("output_blocks.2.1", "up_blocks.0.upsamplers.0", "up")]
    for old, new, resample in blocks:
        module = zoo.unet.get_submodule(new)
        x = torch.randn(2, module.in_channels, 4, 4)
        with torch.no_grad():
            ours = module(x, emb)
        want = _original_resblock(x, emb, original["unet"], old, p.get("use_scale_shift_norm", False), resample)
        assert torch.allclose(ours, want, atol=1e-4, rtol=1e-4), new


def openai_unet_forward(p: dict, sd: dict, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """UNetModel.forward of openaimodel, walked from the yaml hyper-parameters over the original tensors."""
    mult, nrb, attention_at = p["channel_mult"], p["num_res_blocks"], p["attention_resolutions"]
    scale_shift, updown = p.get("use_scale_shift_norm", False), p.get("resblock_updown", False)
    half = p["model_channels"] // 2
    args = t[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    emb = F.linear(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), sd["time_embed.0.weight"],
                   sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])

    def res(h, name, resample=None):
        return _original_resblock(h, emb, sd, name, scale_shift, resample)

    def attend(h, name):
        return _legacy_attention(h, sd, name, openai_heads(p, h.shape[1])).float()

    def conv(h, name, **kwargs):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], **kwargs)

    h = conv(x, "input_blocks.0.0", padding=1)
    skips, ds, index = [h], 1, 1
    for level in range(len(mult)):
        for _ in range(nrb):
            h = res(h, f"input_blocks.{index}.0")
            if ds in attention_at:
                h = attend(h, f"input_blocks.{index}.1")
            skips.append(h)
            index += 1
        if level != len(mult) - 1:
            name = f"input_blocks.{index}.0"
            h = res(h, name, "down") if updown else conv(h, f"{name}.op", stride=2, padding=1)
            skips.append(h)
            index += 1
            ds *= 2
    h = res(attend(res(h, "middle_block.0"), "middle_block.1"), "middle_block.2")
    index = 0
    for level in reversed(range(len(mult))):
        for i in range(nrb + 1):
            h = res(torch.cat([h, skips.pop()], dim=1), f"output_blocks.{index}.0")
            layer = 1
            if ds in attention_at:
                h = attend(h, f"output_blocks.{index}.1")
                layer = 2
            if level and i == nrb:
                name = f"output_blocks.{index}.{layer}"
                if updown:
                    h = res(h, name, "up")
                else:
                    h = conv(F.interpolate(h, scale_factor=2, mode="nearest"), f"{name}.conv", padding=1)
                ds //= 2
            index += 1
    h = F.silu(F.group_norm(h, 32, sd["out.0.weight"], sd["out.0.bias"], eps=1e-5))
    return conv(h, "out.2", padding=1)


def test_converted_unet_computes_the_original_forward(spec, original, zoo):
    """End to end at 16x16 latents: block order, skip order and every mapped tensor, not only their names."""
    torch.manual_seed(0)
    x = torch.randn(2, spec.latent_shape[0], 16, 16)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ours = zoo.unet(x, t).sample
        want = openai_unet_forward(spec.unet_yaml, original["unet"], x, t)
    assert ours.shape == want.shape == x.shape
    assert (ours - want).abs().max() <= 1e-4 * want.abs().max(), (ours - want).abs().max()


def test_decoder_unscales_quantizes_and_clamps_like_decode_first_stage(spec, zoo):
    torch.manual_seed(0)
    autoencoder, scale = zoo.parts["autoencoder"], zoo.info["scale_factor"]
    z = torch.randn(2, spec.latent_shape[0], 4, 4) * 3  # small latents: the semantics, not the size
    images = zoo.decode(z)
    with torch.no_grad():
        if spec.autoencoder_class == "VQModel":  # nearest codebook entries first (force_not_quantize=False)
            h = z / scale
            flat = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
            codes = torch.cdist(flat, autoencoder.quantize.embedding.weight).argmin(1)
            snapped = autoencoder.quantize.embedding.weight[codes].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
            want = autoencoder.decode(snapped, force_not_quantize=True).sample
            unquantized = autoencoder.decode(h, force_not_quantize=True).sample
            assert (want - unquantized).abs().max() > 1e-3
        else:
            want = autoencoder.decode(z * (1.0 / scale)).sample
            assert (want - autoencoder.decode(z).sample).abs().max() > 1e-3
    assert torch.allclose(images, want.clamp(-1, 1), atol=1e-5)
    factor = 2 ** (len(spec.autoencoder["block_out_channels"]) - 1)
    assert images.shape == (2, 3, 4 * factor, 4 * factor) and images.abs().max() <= 1


# ---- the loaders ----

def test_compvis_checkpoint_loads_through_the_registry(spec, original, zoo, compvis_ckpt):
    assert MODELS[spec.name] is getattr(ldm, f"load_{spec.key}")
    _assert_same(zoo.unet.state_dict(), ldm.original_to_diffusers(original["unet"], f"{spec.key}-unet"))
    _assert_same(zoo.parts["autoencoder"].state_dict(),
                 ldm.original_to_diffusers(original["autoencoder"], f"{spec.key}-autoencoder"))
    assert zoo.name == spec.name and zoo.image_shape == spec.latent_shape and zoo.output_shape == (3, 256, 256)
    assert zoo.default_sampler == "ddim-ldm" and zoo.default_steps == spec.default_steps
    assert torch.equal(zoo.schedule.betas, ldm.schedule(spec).betas)
    assert zoo.info["scale_factor"] == pytest.approx(SCALE_FACTOR[spec.key] or 1.0)
    assert zoo.info["files"] == {"model.ckpt": hashlib.sha256(compvis_ckpt.read_bytes()).hexdigest()}
    assert zoo.info["layout"] == "compvis" and zoo.info["source"] == spec.url
    assert zoo.info["ignored"] == {"model_ema": 3, "schedule_buffers": 2, "autoencoder_loss": 1}
    json.dumps(zoo.info)  # goes into run records as it is
    assert not zoo.unet.training and not any(p.requires_grad for p in zoo.unet.parameters())
    assert TRIPPED == []  # the pickled callback was read as an inert stand-in


def test_diffusers_layout_loads_the_same_model(spec, zoo, tmp_path):
    from diffusers import DDIMScheduler

    zoo.unet.save_pretrained(tmp_path / "unet")
    zoo.parts["autoencoder"].save_pretrained(tmp_path / spec.autoencoder_dirs[0])
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=spec.linear_start, beta_end=spec.linear_end,
                  num_train_timesteps=1000).save_config(tmp_path / "scheduler")
    loaded = load_model(spec.name, tmp_path)
    _assert_same(loaded.unet.state_dict(), zoo.unet.state_dict())
    _assert_same(loaded.parts["autoencoder"].state_dict(), zoo.parts["autoencoder"].state_dict())
    assert [m.heads for m in loaded.unet.modules() if hasattr(m, "heads")] == [
        m.heads for m in zoo.unet.modules() if hasattr(m, "heads")]
    assert loaded.info["scale_factor"] == zoo.info["scale_factor"] and loaded.info["layout"] == "diffusers"
    weights = f"{spec.autoencoder_dirs[0]}/diffusion_pytorch_model.safetensors"
    assert loaded.info["files"][weights] == hashlib.sha256((tmp_path / weights).read_bytes()).hexdigest()
    del loaded

    config_path = tmp_path / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "attention_head_dim": 64}))
    with pytest.raises(BenchError, match="attention_head_dim is 64") as e:
        load_model(spec.name, tmp_path)
    assert "\n" not in str(e.value)
    config_path.write_text(json.dumps(config))
    scheduler_path = tmp_path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_path.read_text())
    scheduler["beta_schedule"] = "linear"
    scheduler_path.write_text(json.dumps(scheduler))
    with pytest.raises(BenchError, match="beta_schedule"):
        ldm.load(spec, tmp_path)


@pytest.mark.parametrize("name", ["ldm-church", "ldm-bedroom"])
def test_missing_checkpoint_says_what_to_download_and_where(name, tmp_path):
    with pytest.raises(BenchError) as e:
        load_model(name)
    message = str(e.value)
    zip_name = {"ldm-church": "lsun_churches.zip", "ldm-bedroom": "lsun_bedrooms.zip"}[name]
    assert "\n" not in message and f"https://ommer-lab.com/files/latent-diffusion/{zip_name}" in message
    assert "run.checkpoint" in message and "model.ckpt" in message
    with pytest.raises(BenchError, match="does not exist"):
        load_model(name, tmp_path / "nowhere")
    with pytest.raises(BenchError, match="neither a diffusers layout"):
        load_model(name, tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="cannot read the checkpoint") as e:
        load_model(name, tmp_path)
    assert "\n" not in str(e.value)


def test_lightning_checkpoint_is_read_without_running_pickled_code(tmp_path):
    path = tmp_path / "model.ckpt"
    weight = torch.arange(6.0).reshape(2, 3)
    torch.save({"state_dict": {"w": weight, "n": torch.tensor(3)}, "callbacks": [LightningCallbackStandIn()],
                "hyper_parameters": {"cfg": LightningCallbackStandIn()}}, path)
    with pytest.raises(pickle.UnpicklingError):  # what the plain safe load says about such a file
        torch.load(path, weights_only=True)
    state = ldm.read_lightning_state_dict(path)
    assert torch.equal(state["w"], weight) and state["n"].item() == 3
    assert TRIPPED == []


def test_compvis_checkpoint_entries_are_checked():
    with pytest.raises(BenchError, match="unexpected entries in the CompVis checkpoint: cond_stage_model.x"):
        ldm.split_compvis_state_dict({"model.diffusion_model.a": torch.zeros(1), "cond_stage_model.x": torch.zeros(1)})
    other = {"scale_factor": torch.tensor(0.5)}
    with pytest.raises(BenchError, match="uses 1"):
        ldm._scale_factor_from_checkpoint(ldm.BEDROOM, other, "model.ckpt")
    with pytest.raises(BenchError, match="no scale_factor"):
        ldm._scale_factor_from_checkpoint(ldm.CHURCH, {}, "model.ckpt")
    with pytest.raises(BenchError, match="betas are not ldm-church's schedule"):
        ldm._check_schedule_buffers(ldm.CHURCH, {"betas": ldm.schedule(ldm.BEDROOM).betas.float()}, "model.ckpt")


# ---- quantized sampling at full size ----

def test_quantized_sampling_then_decoding(spec, zoo):
    """W8A4 on the full-size UNet, 2 DDIM steps from the same noise, then the full-precision decoder. With 2 steps the
    warm-up decides everything (shared/spec/modiff.md): plain and ec compute the first evaluation with unquantized
    activations and at the second quantize the same residual a_t - a_T (â_T = a_T), so their latents agree bitwise
    ("with 2 steps compensation cannot help"), while off quantizes both evaluations; ec's latents, and the images
    decoded from them, are therefore much closer to full precision than off's. The modes still keep different state:
    by linearity ec's last output of a layer is A(â) + bias; plain's is not (its â is the true last input). Only the
    UNet is quantized: the decoder is the model's own full-precision autoencoder."""
    sampler = SamplerConfig.from_name("ddim-uniform", 2)
    seeds = [0]  # one image per mode keeps the 256x256 decodes affordable; batches are tested on CIFAR-10 and SD
    latents = {"fp": sample(zoo.denoiser(), zoo.schedule, sampler, seeds, zoo.image_shape, progress=False)}
    for modulation in ("off", "plain", "ec"):
        qunet = modiff.quantize(copy.deepcopy(zoo.unet),
                                ModiffConfig(w_bits=8, a_bits=4, modulation=modulation, granularity="channel"))
        layers = modiff.quant_layers(qunet)
        assert len(layers) == sum(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))
                                  for m in zoo.unet.modules())  # every conv/linear of the UNet
        watched = [layers[0], layers[len(layers) // 2], layers[-1]]
        last = {}
        hooks = [layer.register_forward_hook(lambda mod, args, out, last=last: last.__setitem__(mod.name, out))
                 for layer in watched]
        latents[modulation] = sample(zoo.denoiser(qunet), zoo.schedule, sampler, seeds, zoo.image_shape,
                                     progress=False, on_trajectory_start=lambda q=qunet: modiff.reset(q))
        for hook in hooks:
            hook.remove()
        assert latents[modulation].shape == (1, *spec.latent_shape) and torch.isfinite(latents[modulation]).all()
        if modulation != "off":
            with torch.no_grad():
                gap = [((layer.linear(layer.reconstruction, bias=True) - last[layer.name]).norm()
                        / last[layer.name].norm()).item() for layer in watched]
            if modulation == "ec":
                assert max(gap) < 1e-4, gap  # ô = A(â) + bias, up to float rounding
            else:
                assert max(gap) > 1e-2, gap  # plain: ô carries the quantization error, â is the true input
        del qunet, layers, watched
    assert not modiff.quant_layers(zoo.unet) and not modiff.quant_layers(zoo.parts["autoencoder"])

    def error(x, reference):
        return ((x - reference).norm() / reference.norm()).item()

    assert torch.equal(latents["plain"], latents["ec"])
    assert error(latents["ec"], latents["fp"]) < 0.25 * error(latents["off"], latents["fp"])
    assert error(latents["off"], latents["fp"]) > 0.02  # A4 really changed the latents
    images = dict(zip(("fp", "ec", "off"), zoo.decode(torch.cat([latents["fp"], latents["ec"], latents["off"]])),
                      strict=True))
    assert all(image.shape == (3, 256, 256) and torch.isfinite(image).all() for image in images.values())
    assert error(images["ec"], images["fp"]) < 0.5 * error(images["off"], images["fp"])
