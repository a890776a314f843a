"""MoDiff (modulated quantization of temporal residuals, ICML 2025) and the fake-quantization
core it shares with the baselines. The method lands with issue #3; see ../shared/spec/modiff.md."""
