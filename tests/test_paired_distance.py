"""benchmarks/quality.py's judge-free measure of what the rest of the model kept (issue 30 item 4):
sdlora.mini.skill.paired_distance, the mean RMS pixel difference of paired samples."""

import numpy as np
import pytest

from sdlora.mini.skill import paired_distance


def test_paired_distance_is_zero_for_the_same_samples_and_the_rms_difference_otherwise():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(3)]
    assert paired_distance(base, [b.copy() for b in base]) == 0.0
    black, white = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 255, np.uint8)
    half = black.copy()
    half[:2] = 255  # half the pixels differ by the full range: RMS sqrt(1/2)
    # exact to float rounding: the pairs' RMS values are 1, 0 and sqrt(1/2)
    assert paired_distance([white, black, half], [black, black, black]) == pytest.approx((1 + 0 + 0.5 ** 0.5) / 3, rel=1e-12)


def test_paired_distance_refuses_lists_that_do_not_pair():
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="2 images against 1"):
        paired_distance([img, img], [img])
    with pytest.raises(ValueError, match="shape"):
        paired_distance([img], [np.zeros((8, 8, 3), np.uint8)])
