"""The ddpm-cifar10 zoo entry: the original-layout converter (keys, round trips, what the network computes), the
three loaders, and quantized sampling on the loaded model.

The original layout here is generated from the structure of ermongroup/ddim ``models/diffusion.py`` with the CIFAR-10
settings (ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attention at 16x16), never by converting a diffusers model,
and its forward pass is written out below from that code's definitions.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants

import modiff
from bench.errors import BenchError
from bench.provenance import sha256_file
from bench.zoo import ZooModel, load_model
from bench.zoo import ddpm_cifar10 as cifar
from bench.zoo.architectures import DDPM_CIFAR10_32, build_random_unet
from modiff.samplers import SamplerConfig, sample

CH, CH_MULT, NUM_RES_BLOCKS, ATTN_RESOLUTIONS, RESOLUTION, IN_CH, OUT_CH = 128, (1, 2, 2, 2), 2, (16,), 32, 3, 3
TEMB_CH = 4 * CH
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def original_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the original ``Model``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, n_in, n_out):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in), (n_out,)

    def conv(name, n_in, n_out, k=3):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (n_out, n_in, k, k), (n_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, n_in, n_out):
        norm(f"{name}.norm1", n_in)
        conv(f"{name}.conv1", n_in, n_out)
        linear(f"{name}.temb_proj", TEMB_CH, n_out)
        norm(f"{name}.norm2", n_out)
        conv(f"{name}.conv2", n_out, n_out)
        if n_in != n_out:
            conv(f"{name}.nin_shortcut", n_in, n_out, k=1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, k=1)

    linear("temb.dense.0", CH, TEMB_CH)
    linear("temb.dense.1", TEMB_CH, TEMB_CH)
    conv("conv_in", IN_CH, CH)
    in_mult, res, levels = (1, *CH_MULT), RESOLUTION, len(CH_MULT)
    for i in range(levels):
        block_in, out = CH * in_mult[i], CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS):
            resnet(f"down.{i}.block.{j}", block_in, out)
            block_in = out
            if res in ATTN_RESOLUTIONS:
                attn(f"down.{i}.attn.{j}", out)
        if i != levels - 1:
            conv(f"down.{i}.downsample.conv", block_in, block_in)
            res //= 2
    resnet("mid.block_1", block_in, block_in)
    attn("mid.attn_1", block_in)
    resnet("mid.block_2", block_in, block_in)
    for i in reversed(range(levels)):  # up[i] works at the resolution of down[i]; the last block takes its input skip
        out = CH * CH_MULT[i]
        for j in range(NUM_RES_BLOCKS + 1):
            skip = CH * in_mult[i] if j == NUM_RES_BLOCKS else out
            resnet(f"up.{i}.block.{j}", block_in + skip, out)
            block_in = out
            if res in ATTN_RESOLUTIONS:
                attn(f"up.{i}.attn.{j}", out)
        if i != 0:
            conv(f"up.{i}.upsample.conv", block_in, block_in)
            res *= 2
    norm("norm_out", block_in)
    conv("conv_out", block_in, OUT_CH)
    return shapes


def random_original(seed: int) -> dict[str, torch.Tensor]:
    """Random non-zero values everywhere (norm scales too), at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in original_shapes().items():
        noise = torch.randn(shape, generator=g)
        if key.endswith(".bias"):
            state[key] = 0.1 * noise
        elif len(shape) == 1:  # GroupNorm scale
            state[key] = 1.0 + 0.3 * noise
        else:
            state[key] = noise / math.sqrt(math.prod(shape[1:]))
    return state


