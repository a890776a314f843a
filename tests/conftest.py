import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bench.zoo import load_model
from bench.zoo.digits import load_classifier


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and getattr(item, "module", None) is not None:
        item.module._pytest_failed = True
    return report


@pytest.fixture(scope="module", autouse=True)
def _module_temp_folders(request, tmp_path_factory):
    """Removes the folders ``tmp_path_factory`` made during a module (its module-scoped fixtures: random
    paper-scale checkpoints of several GB) when the module ends with every test passed; a failed module keeps
    them to look at. Session-scoped fixtures here make no folders, so nothing a later module needs is removed."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if getattr(request.module, "_pytest_failed", False):
        return
    for folder in set(base.iterdir()) - before:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_model():
    return load_model("digits")


@pytest.fixture(scope="session")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's duration: its many small ops run as fast, and do not stall
    (minutes instead of seconds) when another process shares a 2-core machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- a text-conditioned UNet (Stable Diffusion's kind) at toy size, shared by the DeepCache and Q-Diffusion tests
TINY_SD_PROMPTS = ["a red cube", "a blue sphere"]


class _Tokenizer:
    """What ``PromptConditioning`` asks of CLIP's tokenizer: prompts -> ids padded to ``model_max_length``."""

    model_max_length = 4

    def __call__(self, prompts, max_length, **kwargs):
        ids = [[1 + ord(ch) % 26 for ch in p[:max_length]] + [0] * max(0, max_length - len(p)) for p in prompts]
        return SimpleNamespace(input_ids=torch.tensor(ids))


class _TextEncoder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.embedding = nn.Embedding(27, width)

    def forward(self, input_ids):
        return SimpleNamespace(last_hidden_state=self.embedding(input_ids))


def tiny_text_to_image_model():
    """Stable Diffusion's kind at toy size: a random ``UNet2DConditionModel`` (SD's block types over three levels,
    cross-attention width 16) behind the sd-v1-4 entry's own prompt conditioning and classifier-free guidance (one
    UNet call on the doubled batch with ``encoder_hidden_states``); a one-layer stand-in text encoder, 8x8 latents
    and no autoencoder."""
    from diffusers import UNet2DConditionModel

    from bench.zoo import ZooModel, sd

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval().requires_grad_(False)
    conditioning = sd.PromptConditioning(_Tokenizer(), _TextEncoder(16).eval(), TINY_SD_PROMPTS)
    return ZooModel("tiny-sd", unet, sd.schedule(), (4, 8, 8), "plms", 10, make_denoiser=conditioning.denoiser,
                    start_batch=conditioning.start_batch, default_batch_size=2)


@pytest.fixture(scope="session")
def tiny_sd():
    """A factory of fresh tiny text-to-image zoo models (``tiny_text_to_image_model``)."""
    return tiny_text_to_image_model
