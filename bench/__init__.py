"""Benchmark harness: model zoo, samplers, metrics, training of the embedded default, CLI."""

import logging as _logging

# With torchao installed (the 'torchao' extra), importing diffusers imports it too (diffusers.quantizers.auto), and
# that prints three warnings to stderr on every command: torch's pytree deprecation notices for two of torchao's
# enums, and diffusers' "Unable to import `torchao` Tensor objects" (checkpoints serialized with torchao, which the
# harness never loads). They would break the one-line errors the CLI promises; their loggers are quieted to ERROR.
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
