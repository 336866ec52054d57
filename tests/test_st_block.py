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
        cache = kv if cache is None else append_kv(cache, kv)
        outs.append(y)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_conditioning_changes_output():
    m = _model(cond_dim=8)
    for p in m.parameters():
        p.data += 0.01 * torch.randn_like(p)
    x = torch.randn(1, 3, 4, 32)
    assert not torch.allclose(m(x, torch.zeros(1, 3, 8)), m(x, torch.ones(1, 3, 8)))

