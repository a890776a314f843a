"""Q-Diffusion (Li et al., ICCV 2023), reimplemented on the module structure of diffusers UNets.

- :mod:`.calibration`: time-step-aware calibration data from full-precision trajectories;
- :mod:`.quantizers`: AdaRound weights, learned static activation step sizes, shortcut splitting;
- :mod:`.attention`: quantized q / k / v and softmax output (``sm_abit``);
- :mod:`.reconstruction`: BRECQ-style block reconstruction in forward order;
- :mod:`.method`: the ``qdiff`` base quantizer (alone, or under MoDiff with static residual scales).

Everything is fake quantization: no speed-up is expected or claimed.
"""