def original_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The original ``Model.forward`` written out with torch.nn.functional, reading the original-layout keys."""

    def swish(h):
        return h * torch.sigmoid(h)

    def norm(h, name):
        return F.group_norm(h, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    def conv(h, name, stride=1, padding=1):
        return F.conv2d(h, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)

    def linear(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def resnet(h, name, temb):
        y = conv(swish(norm(h, f"{name}.norm1")), f"{name}.conv1")
        y = y + linear(swish(temb), f"{name}.temb_proj")[:, :, None, None]
        y = conv(swish(norm(y, f"{name}.norm2")), f"{name}.conv2")  # dropout is the identity in eval
        if f"{name}.nin_shortcut.weight" in sd:
            h = conv(h, f"{name}.nin_shortcut", padding=0)
        return h + y

    def attn(h, name):
        b, c, height, width = h.shape
        n = norm(h, f"{name}.norm")
        q, k, v = (conv(n, f"{name}.{p}", padding=0).reshape(b, c, height * width) for p in "qkv")
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c ** -0.5, dim=2)  # query i attends to key j
        out = torch.einsum("bij,bcj->bci", w, v).reshape(b, c, height, width)
        return h + conv(out, f"{name}.proj_out", padding=0)

    half = CH // 2  # sinusoidal embedding: sin first, frequencies exp(-log(10000) * i / (half - 1)), in float32
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(x.dtype)
    temb = linear(swish(linear(emb, "temb.dense.0")), "temb.dense.1")

    levels = len(CH_MULT)
    hs = [conv(x, "conv_in")]
    for i in range(levels):
        for j in range(NUM_RES_BLOCKS):
            h = resnet(hs[-1], f"down.{i}.block.{j}", temb)
            if f"down.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"down.{i}.attn.{j}")
            hs.append(h)
        if i != levels - 1:  # asymmetric zero padding (right and bottom), then a stride-2 conv without padding
            hs.append(conv(F.pad(hs[-1], (0, 1, 0, 1)), f"down.{i}.downsample.conv", stride=2, padding=0))
    h = resnet(hs[-1], "mid.block_1", temb)
    h = attn(h, "mid.attn_1")
    h = resnet(h, "mid.block_2", temb)
    for i in reversed(range(levels)):
        for j in range(NUM_RES_BLOCKS + 1):
            h = resnet(torch.cat([h, hs.pop()], dim=1), f"up.{i}.block.{j}", temb)
            if f"up.{i}.attn.{j}.q.weight" in sd:
                h = attn(h, f"up.{i}.attn.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"up.{i}.upsample.conv")
    assert not hs
    return conv(swish(norm(h, "norm_out")), "conv_out")


@pytest.fixture(scope="module")
def original_sd():
    return random_original(seed=0)


@pytest.fixture(scope="module")
def converted_unet(original_sd):
    unet = build_random_unet(DDPM_CIFAR10_32, seed=1).eval()
    result = unet.load_state_dict(cifar.original_to_diffusers(original_sd), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return unet


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """A random-weight UNet2DModel(DDPM_CIFAR10_32) saved with save_pretrained, plus its state dict."""
    unet = build_random_unet(DDPM_CIFAR10_32, seed=2)
    directory = tmp_path_factory.mktemp("diffusers") / "ddpm-cifar10-32"
    unet.save_pretrained(directory)
    return directory, {k: v.clone() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def loaded(diffusers_dir):
    return cifar.load(diffusers_dir[0])


# ------------------------------------------------------------------------------------------------------------ converter


def test_every_original_key_maps_onto_the_diffusers_model(original_sd, converted_unet):
    assert len(original_sd) == 328
    converted = cifar.original_to_diffusers(original_sd)
    target = converted_unet.state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    # the 1x1 attention convs became Linear weights with the same numbers
    assert torch.equal(converted_unet.down_blocks[1].attentions[1].to_out[0].weight,
                       original_sd["down.1.attn.1.proj_out.weight"][:, :, 0, 0])
    # up[1] (16x16, attention) is the third diffusers up block
    assert torch.equal(converted_unet.up_blocks[2].attentions[2].group_norm.bias, original_sd["up.1.attn.2.norm.bias"])


def test_round_trips_are_exact(original_sd, diffusers_dir):
    back = cifar.diffusers_to_original(cifar.original_to_diffusers(original_sd))
    assert list(back) == list(original_sd)
    for key, value in original_sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    diffusers_sd = diffusers_dir[1]
    forth = cifar.original_to_diffusers(cifar.diffusers_to_original(diffusers_sd))
    assert set(forth) == set(diffusers_sd)
    for key, value in diffusers_sd.items():
        assert torch.equal(forth[key], value), key


@pytest.mark.parametrize("change, named", [
    (lambda sd: sd.update({"logvar": torch.zeros(1000)}), "1 unknown keys: logvar"),
    (lambda sd: sd.pop("mid.attn_1.q.weight"), "1 missing keys: mid.attn_1.q.weight"),
    (lambda sd: sd.update({"up.1.attn.0.k.weight": torch.zeros(256, 256)}),
     "up.1.attn.0.k.weight (256, 256) != (256, 256, 1, 1)"),
], ids=["unknown", "missing", "shape"])
def test_converter_names_the_offending_keys(original_sd, change, named):
    broken = dict(original_sd)
    change(broken)
    with pytest.raises(BenchError) as err:
        cifar.original_to_diffusers(broken)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_converted_model_computes_the_original_network(original_sd, converted_unet):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([7, 913])  # a large t: sin/cos order and frequencies matter
    with torch.no_grad():
        got = converted_unet(x, t).sample
        want = original_forward(original_sd, x, t)
        swapped = dict(original_sd)  # control: the comparison sees two swapped same-shape tensors
        swapped["down.1.attn.0.q.weight"], swapped["down.1.attn.0.k.weight"] = (
            original_sd["down.1.attn.0.k.weight"], original_sd["down.1.attn.0.q.weight"])
        wrong = original_forward(swapped, x, t)
    scale = want.abs().max().item()
    assert scale > 0.1 and torch.isfinite(got).all()
    err = (got - want).abs().max().item()
    assert err < 1e-4 * scale, (err, scale)
    assert (wrong - want).abs().max().item() > 100 * err


# -------------------------------------------------------------------------------------------------------------- loaders


def test_loads_a_diffusers_directory(diffusers_dir, loaded, tmp_path):
    directory, state = diffusers_dir
    assert isinstance(loaded, ZooModel) and loaded.name == "ddpm-cifar10"
    assert (loaded.image_shape, loaded.default_sampler, loaded.default_steps, loaded.default_batch_size) == (
        (3, 32, 32), "ddim-quad", 100, 64)
    assert loaded.schedule.num_train_timesteps == 1000
    assert math.isclose(float(loaded.schedule.betas[0]), 1e-4) and math.isclose(float(loaded.schedule.betas[-1]), 0.02)
    weights = "diffusion_pytorch_model.safetensors"
    assert loaded.info["source"] == "diffusers" and loaded.info["variant"] == "unknown"
    assert loaded.info["files"] == {weights: sha256_file(directory / weights)}
    assert not loaded.unet.training and not any(p.requires_grad for p in loaded.unet.parameters())
    assert all(torch.equal(v, state[k]) for k, v in loaded.unet.state_dict().items())

    pipeline = tmp_path / "pipeline"  # a pipeline directory: the UNet under unet/
    pipeline.mkdir()
    (pipeline / "unet").symlink_to(directory, target_is_directory=True)
    via_zoo = load_model("ddpm-cifar10", pipeline)
    assert via_zoo.info["files"] == {f"unet/{weights}": sha256_file(directory / weights)}

    other = tmp_path / "other"
    other.mkdir()
    config = (directory / "config.json").read_text().replace('"layers_per_block": 2', '"layers_per_block": 1')
    (other / "config.json").write_text(config)
    with pytest.raises(BenchError, match="layers_per_block is 1, expected 2"):
        cifar.load(other)


def test_loads_original_checkpoints_with_their_variant(original_sd, tmp_path, monkeypatch):
    release = tmp_path / "ema_diffusion_cifar10_model" / "model-790000.ckpt"
    release.parent.mkdir()
    torch.save(original_sd, release)
    raw = tmp_path / "diffusion_cifar10_model" / "model-790000.ckpt"
    raw.parent.mkdir()
    os.link(release, raw)
    plain = tmp_path / "weights.ckpt"
    os.link(release, plain)
    expected = cifar.original_to_diffusers(original_sd)

    model = cifar.load(release)
    assert (model.info["source"], model.info["element"], model.info["variant"]) == ("original", "state_dict", "ema")
    assert model.info["files"] == {"model-790000.ckpt": sha256_file(release)}
    assert all(torch.equal(v, expected[k]) for k, v in model.unet.state_dict().items())
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    assert cifar.load(raw).info["variant"] == "non-ema"
    assert cifar.load(plain).info["variant"] == "unknown"
    # the file's md5 outranks its name: here it "is" the published raw release although it lives under ema_...
    monkeypatch.setitem(cifar.RELEASE_MD5, cifar._md5_file(release), ("non-ema", "diffusion_cifar10_model/..."))
    info = cifar.load(release).info
    assert info["variant"] == "non-ema" and "md5" in info["variant_source"]


def test_loads_ddim_training_checkpoints(original_sd, tmp_path):
    model_sd = {f"module.{k}": -v for k, v in original_sd.items()}  # DDIM trains under nn.DataParallel
    optimizer = {"state": {}, "param_groups": [{"lr": 2e-4, "eps": 1e-8, "params": [0, 1]}]}
    with_ema = tmp_path / "ckpt.pth"
    torch.save([model_sd, optimizer, 12, 790000, original_sd], with_ema)  # the EMA shadow has no prefix
    without_ema = tmp_path / "ckpt_no_ema.pth"
    torch.save([model_sd, optimizer, 12, 790000], without_ema)
    ema = cifar.original_to_diffusers(original_sd)

    model = load_model("ddpm-cifar10", with_ema)
    assert (model.info["element"], model.info["variant"]) == ("ema", "ema")
    assert all(torch.equal(v, ema[k]) for k, v in model.unet.state_dict().items())
    raw = cifar.load(with_ema, element="model")
    assert (raw.info["element"], raw.info["variant"]) == ("model", "non-ema")
    assert all(torch.equal(v, -ema[k]) for k, v in raw.unet.state_dict().items())
    assert cifar.load(without_ema).info["element"] == "model"
    with pytest.raises(BenchError, match="holds no EMA weights"):
        cifar.load(without_ema, element="ema")
    with pytest.raises(BenchError, match="applies to DDIM training checkpoints"):
        cifar.load(tmp_path, element="ema")


def test_hub_snapshot_in_the_cache_loads_offline(diffusers_dir, tmp_path, monkeypatch):
    directory, state = diffusers_dir
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--google--ddpm-cifar10-32"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # the repository keeps them at its root
        (snapshot / name).symlink_to(directory / name)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = cifar.load(None)
    assert (model.info["source"], model.info["checkpoint"], model.info["revision"]) == ("hub", cifar.HUB_ID, commit)
    assert model.info["variant"] == "unknown" and "not verified" in model.info["variant_source"]
    assert all(torch.equal(v, state[k]) for k, v in model.unet.state_dict().items())


def test_offline_without_the_weights_says_what_to_download(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"), PYTHONPATH=str(REPO))
    script = ("import sys\nfrom bench.errors import BenchError\nfrom bench.zoo import load_model\n"
              "try:\n    load_model('ddpm-cifar10')\nexcept BenchError as e:\n    print(e)\n    sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    message = done.stdout.strip()
    assert "\n" not in message
    assert "google/ddpm-cifar10-32 is not in the Hugging Face cache" in message
    assert "hf download google/ddpm-cifar10-32 --local-dir DIR" in message
    assert "ema_diffusion_cifar10_model/model-790000.ckpt" in message


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(BenchError, match="does not exist; download it with") as err:
        cifar.load(tmp_path / "nowhere")
    assert "\n" not in str(err.value)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="cannot read DDPM CIFAR-10 checkpoint"):
        cifar.load(junk)


# ------------------------------------------------------------------------------------------------ quantized sampling

TWO_STEPS = SamplerConfig.from_name("ddim-quad", 2)


def sample_unet(unet, model, sampler, seeds, batch_size) -> torch.Tensor:
    """Samples of ``unet`` on ``model``'s schedule (MoDiff's state reset before each batch's first step)."""
    return sample(model.denoiser(unet), model.schedule, sampler, seeds, model.image_shape, batch_size,
                  progress=False, on_trajectory_start=lambda: modiff.reset(unet))


