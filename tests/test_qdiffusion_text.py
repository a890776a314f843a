"""Q-Diffusion on a text-conditioned UNet (issue 17, item 8): calibration data that carries the text conditioning and
the classifier-free-guidance batch, block reconstruction against that context (cross-attention included, softmax at
16 bits as in the paper's Stable Diffusion setting), and qdiff cells of a text-to-image model through the harness.

The model is Stable Diffusion's kind at toy size: a random ``UNet2DConditionModel`` (SD's block types over three
levels, cross-attention width 16) behind the sd-v1-4 entry's own prompt conditioning and guidance (one UNet call on
``cat([x, x])`` with ``cat([uncond, cond])`` embeddings), a stand-in text encoder and tokenizer, 8x8 latents.
SDXL's kind (issue 27): the same with SDXL's block types and ``text_time`` addition embedding behind
``bench.zoo.sdxl.SDXLConditioning`` (two stand-in text towers), whose ``added_cond_kwargs`` calibration keeps."""

import io
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from baselines.qdiffusion import calibration
from baselines.qdiffusion.attention import QUANTIZERS_ATTR, attention_modules
from baselines.qdiffusion.quantizers import ActQuantizer
from baselines.qdiffusion.reconstruction import (
    ReconConfig,
    capture_inputs,
    capture_outputs,
    prepare,
    reconstruct_activations,
    reconstruct_weights,
    units,
)
from bench.matrix import load_matrix
from bench.runner import Runner
from modiff.samplers import PerSampleNoise, SamplerConfig, sample

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
STEPS = 4
PLMS = SamplerConfig.from_name("plms", STEPS)  # SD's sampler: 5 network evaluations for 4 steps
SEEDS = [5, 6, 7]  # in batches of 2 and 1
CROSS_BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"  # a BasicTransformerBlock: self- and cross-attention


@pytest.fixture(scope="module")
def tiny(tiny_sd):
    model = tiny_sd()
    data = calibration.collect(model.denoiser(), model.schedule, PLMS, 2, SEEDS, model.image_shape, 2,
                               on_batch=model.start_batch, unet=model.unet)
    return model, data


# -- calibration data ---------------------------------------------------------------------------------------------
def test_calibration_data_is_the_unets_input_doubled_batch_and_text_context(tiny):
    """What is kept is what the UNet receives from the guided denoiser: per step the doubled batch of every
    trajectory (batch [5, 6] gives rows x5 x6 x5 x6, batch [7] rows x7 x7) with its timestep, and once the rows'
    text embeddings (unconditional half first), exactly as a plain guided sampling feeds them to the UNet."""
    model, data = tiny
    conditioning = model.start_batch.__self__
    assert data.steps == [0, 2, 4] and sorted(data.x) == [0, 1, 2, 3, 4] and data.n == 3 * len(SEEDS)
    uncond, cond = [0, 1, 4], [2, 3, 5]  # the rows of the two halves
    for x in data.x.values():
        assert x.shape == (2 * len(SEEDS), *model.image_shape)
        assert torch.equal(x[uncond], x[cond])
    assert torch.equal(data.x[0][uncond], PerSampleNoise(SEEDS).randn(model.image_shape))
    context = data.cond["encoder_hidden_states"]
    assert list(data.cond) == ["encoder_hidden_states"] and context.shape == (2 * len(SEEDS), 4, 16)
    assert all(torch.equal(context[r], conditioning.embed("")) for r in uncond)
    prompts = conditioning.prompts
    assert all(torch.equal(context[r], conditioning.embed(prompts[s % 2])) for r, s in zip(cond, SEEDS, strict=True))
    assert not torch.equal(context[2], context[3])  # two prompts

    # the same sampling, watched at the UNet: 5 calls per batch
    seen = []
    handle = model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"])),
        with_kwargs=True)
    try:
        sample(model.denoiser(), model.schedule, PLMS, SEEDS, model.image_shape, 2, progress=False,
               on_batch=model.start_batch)
    finally:
        handle.remove()
    assert len(seen) == 2 * (STEPS + 1)
    for i in data.x:
        first, second = seen[i], seen[STEPS + 1 + i]
        torch.testing.assert_close(data.x[i], torch.cat([first[0], second[0]]), rtol=0, atol=1e-6)
        assert (first[1] == data.t[i]).all() and (second[1] == data.t[i]).all()
        assert torch.equal(context, torch.cat([first[2], second[2]]))

    # every calibration row of inputs() has its context; the cached form keeps it
    xs, ts = data.inputs()
    rows = data.conditioning()["encoder_hidden_states"]
    assert len(xs) == len(ts) == len(rows) == 3 * 2 * len(SEEDS)
    assert torch.equal(rows, torch.cat([context] * 3))
    again = calibration.CalibrationData.from_dict(data.to_dict())
    assert torch.equal(again.cond["encoder_hidden_states"], context)
    plain = calibration.CalibrationData([0], {0: xs[:2]}, {0: 1}, [0])
    assert "cond" not in plain.to_dict() and calibration.CalibrationData.from_dict(plain.to_dict()).cond == {}


