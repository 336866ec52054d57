"""The pure behavior VAE on random tensors: causality, KL/NLL correctness, learning."""

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence

from whale_pl.models.behavior import BehaviorModel, gaussian_kl, gaussian_nll

B, T, H, W, C, A = 3, 7, 2, 3, 8, 4


def _model(**kw) -> BehaviorModel:
    torch.manual_seed(0)
    return BehaviorModel(code_dim=C, action_dim=A, grid_tokens=H * W, z_dim=6, dim=32, depth=2, heads=4, **kw)


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, W, C, generator=g), torch.randn(B, T, A, generator=g)


def test_prior_is_causal_posterior_sees_the_future():
    m = _model().eval()
    codes, actions = _inputs()
    mu, logvar = m.prior(codes, actions)
    assert mu.shape == (B, T, 6) and logvar.shape == (B, T, 6)
    t = 3
    codes2, actions2 = codes.clone(), actions.clone()
    codes2[:, t + 1 :] = torch.randn_like(codes2[:, t + 1 :])
    actions2[:, t + 1 :] = torch.randn_like(actions2[:, t + 1 :])
    mu2, logvar2 = m.prior(codes2, actions2)
    assert torch.allclose(mu[:, : t + 1], mu2[:, : t + 1], atol=1e-5)
    assert torch.allclose(logvar[:, : t + 1], logvar2[:, : t + 1], atol=1e-5)
    assert not torch.allclose(mu[:, t + 1 :], mu2[:, t + 1 :], atol=1e-4)
    # changing the action at step t itself changes z_t (tau_{0:t} includes a_t)
    actions3 = actions.clone()
    actions3[:, t] += 1.0
    assert not torch.allclose(m.prior(codes, actions3)[0][:, t], mu[:, t], atol=1e-4)
    # the posterior is bidirectional: the last step moves it
    pmu, plv = m.posterior(codes, actions)
    assert pmu.shape == (B, 6) and plv.shape == (B, 6)
    assert not torch.allclose(m.posterior(codes2, actions2)[0], pmu, atol=1e-4)


def test_kl_and_nll_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mq, lq, mp, lp, x = (torch.randn(5, 3, generator=g) for _ in range(5))
    ref = kl_divergence(Normal(mq, (0.5 * lq).exp()), Normal(mp, (0.5 * lp).exp()))
    assert torch.allclose(gaussian_kl(mq, lq, mp, lp), ref, atol=1e-5)
    assert torch.allclose(gaussian_nll(x, mq, lq), -Normal(mq, (0.5 * lq).exp()).log_prob(x), atol=1e-5)


def _fit_then_eval(m, codes, actions, steps: int = 150):
    """Adam on the fixed batch (beta 0.02), then the loss in eval mode with posterior-mean z."""
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(steps):
        out = m.loss(codes, actions, beta=0.02)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        return m.loss(codes, actions, beta=0.1, sample=False)


def test_learns_policy_dependent_actions_on_a_fixed_batch(one_thread):
    """Two 'policies' act differently on the same observations; the latent must carry which one,
    so the loss falls and the posterior means of the two groups separate."""
    torch.manual_seed(0)
    m = _model()
    codes, _ = _inputs()
    codes = torch.cat([codes, codes], 0)  # same observations for both policies
    w = torch.randn(C, A)
    base = codes.mean(dim=(2, 3)) @ w
    actions = torch.cat([base[:B] + 1.5, base[B:] - 1.5], 0)
    first = m.loss(codes, actions, beta=0.1).loss.item()
    out = _fit_then_eval(m, codes, actions)
    assert out.loss.item() < first - 2.0
    assert out.action_mse.item() < 0.1
    mu = out.post_mu_BZ
    gap = (mu[:B].mean(0) - mu[B:].mean(0)).norm()
    spread = mu[:B].std(0).norm() + mu[B:].std(0).norm()
    assert gap > 2 * spread
    # the prior, which sees the actions taken so far, predicts the same separation by the end
    assert out.action_mse_prior.item() < 0.2


def test_loss_is_nll_plus_beta_kl():
    m = _model()
    codes, actions = _inputs()
    out = m.loss(codes, actions, beta=0.5, sample=False)
    assert torch.isclose(out.loss, out.nll + 0.5 * out.kl) and out.kl > 0


def test_action_nll_is_the_decoded_diagonal_gaussian():
    """The action NLL per step is -log N(a_t; decoder mean, decoder variance) over all action dims, and the
    loss's NLL is its mean with the posterior-mean z at every step."""
    m = _model(decoder_prev_action=True).eval()
    codes, actions = _inputs()
    feat, z = m.pool(codes), torch.randn(B, T, 6)
    nll_BT, mean_BTA = m.action_nll(feat, z, actions)
    mu, logvar = m.decode(feat, z, actions)
    assert torch.equal(mean_BTA, mu)
    assert torch.allclose(nll_BT, -Independent(Normal(mu, (0.5 * logvar).exp()), 1).log_prob(actions), atol=1e-5)
    out = m.loss(codes, actions, beta=0.1, sample=False)
    z_q = m.posterior(codes, actions)[0][:, None].expand(-1, T, -1)
    assert torch.allclose(out.nll, m.action_nll(feat, z_q, actions)[0].mean(), atol=1e-6)


