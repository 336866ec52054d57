"""Stage-1 tokenizer: causality, learning, quantiser behaviour, API shapes, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from whale_pl.models.quantizer import VectorQuantizer
from whale_pl.models.tokenizer import VideoTokenizer

TINY_TOK = dict(frame_size=(32, 32), patch_size=8, dim=32, enc_depth=2, dec_depth=2, heads=2,
                codebook_size=32, code_dim=8)


def _tok(**kw) -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(**{**TINY_TOK, **kw})


def test_api_shapes_and_ranges():
    m = _tok().eval()
    x = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    ids = m.encode(x)
    assert ids.shape == (2, 3, 4, 4) and ids.dtype == torch.long
    assert m.grid_hw() == (4, 4) and m.grid_hw((64, 64)) == (8, 8)
    assert int(ids.min()) >= 0 and int(ids.max()) < m.codebook_size
    codes = m.embed(ids)
    assert codes.shape == (2, 3, 4, 4, m.code_dim)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(2, 3, 4, 4), atol=1e-5)  # l2-normalised codes
    y = m.decode(ids)
    assert y.shape == x.shape and float(y.abs().max()) <= 1.0
    # the training path quantises to the same ids as encode (eval mode: no codebook update)
    assert torch.equal(m(x).ids_BThw, ids)


def test_temporal_causality_of_tokens_and_reconstruction():
    m = _tok().eval()
    for p in m.parameters():  # make every layer matter
        p.data += 0.05 * torch.randn_like(p)
    x = torch.rand(2, 5, 3, 32, 32) * 2 - 1
    x2 = x.clone()
    x2[:, 3:] = torch.rand_like(x2[:, 3:]) * 2 - 1  # change frames 3, 4
    lat, lat2 = m._encode_latent(x), m._encode_latent(x2)
    assert torch.allclose(lat[:, :3], lat2[:, :3], atol=1e-5)
    assert not torch.allclose(lat[:, 3:], lat2[:, 3:], atol=1e-3)
    ids, ids2 = m.encode(x), m.encode(x2)
    assert torch.equal(ids[:, :3], ids2[:, :3])
    assert not torch.equal(ids[:, 3:], ids2[:, 3:])
    # the decoder is causal too: frames <= t decode the same whatever the later tokens are
    ids3 = ids.clone()
    ids3[:, 3:] = torch.randint(0, m.codebook_size, ids3[:, 3:].shape)
    assert torch.allclose(m.decode(ids)[:, :3], m.decode(ids3)[:, :3], atol=1e-5)


def test_reconstruction_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    m = _tok(codebook_size=64)
    # a fixed structured batch: smooth blobs moving over time
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    frames = []
    for b in range(2):
        clip = []
        for t in range(4):
            cx, cy = -0.5 + 0.25 * t, 0.3 * (b - 0.5)
            blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.1)
            clip.append(torch.stack([blob, 1 - blob, 0.5 * blob]) * 2 - 1)
        frames.append(torch.stack(clip))
    x = torch.stack(frames)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        out = m(x)
        mse = F.mse_loss(out.recon_BTCHW, x)
        (mse + out.commit_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(mse))
    assert losses[-1] < 0.3 * losses[0], losses[::10]


def test_dead_codes_restart_onto_data():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16, code_dim=4, restart_threshold=0.1).train()
    q.initialized.fill_(True)  # keep the random codebook (no initialisation from the first batch)
    # all data lies in a small cone: most random codes never win and must be restarted
    centre = F.normalize(torch.tensor([1.0, 1.0, 0.0, 0.0]), dim=0)
    data = F.normalize(centre + 0.05 * torch.randn(256, 4), dim=-1)
    before = q.codebook.clone()
    q.ema_count[:8] = 0.0  # codes 0..7 have had no use
    out = q(data)
    assert out.restarted >= 8
    moved = ~torch.isclose(q.codebook, before).all(dim=1)
    assert moved[:8].all()
    # the restarted codes now sit on the data (cosine to the data cone ~1)
    assert (q.codebook[:8] @ centre).min() > 0.9
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    # after a few more steps the codebook is spread over the data: many codes are used
    for _ in range(30):
        out = q(data)
    assert out.ids_N.unique().numel() >= 8
    # eval mode never changes the codebook
    q.eval()
    snap = {k: v.clone() for k, v in q.state_dict().items()}
    q(data)
    assert all(torch.equal(snap[k], v) for k, v in q.state_dict().items())


def test_ema_pulls_codes_towards_assigned_inputs():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=4, code_dim=3, decay=0.5, restart_threshold=0.0).train()
    q.initialized.fill_(True)
    target = F.normalize(q.codebook[0] + 0.3 * torch.randn(3), dim=0)
    data = target.expand(64, 3).clone()
    first = q.lookup(data)[0]
    for _ in range(10):
        q(data)
    assert F.cosine_similarity(q.codebook[first], target, dim=0) > 0.999


def test_bad_frame_sizes_error_clearly():
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        VideoTokenizer(frame_size=(30, 32), patch_size=8)
    m = _tok()
    with pytest.raises(ValueError, match=r"3x64x64 .*built for 3x32x32"):
        m.encode(torch.zeros(1, 2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        m.encode(torch.zeros(2, 3, 32, 32))


def test_encode_ignores_the_callers_autocast():
    """Later stages tokenise inside bf16-mixed training steps: their tokens must equal the float32 ones
    (a bf16 nearest-code search flips near-ties, which made tokens depend on the caller's precision)."""
    torch.manual_seed(0)
    tok = _tok().eval()
    frames = torch.rand(4, 3, 3, 32, 32) * 2 - 1
    ids = tok.encode(frames)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids_bf16 = tok.encode(frames)
    assert torch.equal(ids, ids_bf16)