def test_a_denoiser_calling_the_unet_twice_per_evaluation_is_refused(tiny):
    model, _ = tiny
    conditioning = model.start_batch.__self__

    def two_calls(x, t):  # guidance as two UNet calls: rows could not be matched with the UNet's inputs
        context = conditioning.context(len(x))
        eps_u = model.unet(x, t, encoder_hidden_states=context[: len(x)]).sample
        return eps_u + 7.5 * (model.unet(x, t, encoder_hidden_states=context[len(x):]).sample - eps_u)

    with pytest.raises(ValueError, match="called the UNet 2 times"):
        calibration.collect(two_calls, model.schedule, PLMS, 2, SEEDS[:1], model.image_shape, 1,
                            on_batch=model.start_batch, unet=model.unet)


# -- reconstruction -------------------------------------------------------------------------------------------------
def test_a_cross_attention_unit_records_and_replays_the_text_context(tiny):
    """The inputs a transformer block records carry ``encoder_hidden_states`` for every (doubled) row, and replaying
    them gives the full-precision block's output; without the context it would be another output."""
    model, data = tiny
    xs, ts = data.inputs()
    cond = data.conditioning()
    example = (xs[:2], ts[:2], {k: v[:2] for k, v in cond.items()})
    q = prepare(model.unet, ReconConfig(w_bits=8, a_bits=8, sm_abit=16), example)
    assert CROSS_BLOCK in [name for name, _ in units(q, example)]

    block = model.unet.get_submodule(CROSS_BLOCK)
    recorded = capture_inputs(model.unet, block, xs, ts, 4, CPU, cond)
    assert recorded.n == len(xs) == 18
    assert torch.equal(recorded.kwargs["encoder_hidden_states"], cond["encoder_hidden_states"])
    target = capture_outputs(model.unet, block, xs, ts, 4, CPU, cond)
    args, kwargs = recorded.take(slice(0, len(xs)), CPU)
    with torch.no_grad():
        torch.testing.assert_close(block(*args, **kwargs), target, rtol=1e-5, atol=1e-5)
        without = block(*args, **{**kwargs, "encoder_hidden_states": None})  # attn2 becomes self-attention
    assert (without - target).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rows"):  # conditioning that does not cover every row
        capture_inputs(model.unet, block, xs, ts, 4, CPU, {k: v[:6] for k, v in cond.items()})