def test_kl_balance_keeps_the_value_and_shifts_the_gradient():
    m = _model()
    codes, actions = _inputs()
    torch.manual_seed(3)
    plain = m.loss(codes, actions, beta=1.0, sample=False)
    torch.manual_seed(3)
    bal = m.loss(codes, actions, beta=1.0, sample=False, kl_balance=0.8)
    assert torch.isclose(plain.kl, bal.kl, rtol=1e-5)

    def grads(out):
        m.zero_grad()
        out.kl.backward()
        return (m.prior_head.weight.grad.norm().item(), m.post_head.weight.grad.norm().item())

    gp, gq = grads(m.loss(codes, actions, beta=1.0, sample=False))
    bp, bq = grads(m.loss(codes, actions, beta=1.0, sample=False, kl_balance=0.8))
    assert bp == pytest.approx(0.8 * gp, rel=1e-4) and bq == pytest.approx(0.2 * gq, rel=1e-4)


def test_gridpool_pools_then_projects_like_project_then_pool():
    """GridPool averages per head first and projects each head's pool after: the same feature as
    projecting every grid token and averaging (value is affine, attention weights sum to 1)."""
    from einops import rearrange

    from whale_pl.models.behavior import GridPool

    torch.manual_seed(0)
    g = GridPool(C, 32, H * W, heads=4)
    codes = torch.randn(B, T, H, W, C)
    x = g.norm(g.inp(rearrange(codes, "b t h w c -> (b t) (h w) c")) + g.pos_SD)
    attn = g.score(x).softmax(dim=1)
    v = rearrange(g.value(x), "n s (heads e) -> n s heads e", heads=4)
    ref = rearrange(g.out(rearrange(torch.einsum("nsh,nshe->nhe", attn, v), "n h e -> n (h e)")), "(b t) d -> b t d", b=B)
    assert torch.allclose(g(codes), ref, atol=1e-5)


def test_decoder_prev_action_sees_a_prev_never_a_t():
    m = _model(decoder_prev_action=True).eval()
    codes, actions = _inputs()
    feat = m.pool(codes)
    z = torch.randn(B, T, 6)
    mu, logvar = m.decode(feat, z, actions)
    t = 3
    later = actions.clone()
    later[:, t:] += 2.0  # a_t and everything after: step t's prediction must not move
    mu2, logvar2 = m.decode(feat, z, later)
    assert torch.equal(mu[:, : t + 1], mu2[:, : t + 1]) and torch.equal(logvar[:, : t + 1], logvar2[:, : t + 1])
    assert not torch.allclose(mu[:, t + 1], mu2[:, t + 1], atol=1e-4)  # a_t does reach step t + 1
    prev = actions.clone()
    prev[:, t - 1] += 2.0
    assert not torch.allclose(m.decode(feat, z, prev)[0][:, t], mu[:, t], atol=1e-4)
    # the loss's NLL at step t therefore cannot be lowered by peeking: a_t enters only as the target
    assert _model(decoder_prev_action=False).decoder[0].in_features + A == m.decoder[0].in_features


def test_decoder_prev_action_keeps_the_prior_causal_and_learns(one_thread):
    """With a_{t-1} in the decoder the prior stays causal, and the latent still has to carry what
    a_{t-1} does not tell: two policies with the same smooth actions but different jitter."""
    m = _model(decoder_prev_action=True).eval()
    codes, actions = _inputs()
    mu = m.prior(codes, actions)[0]
    a2 = actions.clone()
    a2[:, 4:] = torch.randn_like(a2[:, 4:])
    assert torch.allclose(m.prior(codes, a2)[0][:, :4], mu[:, :4], atol=1e-5)

    torch.manual_seed(0)
    m = _model(decoder_prev_action=True)
    codes = torch.cat([codes, codes], 0)
    g = torch.Generator().manual_seed(5)
    smooth = torch.cumsum(torch.full((2 * B, T, A), 0.1), dim=1)
    jitter = torch.randn(2 * B, T, A, generator=g) * torch.tensor([1.0] * B + [0.05] * B)[:, None, None]
    actions = smooth + jitter
    out = _fit_then_eval(m, codes, actions)
    q = out.post_mu_BZ
    assert (q[:B].mean(0) - q[B:].mean(0)).norm() > 2 * (q[:B].std(0).norm() + q[B:].std(0).norm())
