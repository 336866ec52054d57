import torch

from whale_pl.models.st_block import STTransformer, append_kv


def _model(cond_dim=None):
    torch.manual_seed(0)
    return STTransformer(dim=32, depth=2, heads=4, causal=True, cond_dim=cond_dim).eval()


def test_temporal_causality():
    m = _model()
    x = torch.randn(2, 5, 6, 32)
    y = m(x)
    x2 = x.clone()
    x2[:, 3:] += torch.randn_like(x2[:, 3:])
    y2 = m(x2)
    assert torch.allclose(y[:, :3], y2[:, :3], atol=1e-5)
    assert not torch.allclose(y[:, 3:], y2[:, 3:], atol=1e-3)


def test_kv_cache_matches_full_pass():
    m = _model(cond_dim=8)
    x = torch.randn(2, 5, 6, 32)
    c = torch.randn(2, 5, 8)
    # make the adaptive norms non-trivial
    for p in m.parameters():
        p.data += 0.01 * torch.randn_like(p)
    full = m(x, c)
    cache = None
    outs = []
    for t in range(5):
        y, kv = m(x[:, t : t + 1], c[:, t : t + 1], kv_cache=cache, return_kv=True)
        cache = append_kv(cache, kv)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_conditioning_changes_output():
    m = _model(cond_dim=8)
    for p in m.parameters():
        p.data += 0.01 * torch.randn_like(p)
    x = torch.randn(1, 3, 4, 32)
    assert not torch.allclose(m(x, torch.zeros(1, 3, 8)), m(x, torch.ones(1, 3, 8)))


def test_local_spatial_mask_limits_how_far_a_change_spreads():
    """With radius r and depth L, a change at one grid position reaches only positions within L*r rows and
    columns of it in the same frame (and the same position in later frames); r = 0 keeps it where it is."""
    from whale_pl.models.st_block import local_spatial_mask

    h, w = 4, 5
    m0 = local_spatial_mask(h, w, 0)
    assert torch.equal(m0, torch.eye(h * w, dtype=torch.bool))
    assert local_spatial_mask(h, w, 1).sum(1).max() == 9 and local_spatial_mask(h, w, 1)[0].sum() == 4
    x = torch.randn(2, 3, h * w, 32)
    x2 = x.clone()
    x2[:, 1, 0] += torch.randn(32)  # position (0, 0) of frame 1 (not a constant shift: LayerNorm removes those)
    for r, reach in ((0, 0), (1, 2)):
        torch.manual_seed(0)
        m = STTransformer(dim=32, depth=2, heads=4, causal=True, spatial_mask=local_spatial_mask(h, w, r)).eval()
        moved = (m(x2) - m(x)).abs().amax(dim=(0, 3)) > 1e-5  # [T, S]
        rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
        near = (rows <= reach) & (cols <= reach)
        assert not moved[0].any()  # causal: frame 0 untouched
        assert torch.equal(moved[1], near) and torch.equal(moved[2], near)
    with torch.no_grad():
        full = _model()(x2) - _model()(x)
    assert (full[:, 1].abs().amax(dim=(0, 2)) > 1e-5).all()  # whole-frame attention: every position moves