def test_weights_and_step_sizes_reconstruct_on_the_conditional_unet(tiny):
    """Both phases run on every unit, cross-attention blocks included; the softmax quantizers are 16-bit (SD's
    ``sm_abit``, not learned) and every activation quantizer ends initialised; the quantized UNet stays close to full
    precision."""
    model, data = tiny
    xs, ts = data.inputs()
    cond = data.conditioning()
    config = ReconConfig(w_bits=8, a_bits=8, sm_abit=16, weight_iters=3, act_iters=3, batch_size=6)
    q = prepare(model.unet, config, (xs[:2], ts[:2], {k: v[:2] for k, v in cond.items()}))
    weights = reconstruct_weights(q, model.unet, xs, ts, config, CPU, cond=cond)
    acts = reconstruct_activations(q, model.unet, xs, ts, config, CPU, cond=cond)
    transformer_units = [r["unit"] for r in weights if r["unit"].endswith("transformer_blocks.0")]
    assert CROSS_BLOCK in transformer_units and len(transformer_units) == 7  # 2 down, mid, 2 + 2 up
    assert CROSS_BLOCK in [r["unit"] for r in acts]
    assert all(torch.isfinite(torch.tensor([r["nearest"], r["adaround"]])).all() for r in weights)
    quantizers = [getattr(a, QUANTIZERS_ATTR) for _, a in attention_modules(q)]
    assert len(quantizers) == 14  # attn1 and attn2 of each transformer block
    assert all(qs.probs.bits == 16 and qs.key.bits == 8 for qs in quantizers)
    # the 16-bit softmax keeps its initial range (probabilities in [0, 1]), as in the authors' code: Adam at lr 4e-4
    # would move a step of 1/65535 by 30x in one update
    assert all(0 < float(qs.probs.scale.detach()) <= 1.0001 / 65535 for qs in quantizers)
    assert all(m.enabled and bool(m.initialized) for m in q.modules() if isinstance(m, ActQuantizer))
    rows = slice(0, 6)
    with torch.no_grad():
        ref = model.unet(xs[rows], ts[rows], encoder_hidden_states=cond["encoder_hidden_states"][rows]).sample
        out = q(xs[rows], ts[rows], encoder_hidden_states=cond["encoder_hidden_states"][rows]).sample
    assert out.isfinite().all() and not torch.equal(out, ref)
    assert (out - ref).norm() < 0.2 * ref.norm()


# -- the method, through the harness ---------------------------------------------------------------------------------
def test_qdiff_cells_on_a_text_to_image_model(tmp_path, monkeypatch, tiny_sd):
    """End to end: Q-Diffusion alone (quantized attention, 16-bit softmax) and with MoDiff's residual scales, on the
    prompt-conditioned, guided model; the cells that were refused before issue 17's fix run, with finite samples."""
    from bench.zoo import registry

    monkeypatch.setattr(registry, "_ENTRIES", dict(registry._ENTRIES))  # forget the entry afterwards
    registry.register_model(registry.ZooEntry("tiny-sd", lambda checkpoint: tiny_sd(), 1000,
                                              "a tiny random text-to-image model", (8, 8)))
    matrix = load_matrix("smoke", [
        "run.model='tiny-sd'", "run.sampler='plms'", f"steps={STEPS}", "n_samples=2", "batch_size=2",
        "run.metrics=['psnr_to_fp']", "matrix.base=['qdiff']", "matrix.modulation=['off','ec']",
        "matrix.w_bits=[8]", "matrix.a_bits=[8]", "matrix.cache=['none']",
        "params.qdiff.cali_st=2", "params.qdiff.cali_n=2", "params.qdiff.weight_iters=2",
        "params.qdiff.act_iters=2", "params.qdiff.batch_size=4", "params.qdiff.sm_abit=16"])
    assert sorted(c.method for c in matrix.cells) == ["qdiff", "qdiff+ec"]
    summary = Runner(matrix, tmp_path, device="cpu", progress=False, log=lambda s: None).run()
    table = pd.read_csv(tmp_path / "results.csv").set_index("method")
    assert not summary.failed, table[["status", "error"]]
    assert set(table.status) == {"ok"}
    for method in ("qdiff", "qdiff+ec"):
        assert 0 < table.loc[method, "psnr_to_fp"] < float("inf")
        images = torch.load(tmp_path / table.loc[method, "samples_file"], weights_only=True)["images"]
        assert images.shape == (2, 4, 8, 8) and images.isfinite().all()
    assert len(list((tmp_path / "cache" / "qdiff").glob("data-*"))) == 1  # one calibration set for both cells


# -- SDXL: the added conditioning ---------------------------------------------------------------------------------
class _Tokenizer:
    model_max_length = 4

    def __call__(self, prompts, max_length, **kwargs):
        ids = [[1 + ord(ch) % 26 for ch in p[:max_length]] + [0] * max(0, max_length - len(p)) for p in prompts]
        return SimpleNamespace(input_ids=torch.tensor(ids))


