"""The one frame conversion: uint8 levels map to [-1, 1] and back exactly; bad input is named."""

from __future__ import annotations

import pytest
import torch

from whale_pl.data.frames import frames_to_uint8, frames_to_unit


def test_every_level_round_trips_and_the_ends_map_to_plus_minus_one():
    u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 16, 16)
    x = frames_to_unit(u8)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(frames_to_uint8(x), u8)
    assert torch.equal(frames_to_unit(x), x)  # float frames in range pass through
    assert torch.equal(frames_to_uint8(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0, 128, 255], dtype=torch.uint8))


def test_bad_frames_are_errors_that_name_them():
    with pytest.raises(ValueError, match=r"imagined: float frames must lie in \[-1, 1\]"):
        frames_to_unit(torch.full((2, 2), 1.5), "imagined")
    with pytest.raises(TypeError, match="real: expected uint8 or float"):
        frames_to_unit(torch.zeros(2, dtype=torch.int64), "real")
    with pytest.raises(ValueError, match="non-finite"):
        frames_to_uint8(torch.tensor([float("nan")]))