@pytest.fixture(scope="module")
def full_precision(loaded):
    return sample_unet(loaded.unet, loaded, TWO_STEPS, seeds=[0, 1], batch_size=2)


def test_quantized_sampling_modes_differ_as_the_spec_says(loaded):
    """W8A4 sampling (4 DDIM steps, the same noise) in each mode against the same 8-bit weights with unquantized
    activations (W8A32), network evaluation by evaluation (shared/spec/modiff.md). ``off`` quantizes every
    evaluation. ``plain`` and ``ec`` compute the first evaluation of a trajectory with unquantized activations (the
    warm-up: bitwise the W8A32 network) and then quantize the residual against the previous input; at the second
    evaluation both residuals are a_t - a_T (â_T = a_T), so the two modes agree bitwise; from the third on ``ec``
    feeds the quantization error back (the residual against its reconstruction â) and its error falls far below
    ``plain``'s, which does not. ``ec`` silently behaving as ``off`` or ``plain``, a missing warm-up, or a state reset
    at every step (the authors' CIFAR-10 bug: every evaluation a warm-up) each break one of these."""
    sampler = SamplerConfig.from_name("ddim-quad", 4)

    def run(config):
        unet = modiff.quantize(copy.deepcopy(loaded.unet), config)
        evaluations = []
        hook = unet.register_forward_hook(lambda module, args, out: evaluations.append(out.sample.clone()))
        x = sample_unet(unet, loaded, sampler, seeds=[0, 1], batch_size=2)
        hook.remove()
        assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all() and len(evaluations) == 4
        return x, evaluations

    def error(x, reference):
        return ((x - reference).norm() / reference.norm()).item()

    ref_x, ref = run(modiff.ModiffConfig(w_bits=8, a_bits=32, modulation="off", granularity="channel"))
    runs = {m: run(modiff.ModiffConfig(w_bits=8, a_bits=4, modulation=m, granularity="channel"))
            for m in ("off", "plain", "ec")}
    eps = {m: evaluations for m, (_, evaluations) in runs.items()}
    err = {m: [error(e, r) for e, r in zip(evaluations, ref, strict=True)] for m, evaluations in eps.items()}
    assert torch.equal(eps["plain"][0], ref[0]) and torch.equal(eps["ec"][0], ref[0])  # the warm-up
    assert torch.equal(eps["plain"][1], eps["ec"][1])  # the same first residual
    assert min(err["off"]) > 0.1 and min(err["plain"][1:]) > 0.1 and err["ec"][1] > 0.1  # A4 is in effect
    assert err["ec"][2] < 0.75 * err["plain"][2] and err["ec"][3] < 0.25 * min(err["plain"][3], err["off"][3])
    x_err = {m: error(x, ref_x) for m, (x, _) in runs.items()}
    assert x_err["ec"] < x_err["plain"] < x_err["off"], x_err


def test_32_bit_modulation_with_error_compensation_is_full_precision(loaded, full_precision):
    config = modiff.ModiffConfig(w_bits=32, a_bits=32, modulation="ec", granularity="channel")
    unet = modiff.quantize(copy.deepcopy(loaded.unet), config)
    out = sample_unet(unet, loaded, TWO_STEPS, seeds=[0, 1], batch_size=2)
    assert full_precision.shape == (2, 3, 32, 32) and torch.isfinite(full_precision).all()
    err = (out - full_precision).abs().max().item()
    assert err < 1e-4 * max(1.0, full_precision.abs().max().item()), err