class _TextTower(nn.Module):
    """What ``SDXLConditioning`` asks of a CLIP text tower: hidden states of every layer, and a projected pooled
    output (the second tower's ``text_embeds``)."""

    def __init__(self, width: int, projection: int):
        super().__init__()
        self.embedding, self.layer = nn.Embedding(27, width), nn.Linear(width, width)
        self.projection = nn.Linear(width, projection)

    def forward(self, input_ids, output_hidden_states=False):
        first = self.embedding(input_ids)
        last = self.layer(first)
        return SimpleNamespace(hidden_states=(first, last), text_embeds=self.projection(last[:, -1]))


def tiny_sdxl_model():
    from diffusers import UNet2DConditionModel

    from bench.zoo import ZooModel, sd, sdxl

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=16,
        use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
        norm_num_groups=4,
    ).eval().requires_grad_(False)
    towers = (_TextTower(8, 8).eval(), _TextTower(8, 8).eval())
    conditioning = sdxl.SDXLConditioning((_Tokenizer(), _Tokenizer()), towers, ["a red cube", "a blue sphere"],
                                         time_ids=sdxl.time_ids(64, 64))
    return ZooModel("tiny-sdxl", unet, sd.schedule(), (4, 8, 8), "ddim-ldm", 10, make_denoiser=conditioning.denoiser,
                    start_batch=conditioning.start_batch, default_batch_size=2)


def test_calibration_keeps_sdxls_added_conditioning_and_replays_it():
    """SDXL's UNet takes ``added_cond_kwargs`` (a dict: pooled text embedding and time ids) beside the context: the
    calibration data keeps it row by row like the context (zeros in the unconditional half), through the cache's
    format, and a replayed unit gets it: the addition embedding's first layer reads ``[text_embeds, time
    features]`` of exactly the calibration rows. (Before issue 27 the dict was refused: only tensors were kept.)"""
    model = tiny_sdxl_model()
    conditioning = model.start_batch.__self__
    data = calibration.collect(model.denoiser(), model.schedule, PLMS, 2, SEEDS, model.image_shape, 2,
                               on_batch=model.start_batch, unet=model.unet)
    assert set(data.cond) == {"encoder_hidden_states", "added_cond_kwargs"}
    added = data.cond["added_cond_kwargs"]
    assert set(added) == {"text_embeds", "time_ids"} and added["text_embeds"].shape == (2 * len(SEEDS), 8)
    uncond, cond = [0, 1, 4], [2, 3, 5]  # batch [5, 6] gives rows u5 u6 c5 c6, batch [7] rows u7 c7
    assert not added["text_embeds"][uncond].any() and not data.cond["encoder_hidden_states"][uncond].any()
    for row, seed in zip(cond, SEEDS, strict=True):
        assert torch.equal(added["text_embeds"][row], conditioning.pooled(conditioning.prompt(seed)))
    assert torch.equal(added["time_ids"], torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(6, 1))

    saved = io.BytesIO()
    torch.save(data.to_dict(), saved)
    saved.seek(0)
    again = calibration.CalibrationData.from_dict(torch.load(saved, weights_only=True))
    assert torch.equal(again.cond["added_cond_kwargs"]["text_embeds"], added["text_embeds"])

    xs, ts = data.inputs()
    rows = data.conditioning()
    assert rows["added_cond_kwargs"]["time_ids"].shape == (len(xs), 6)
    layer = model.unet.add_embedding.linear_1
    recorded = capture_inputs(model.unet, layer, xs, ts, 4, CPU, rows)
    assert recorded.n == len(xs) == 18
    torch.testing.assert_close(recorded.args[0][:, :8], rows["added_cond_kwargs"]["text_embeds"], rtol=0, atol=0)
    example = (xs[:2], ts[:2], calibration.map_cond(rows, lambda v: v[:2]))
    q = prepare(model.unet, ReconConfig(w_bits=8, a_bits=8), example)
    assert "add_embedding.linear_1" in [name for name, _ in units(q, example)]
