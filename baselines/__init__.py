"""Reimplementations of Q-Diffusion, PTQD and DeepCache (issue #6), one subpackage each."""
