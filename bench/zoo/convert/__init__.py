"""Checkpoint converters: published checkpoint layouts -> the diffusers modules the zoo entries build.

- :mod:`.ddpm`: the original DDPM / DDIM ``Model`` layout (ermongroup/ddim ``models/diffusion.py``, the converted
  ``model-790000.ckpt`` files) <-> ``UNet2DModel(**DDPM_CIFAR10_32)``, and the DDIM training-checkpoint structure;
- :mod:`.compvis`: the CompVis latent-diffusion layout (``openaimodel.UNetModel``, the first-stage ``AutoencoderKL`` /
  ``VQModel``, a Lightning ``model.ckpt``) <-> diffusers ``UNet2DModel`` / ``AutoencoderKL`` / ``VQModel``.

Converters move tensors between key layouts and check them strictly (a missing, unknown or misshapen tensor is a
one-line BenchError); they read no files themselves except :func:`.compvis.read_lightning_state_dict`, which never
runs code from the file. Which checkpoint a model loads, and from where, is the zoo entries' business
(``bench.zoo.ddpm_cifar10``, ``bench.zoo.ldm``).
"""
