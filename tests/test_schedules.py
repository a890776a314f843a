import numpy as np
import pytest
import torch

from modiff.schedules import NoiseSchedule, step_pairs, timestep_sequence


@pytest.mark.parametrize("steps", [100, 20])
def test_quad_sequence_matches_the_papers_formula(steps):
    expected = [int(s) for s in np.linspace(0, np.sqrt(0.8 * 1000), steps) ** 2]
    seq = timestep_sequence("quad", steps, 1000)
    assert seq == expected
    assert len(seq) == steps  # duplicates are kept, one network evaluation each
    assert seq == sorted(seq) and seq[-1] in (799, 800)


def test_quad_sequence_keeps_leading_duplicates():
    seq = timestep_sequence("quad", 100, 1000)
    assert seq[:4] == [0, 0, 0, 0]
    assert len(set(seq)) < len(seq)


def test_uniform_sequence_is_the_ddim_range():
    assert timestep_sequence("uniform", 100, 1000) == list(range(0, 1000, 10))
    assert timestep_sequence("uniform", 1000, 1000) == list(range(1000))
    assert len(timestep_sequence("uniform", 300, 1000)) == 334  # range(0, 1000, 3), as the DDIM code


def test_step_pairs_end_at_minus_one():
    pairs = step_pairs([0, 10, 20])
    assert pairs == [(20, 10), (10, 0), (0, -1)]


def test_alpha_bar_definition():
    sched = NoiseSchedule.linear()
    betas = np.linspace(1e-4, 0.02, 1000)
    assert sched.alpha_bar(-1) == 1.0
    for t in (0, 1, 499, 999):
        assert sched.alpha_bar(t) == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-12)
    assert torch.all(sched.betas == torch.from_numpy(betas))


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_steps_out_of_range_rejected(steps):
    with pytest.raises(ValueError, match="between 1 and 1000"):
        timestep_sequence("quad", steps, 1000)


def test_unknown_spacing_rejected():
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        timestep_sequence("cosine", 10, 1000)
