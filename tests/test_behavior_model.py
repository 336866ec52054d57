"""The pure behavior VAE on random tensors: causality, KL/NLL correctness, learning."""

import math

import pytest
import torch
from torch.distributions import Laplace, Normal, kl_divergence

from whale_pl.models.behavior import BehaviorModel, gaussian_kl, gaussian_nll, laplace_nll

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


def test_bad_shapes_name_the_mismatch():
    m = _model()
    codes, actions = _inputs()
    with pytest.raises(ValueError, match="grid_tokens=6"):
        m.prior(torch.randn(B, T, 3, 3, C), actions)
    with pytest.raises(ValueError, match=r"actions must be \[B,T,4\]"):
        m.prior(codes, actions[..., :3])
    with pytest.raises(ValueError, match="disagree"):
        m.posterior(codes, actions[:, :-1])


def _fit_then_eval(m, codes, actions, steps: int = 150, free_bits: float = 0.05, **loss_kw):
    """Adam on the fixed batch (beta 0.1, free bits 0.05 unless given), then the loss in eval mode with
    posterior-mean z; ``loss_kw`` (e.g. ``prior_decode``) go to both."""
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(steps):
        out = m.loss(codes, actions, beta=0.1, free_bits=free_bits, **loss_kw)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        return m.loss(codes, actions, beta=0.1, sample=False, **loss_kw)


def _assert_learns_which_of_two_offsets(model_kw: dict, codes) -> None:
    """A fresh model (``model_kw``) fitted on a fixed batch where two 'policies' add opposite offsets to the same
    observation-driven actions: the posterior means of the two groups separate and the decoder reconstructs them."""
    torch.manual_seed(0)
    m = _model(**model_kw)
    codes = torch.cat([codes, codes], 0)
    base = codes.mean(dim=(2, 3)) @ torch.randn(C, A)
    actions = torch.cat([base[:B] + 1.5, base[B:] - 1.5], 0)
    out = _fit_then_eval(m, codes, actions)
    q = out.post_mu_BZ
    assert (q[:B].mean(0) - q[B:].mean(0)).norm() > 2 * (q[:B].std(0).norm() + q[B:].std(0).norm())
    assert out.action_mse.item() < 0.1


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


def test_free_bits_floor_the_kl_term():
    m = _model()
    codes, actions = _inputs()
    out = m.loss(codes, actions, beta=1.0, free_bits=100.0, sample=False)
    assert torch.isclose(out.kl_loss, torch.tensor(100.0 * 6))
    out0 = m.loss(codes, actions, beta=1.0, free_bits=0.0, sample=False)
    assert torch.isclose(out0.kl_loss, out0.kl)


def test_kl_balance_keeps_the_value_and_shifts_the_gradient():
    m = _model()
    codes, actions = _inputs()
    torch.manual_seed(3)
    plain = m.loss(codes, actions, beta=1.0, sample=False)
    torch.manual_seed(3)
    bal = m.loss(codes, actions, beta=1.0, sample=False, kl_balance=0.8)
    assert torch.isclose(plain.kl_loss, bal.kl_loss, rtol=1e-5)

    def grads(out):
        m.zero_grad()
        out.kl_loss.backward()
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
    feat = m.frame_features(codes)
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
    with pytest.raises(ValueError, match="decoder_prev_action"):
        m.decode(feat, z)
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


def test_mixture_nll_and_moments_match_torch_distributions():
    from torch.distributions import Categorical, Independent, MixtureSameFamily

    m = _model(action_likelihood="mixture", mixture_k=3)
    codes, actions = _inputs()
    feat, z = m.frame_features(codes), torch.randn(B, T, 6)
    nll_BT, mean_BTA = m.action_nll(feat, z, actions)
    logw, mu, logvar = m._mixture(m._decoder_raw(feat, z, actions))
    ref = MixtureSameFamily(Categorical(logits=logw), Independent(Normal(mu, (0.5 * logvar).exp()), 1))
    assert torch.allclose(nll_BT, -ref.log_prob(actions), atol=1e-5)
    d_mu, d_logvar = m.decode(feat, z, actions)
    assert torch.allclose(d_mu, ref.mean, atol=1e-5) and torch.allclose(mean_BTA, ref.mean, atol=1e-5)
    assert torch.allclose(d_logvar.exp(), ref.variance, rtol=1e-4)
    with pytest.raises(ValueError, match="action_likelihood"):
        _model(action_likelihood="cauchy")


def test_mixture_models_random_steps_a_gaussian_cannot(one_thread):
    """An epsilon-random policy: 80% of steps exactly one action, 20% uniform over the whole box. A single
    Gaussian must spread over both; the mixture puts a narrow component on the policy's action and a wide
    one on the random steps, so after the same training its NLL is far lower."""
    n, t = 4, 64
    codes = torch.randn(1, 1, H, W, C).expand(n, t, H, W, C).contiguous()  # one observation: no step stands out
    g = torch.Generator().manual_seed(7)
    actions = torch.full((n, t, A), 0.3)
    rand = torch.rand(n, t, 1, generator=g) < 0.2
    actions = torch.where(rand, torch.rand(n, t, A, generator=g) * 2 - 1, actions)
    nll = {}
    for kind in ("gaussian", "mixture"):
        m = _model(action_likelihood=kind)
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        for _ in range(400):  # as the stage trains: gradients clipped at norm 1
            out = m.loss(codes, actions, beta=0.1, free_bits=0.05)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
        with torch.no_grad():
            nll[kind] = m.eval().loss(codes, actions, beta=0.1, sample=False).nll.item()
    assert nll["mixture"] < nll["gaussian"] - 2.0, nll


def test_decoder_state_reaches_only_the_decoder():
    """With ``decoder_state_dim`` the decoder reads the low-dimensional state; the posterior and prior do not
    (so z need not carry what the state shows, and stage 3's z_t stays a function of frames and actions)."""
    S = 5
    m = _model(decoder_state_dim=S).eval()
    codes, actions = _inputs()
    state = torch.randn(B, T, S)
    feat, z = m.frame_features(codes), torch.randn(B, T, 6)
    mu, _ = m.decode(feat, z, actions, state)
    assert not torch.allclose(m.decode(feat, z, actions, state + 1.0)[0], mu, atol=1e-4)
    assert m.post_in.in_features == m.prior_in.in_features == _model().post_in.in_features
    with pytest.raises(ValueError, match=r"decoder_state_dim=5.*\[B,T,5\]"):
        m.decode(feat, z, actions)
    out = m.loss(codes, actions, beta=0.1, state_BTS=state, sample=False)
    assert torch.isfinite(out.loss)


def test_window_mean_encoder_is_causal_and_learns(one_thread):
    """``encoder='window_mean'``: z_t is the running mean of a local MLP over the last ``window`` steps, so the
    prior stays causal, and at the clip's last step the prior averages the same kind of windows the posterior
    does; on a fixed batch the latent still comes to carry which of two policies acted."""
    m = _model(encoder="window_mean", window=3).eval()
    codes, actions = _inputs()
    mu = m.prior(codes, actions)[0]
    t = 3
    c2, a2 = codes.clone(), actions.clone()
    c2[:, t + 1 :] += 1.0
    a2[:, t + 1 :] += 1.0
    mu2 = m.prior(c2, a2)[0]
    assert torch.equal(mu[:, : t + 1], mu2[:, : t + 1]) and not torch.allclose(mu[:, t + 1 :], mu2[:, t + 1 :], atol=1e-4)
    assert not torch.allclose(m.posterior(c2, a2)[0], m.posterior(codes, actions)[0], atol=1e-4)
    with pytest.raises(ValueError, match="encoder"):
        _model(encoder="lstm")

    _assert_learns_which_of_two_offsets(dict(encoder="window_mean", window=3), codes)


def test_decoder_z_modulate_reaches_the_actions_only_through_the_deviation_parameters():
    """``decoder_z='modulate'``: the decoder MLP never reads z (so z cannot carry the scene for it); z sets
    the scale, bias, noise, outlier rate and inertia of a two-component likelihood, whose NLL and moments
    match torch's mixture."""
    from torch.distributions import Categorical, Independent, MixtureSameFamily

    m = _model(decoder_z="modulate", decoder_prev_action=True).eval()
    assert m.decoder[0].in_features == _model(decoder_prev_action=True).decoder[0].in_features - 6 - A  # no z, a_{t-1}
    codes, actions = _inputs()
    feat, z = m.frame_features(codes), torch.randn(B, T, 6)
    nll_BT, mean_BTA = m.action_nll(feat, z, actions)
    logw, mu, logvar = m._modulated(feat, z, actions)
    ref = MixtureSameFamily(Categorical(logits=logw), Independent(Normal(mu, (0.5 * logvar).exp()), 1))
    assert torch.allclose(nll_BT, -ref.log_prob(actions), atol=1e-5)
    d_mu, d_logvar = m.decode(feat, z, actions)
    assert torch.allclose(d_mu, ref.mean, atol=1e-5) and torch.allclose(d_logvar.exp(), ref.variance, rtol=1e-4)
    assert not torch.allclose(m.decode(feat, z + 1.0, actions)[0], d_mu, atol=1e-4)
    with torch.no_grad():
        m.modulator.weight.zero_()  # the linear map is z's only way in
    assert torch.equal(m.decode(feat, z + 1.0, actions)[0], m.decode(feat, z, actions)[0])
    assert not torch.allclose(m.decode(feat, z, actions + 1.0)[0], m.decode(feat, z, actions)[0], atol=1e-4)
    with torch.no_grad():
        m.modulator.bias[-1] = -50.0  # no inertia: a_{t-1} has no other way into the decoder
    assert torch.equal(m.decode(feat, z, actions + 1.0)[0], m.decode(feat, z, actions)[0])
    single = _model(decoder_z="modulate", modulate_outliers=False)  # one Gaussian: the outlier weight is 0
    logw_c, mu_c, lv_c = single._modulated(feat, z, actions)
    assert logw_c.shape == (B, T, 1) and torch.equal(logw_c, torch.zeros(B, T, 1))
    assert not hasattr(single, "outlier_logvar_A")  # no parameter left without a gradient (DDP)
    mu1, lv1 = single.decode(feat, z, actions)
    assert torch.allclose(mu1, mu_c[..., 0, :], atol=1e-5) and torch.allclose(lv1, lv_c[..., 0, :], atol=1e-4)
    with pytest.raises(ValueError, match="decoder_z"):
        _model(decoder_z="film")
    with pytest.raises(ValueError, match="action_likelihood='gaussian'"):
        _model(decoder_z="modulate", action_likelihood="mixture")


def test_decoder_z_modulate_learns_which_policy_acted(one_thread):
    """Same observations, two policies: one the base policy scaled by 0.3 plus noise, the other the base policy
    itself; only z can tell the decoder which, so the loss falls, the posterior means of the two groups separate
    along a line, and the prior keeps causality."""
    torch.manual_seed(0)
    m = _model(decoder_z="modulate", decoder_prev_action=True)
    codes, _ = _inputs()
    codes = torch.cat([codes, codes], 0)
    base = codes.mean(dim=(2, 3)) @ torch.randn(C, A)
    g = torch.Generator().manual_seed(3)
    actions = torch.cat([0.3 * base[:B] + 0.3 * torch.randn(B, T, A, generator=g), base[B:]], 0)
    first = m.loss(codes, actions, beta=0.1).loss.item()
    out = _fit_then_eval(m, codes, actions, steps=300)
    assert out.loss.item() < first - 2.0
    q = out.post_mu_BZ  # separated along the line between the group means (what a linear probe reads)
    d = q[:B].mean(0) - q[B:].mean(0)
    p = q @ (d / d.norm())
    assert p[:B].mean() - p[B:].mean() > 2 * (p[:B].std() + p[B:].std())
    mu = m.prior(codes, actions)[0]
    a2 = actions.clone()
    a2[:, 4:] += 1.0
    assert torch.allclose(m.prior(codes, a2)[0][:, :4], mu[:, :4], atol=1e-5)


def test_prior_decode_explains_a_t_with_z_from_the_history_before_it():
    """The prior-decoded NLL of step t uses z_{t-1}: changing the last action changes only that step's target, not
    the z that explains it -- the value equals the NLL of the new actions under the old actions' prior."""
    m = _model(decoder_prev_action=True).eval()
    codes, actions = _inputs()
    out = m.loss(codes, actions, beta=0.1, sample=False, prior_decode=1.0)
    assert out.prior_nll.item() > 0 and torch.isclose(out.loss, out.nll + 0.1 * out.kl_loss + out.prior_nll)
    assert m.loss(codes, actions, beta=0.1, sample=False).prior_nll.item() == 0.0  # off by default
    feat = m.frame_features(codes)

    def nll_with_z_from(acts_for_z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mu = m.prior(codes, acts_for_z)[0]
        z = torch.cat([mu[:, :1], mu[:, :-1]], 1)
        return m.action_nll(feat, z, target)[0][:, 1:].mean()

    assert torch.allclose(out.prior_nll, nll_with_z_from(actions, actions), atol=1e-5)
    a2 = actions.clone()
    a2[:, -1] += 2.0
    got = m.loss(codes, a2, beta=0.1, sample=False, prior_decode=1.0).prior_nll
    assert torch.allclose(got, nll_with_z_from(actions, a2), atol=1e-5)  # a_{T-1} never reached its own z
    assert not torch.allclose(got, out.prior_nll, atol=1e-3)


def test_prior_decode_trains_the_prior_to_name_the_policy(one_thread):
    """Same observations, two policies (offset +1.5 / -1.5): with the prior-decoded term the prior's own z_t (not only
    the posterior's) carries which policy acted once it has seen a few actions, and the prior-decoded NLL falls."""
    torch.manual_seed(0)
    m = _model()
    codes, _ = _inputs()
    codes = torch.cat([codes, codes], 0)
    base = codes.mean(dim=(2, 3)) @ torch.randn(C, A)
    g = torch.Generator().manual_seed(3)
    actions = torch.cat([base[:B] + 1.5, base[B:] - 1.5], 0) + 0.1 * torch.randn(2 * B, T, A, generator=g)
    first = m.loss(codes, actions, beta=0.1, sample=False, prior_decode=1.0).prior_nll.item()
    out = _fit_then_eval(m, codes, actions, free_bits=0.0, prior_decode=1.0)
    assert out.prior_nll.item() < first - 2.0
    z = out.prior_mu_BTZ[:, 2:].flatten(0, 1)  # every step t >= 2 of both groups
    y = torch.arange(2 * B).repeat_interleave(T - 2) < B
    d = z[y].mean(0) - z[~y].mean(0)
    p = z @ (d / d.norm())
    assert p[y].mean() - p[~y].mean() > 2 * (p[y].std() + p[~y].std())


def test_marginal_nll_is_a_normalised_density_of_actions_and_their_changes():
    """p(a | z) is the Gaussian of its head; p(d | z) ~ exp(-|d|/b - d^2/(2 s^2)) integrates to 1 (by quadrature)."""
    m = _model(marginal_head=True)
    with torch.no_grad():
        m.marginal.weight.zero_()
        m.marginal.bias.copy_(torch.tensor([0.2] * A + [-0.5] * A + [-1.2] * A + [-0.3] * A))
    z = torch.zeros(1, 6)
    x = torch.linspace(-12.0, 12.0, 240001, dtype=torch.float64)
    # a clip [a_0 = 0, a_1 = x]: the t = 1 NLL is -log N(x; 0.2, e^-0.5) - log p_d(x) in each dim
    acts = torch.zeros(len(x), 2, A)
    acts[:, 1] = x[:, None].float()
    nll_1 = m.marginal_nll(z.expand(len(x), -1), acts)[:, 1]
    gauss = -Normal(0.2, math.exp(-0.25)).log_prob(x)
    log_pd = -(nll_1.double() - A * gauss) / A
    assert torch.isclose(torch.trapezoid(log_pd.exp(), x), torch.tensor(1.0, dtype=torch.float64), atol=1e-3)
    with pytest.raises(ValueError, match="marginal_head"):
        _model().marginal_nll(z, acts[:2])


def _jitter_then_sticky(n: int, L: int = 48, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes [2n, L, H, W, C] (one clip's, for all) and actions [2n, L, A], N(0, 1) at every step in both groups: the
    first n draw a fresh action each step (jitter), the last n keep theirs and redraw it at rate 0.25 (sticky jumps)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(1, L, H, W, C, generator=g).expand(2 * n, -1, -1, -1, -1)
    fresh = torch.randn(2 * n, L, A, generator=g)
    redraw = torch.rand(n, L, 1, generator=g) < 0.25
    redraw[:, 0] = True
    last = torch.where(redraw, torch.arange(L)[None, :, None], 0).cummax(dim=1).values  # last redraw step
    return codes, torch.cat([fresh[:n], fresh[n:].gather(1, last.expand(-1, -1, A))], 0)


def test_marginal_decode_tells_sticky_jumps_from_jitter_with_the_same_action_marginal(one_thread):
    """Same observations, and actions ~ N(0, 1) at every step in both groups: one group draws a fresh action each
    step (jitter), the other keeps its action and redraws it at random (rate 0.25: sticky jumps). Only the changes
    a_t - a_{t-1} differ; with the observation-free term the posterior means of the two groups separate along a
    line, and that term falls well below its start."""
    torch.manual_seed(0)
    m = _model(marginal_head=True)
    n = 4
    codes, actions = _jitter_then_sticky(n)
    first = m.loss(codes, actions, beta=0.1, sample=False, marginal_decode=1.0).marginal_nll.item()
    out = _fit_then_eval(m, codes, actions, steps=200, free_bits=0.0, marginal_decode=1.0)
    assert out.marginal_nll.item() < first - 2.0
    q = out.post_mu_BZ
    d = q[:n].mean(0) - q[n:].mean(0)
    p = q @ (d / d.norm())
    assert p[:n].mean() - p[n:].mean() > 2 * (p[:n].std() + p[n:].std())


def test_encoder_frames_off_reads_the_actions_alone():
    """encoder_frames=False: posterior and prior ignore the frames (and stay causal); the decoder still reads o_t."""
    m = _model(encoder_frames=False).eval()
    codes, actions = _inputs()
    other = torch.randn_like(codes)
    assert torch.equal(m.posterior(codes, actions)[0], m.posterior(other, actions)[0])
    assert torch.equal(m.prior(codes, actions)[0], m.prior(other, actions)[0])
    a2 = actions.clone()
    a2[:, 4:] += 1.0
    assert torch.allclose(m.prior(codes, a2)[0][:, :4], m.prior(codes, actions)[0][:, :4], atol=1e-5)
    assert not torch.allclose(m.prior(codes, a2)[0][:, 4:], m.prior(codes, actions)[0][:, 4:], atol=1e-4)
    z = torch.zeros(B, T, 6)
    assert not torch.allclose(m.decode(m.frame_features(codes), z)[0], m.decode(m.frame_features(other), z)[0])


def test_laplace_likelihood_matches_torch_and_learns(one_thread):
    """action_likelihood='laplace': the NLL is torch's Laplace with the decoded variance; the model still learns
    which of two policies acted."""
    g = torch.Generator().manual_seed(0)
    x, mu, lv = (torch.randn(5, 3, generator=g) for _ in range(3))
    assert torch.allclose(laplace_nll(x, mu, lv), -Laplace(mu, (0.5 * lv).exp() / math.sqrt(2)).log_prob(x), atol=1e-5)
    m = _model(action_likelihood="laplace")
    codes, _ = _inputs()
    feat, z = m.frame_features(codes), torch.zeros(B, T, 6)
    a = torch.randn(B, T, A, generator=g)
    mean, logvar = m.decode(feat, z)
    assert torch.allclose(m.action_nll(feat, z, a)[0], laplace_nll(a, mean, logvar).sum(-1), atol=1e-5)
    torch.manual_seed(0)
    codes = torch.cat([codes, codes], 0)
    base = codes.mean(dim=(2, 3)) @ torch.randn(C, A)
    actions = torch.cat([base[:B] + 1.5, base[B:] - 1.5], 0)
    first = m.loss(codes, actions, beta=0.1).loss.item()
    out = _fit_then_eval(m, codes, actions)
    assert out.loss.item() < first - 2.0 and out.action_mse.item() < 0.1
    with pytest.raises(ValueError, match="'laplace'"):
        _model(action_likelihood="cauchy")


def test_change_nll_scores_each_action_change_bin_with_the_z_before_it():
    """With z's weights zeroed, -log p is the log-softmax of the bias at the bin each change a_t - a_{t-1} falls in
    (edges: (lo, hi] per bin), summed over dims from t = 1; from the prior, step t's change is read with z_{t-1}, so
    changing the last action changes its target only."""
    edges = (-1.0, 0.0, 1.0)
    m = _model(change_edges=edges).eval()
    with torch.no_grad():
        m.change.weight.zero_()
        m.change.bias.copy_(torch.arange(A * 4, dtype=torch.float32) / 7)
    logp_AK = (torch.arange(A * 4, dtype=torch.float32) / 7).view(A, 4).log_softmax(-1)
    acts = torch.zeros(1, 4, A)
    acts[0, 1] = torch.tensor([-3.0, -1.0, 0.5, 2.0])  # changes at t = 1 fall in bins 0, 0, 2, 3
    acts[0, 2] = acts[0, 1] + torch.tensor([0.0, 0.2, -0.4, 1.0])  # bins 1, 2, 1, 2
    acts[0, 3] = acts[0, 2]  # bins 1 x 4
    want = torch.stack([logp_AK[torch.arange(A), torch.tensor(b)].sum() for b in
                        ([0, 0, 2, 3], [1, 2, 1, 2], [1, 1, 1, 1])])
    got = m.change_nll(torch.randn(1, 4, 6), acts)
    assert torch.allclose(got[0], -want, atol=1e-6)
    codes, actions = _inputs()
    out = m.loss(codes, actions, beta=0.1, sample=False, change_decode_prior=1.0)
    assert torch.isclose(out.loss, out.nll + 0.1 * out.kl_loss + out.change_nll)
    with torch.no_grad():
        m.change.weight.normal_()
    out = m.loss(codes, actions, beta=0.1, sample=False, change_decode_prior=1.0)
    mu = m.prior(codes, actions)[0]
    z_prev = torch.cat([mu[:, :1], mu[:, :-1]], 1)
    assert torch.allclose(out.change_nll, m.change_nll(z_prev, actions).mean(), atol=1e-5)
    a2 = actions.clone()
    a2[:, -1] += 2.0
    got = m.loss(codes, a2, beta=0.1, sample=False, change_decode_prior=1.0).change_nll
    assert torch.allclose(got, m.change_nll(z_prev, a2).mean(), atol=1e-5)  # a_{T-1} never reached its own z
    assert m.loss(codes, actions, beta=0.1, sample=False).change_nll.item() == 0.0  # off by default
    with pytest.raises(ValueError, match="change_edges"):
        _model().change_nll(z_prev, actions)
    with pytest.raises(ValueError, match="increasing"):
        _model(change_edges=(0.5, 0.1))


def test_change_decode_prior_tells_sticky_jumps_from_jitter_with_the_same_action_marginal(one_thread):
    """Same observations, actions ~ N(0, 1) at every step in both groups: one draws a fresh action each step, the
    other keeps its action and redraws it at rate 0.25. Only the changes differ; trained with the change histogram
    read from the prior's z_{t-1} alone (no posterior term), the prior's own z_t separates the groups once it has
    seen some steps, and the term falls."""
    torch.manual_seed(0)
    m = _model(change_edges=(-2.0, -1.0, -0.25, 0.25, 1.0, 2.0))
    n, L = 4, 48
    codes, actions = _jitter_then_sticky(n, L)
    first = m.loss(codes, actions, beta=0.1, sample=False, change_decode_prior=1.0).change_nll.item()
    out = _fit_then_eval(m, codes, actions, steps=200, free_bits=0.0, change_decode_prior=1.0)
    assert out.change_nll.item() < first - 1.0
    z = out.prior_mu_BTZ[:, 16:].flatten(0, 1)
    y = torch.arange(2 * n).repeat_interleave(L - 16) < n
    d = z[y].mean(0) - z[~y].mean(0)
    p = z @ (d / d.norm())
    cut = 0.5 * (p[y].mean() + p[~y].mean())  # a linear read-out: the midpoint between the groups' means
    assert ((p > cut) == y).float().mean() > 0.8  # 0.55 untrained


def test_level_histogram_adds_the_bins_of_abs_a_from_the_same_z():
    """With ``level_edges`` the change term also scores |a_t|'s bin (t >= 1) per dim, from the same z; it needs the change term."""
    m = _model(change_edges=(0.0,), level_edges=(0.5, 1.0)).eval()
    with torch.no_grad():
        m.change.weight.zero_()
        m.change.bias.zero_()  # 2 change bins, uniform: log 2 per dim
        m.level.weight.zero_()
        m.level.bias.copy_(torch.tensor([0.0, 1.0, 2.0] * A))
    logp_K = torch.tensor([0.0, 1.0, 2.0]).log_softmax(0)
    acts = torch.zeros(1, 2, A)
    acts[0, 1] = torch.tensor([0.2, -0.7, 1.5, -1.0])  # |a_1| bins 0, 1, 2, 1
    got = m.change_nll(torch.randn(1, 2, 6), acts)
    want = A * math.log(2.0) - logp_K[torch.tensor([0, 1, 2, 1])].sum()
    assert torch.allclose(got[0, 0], want, atol=1e-6)
    with pytest.raises(ValueError, match="needs change_edges"):
        _model(level_edges=(0.5,))


def test_window_shared_prior_is_the_posterior_on_the_prefix():
    """``window_shared``: the prior at step t is the posterior computed on steps 0..t (same window MLP and head), so it
    is causal and ends at the posterior; it needs the window_mean encoder."""
    m = _model(encoder="window_mean", window=3, window_shared=True).eval()
    codes, actions = _inputs()
    mu_p, lv_p = m.prior(codes, actions)
    for t in (0, 3, T - 1):
        mu_q, lv_q = m.posterior(codes[:, : t + 1], actions[:, : t + 1])
        assert torch.allclose(mu_p[:, t], mu_q, atol=1e-5) and torch.allclose(lv_p[:, t], lv_q, atol=1e-5)
    assert not torch.allclose(_model(encoder="window_mean", window=3).eval().prior(codes, actions)[0][:, -1],
                              m.posterior(codes, actions)[0], atol=1e-3)  # not shared: a second network
    with pytest.raises(ValueError, match="window_shared needs encoder='window_mean'"):
        _model(window_shared=True)


def test_prior_pooled_is_what_the_window_mean_prior_head_reads():
    """``prior_pooled``: the running mean of the prior's window features; its z head maps it to the prior (so a probe
    on it bounds a linear probe on z_t), it is causal, and it is refused for the transformer encoder."""
    m = _model(encoder="window_mean", window=3, action_deltas=True).eval()
    codes, actions = _inputs()
    pooled = m.prior_pooled(codes, actions)
    mu, logvar = m.prior(codes, actions)
    assert pooled.shape == (B, T, m.dim)
    assert torch.allclose(m._split(m.prior_head(pooled))[0], mu, atol=1e-6)
    a2 = actions.clone()
    a2[:, 4:] += 1.0
    assert torch.equal(m.prior_pooled(codes, a2)[:, :4], pooled[:, :4])
    with pytest.raises(ValueError, match="prior_pooled needs encoder='window_mean'"):
        _model().prior_pooled(codes, actions)


def test_encoder_stats_heads_read_the_running_moments_and_change_histogram(one_thread):
    """``encoder_stats``: beside the learned window features, the z heads read the running mean of fixed per-step
    statistics -- a, a^2, |a|, |da|, da^2 and the one-hot bin of da over CHANGE_EDGES -- so the prior at step t holds
    the moments and the change histogram of steps <= t exactly (checked against numpy); the posterior reads the whole
    clip's; the prior stays causal, with the transformer encoder too; and the latent still learns which policy acted."""
    import numpy as np

    from whale_pl.models.behavior import CHANGE_EDGES

    m = _model(encoder="window_mean", window=3, action_deltas=True, encoder_stats=True).eval()
    codes, actions = _inputs()
    pooled = m.prior_pooled(codes, actions)
    S = BehaviorModel.stats_dim(A)
    assert pooled.shape == (B, T, m.dim + S)
    assert torch.allclose(m._split(m.prior_head(pooled))[0], m.prior(codes, actions)[0], atol=1e-6)
    a = actions.double().numpy()
    da = np.concatenate([np.zeros_like(a[:, :1]), np.diff(a, axis=1)], axis=1)
    steps = np.arange(1, T + 1)[None, :, None]
    moments = [a, a**2, np.abs(a), np.abs(da), da**2]
    bins = np.searchsorted(np.asarray(CHANGE_EDGES), da, side="left")  # (lo, hi] bins, as torch.bucketize
    hist = np.eye(len(CHANGE_EDGES) + 1)[bins].reshape(B, T, -1)
    want = np.concatenate([np.cumsum(x, 1) / steps for x in moments] + [np.cumsum(hist, 1) / steps], -1)
    assert np.allclose(pooled[..., m.dim :].detach().double().numpy(), want, atol=1e-5)
    assert np.allclose(hist.reshape(B, T, A, -1).sum(-1), 1.0)  # one bin per dim and step
    post_in = m._with_stats(torch.zeros(B, m.dim), actions, running=False)[:, m.dim :]
    assert np.allclose(post_in.detach().double().numpy(), want[:, -1], atol=1e-5)  # the posterior: the whole clip's statistics
    a2 = actions.clone()
    a2[:, 4:] += 1.0
    assert torch.equal(m.prior(codes, a2)[0][:, :4], m.prior(codes, actions)[0][:, :4])
    tf = _model(encoder_stats=True).eval()  # the transformer encoder: its heads read the same statistics
    assert tf.prior_head.in_features == tf.post_head.in_features == tf.dim + S
    mu_tf = tf.prior(codes, actions)[0]
    assert torch.equal(tf.prior(codes, a2)[0][:, :4], mu_tf[:, :4]) and not torch.allclose(tf.prior(codes, a2)[0], mu_tf)

    _assert_learns_which_of_two_offsets(dict(encoder="window_mean", window=3, encoder_stats=True), codes)


def test_encoder_stats_groups_rates_turns_std_match_numpy(one_thread):
    """``encoder_stats: [moments, rates, turns, std]`` (any order): ``rates`` undoes the data's action normalisation on
    the rate dims (not the gripper) and gives, per step, |raw a| at the bound and near zero per dim, whether any dim
    jumped by more than half the bound, the norm and its square; ``turns`` da_t * da_{t-1} and whether it is < 0;
    ``std`` the standard deviation of a over the same steps. The prior's z head reads them over steps <= t and the
    posterior's over the clip (both checked against numpy); the change histogram is left out; bad groups, rate dims
    or a missing normalisation are refused; and the latent still learns which of two policies acted."""
    import numpy as np

    from whale_pl.models.behavior import DEFAULT_STAT_GROUPS, stat_groups

    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 0.8, 0.6, 1.0]
    kw = dict(encoder="window_mean", window=3, action_deltas=True, encoder_stats=["std", "turns", "rates", "moments"],
              action_mean=mean, action_std=std, rate_dims=[0, 1, 2])
    m = _model(**kw).eval()
    assert m.stat_groups == ("moments", "rates", "turns", "std") and stat_groups(True) == DEFAULT_STAT_GROUPS
    g = torch.Generator().manual_seed(3)
    raw = (1.5 * torch.randn(B, T, A, generator=g)).clamp(-1, 1).double()  # many steps at the bound
    raw[:, 2, :3] = 0.01  # a step at rest
    raw[..., 3] = torch.sign(raw[..., 3])
    actions = raw.clone()
    actions[..., :3] = (raw[..., :3] - torch.tensor(mean[:3]).double()) / torch.tensor(std[:3]).double()
    codes = _inputs()[0]
    pooled = m.prior_pooled(codes, actions.float())
    S = BehaviorModel.stats_dim(A, m.stat_groups, 3)
    assert S == 5 * A + (2 * 3 + 3) + 2 * A + A and pooled.shape == (B, T, m.dim + S)
    r = raw[..., :3].numpy()
    a = actions.numpy()
    da = np.concatenate([np.zeros_like(a[:, :1]), np.diff(a, axis=1)], axis=1)
    dr = np.concatenate([np.zeros_like(r[:, :1]), np.diff(r, axis=1)], axis=1)
    turn = da * np.concatenate([np.zeros_like(da[:, :1]), da[:, :-1]], axis=1)
    norm = np.linalg.norm(r, axis=-1, keepdims=True)
    per_step = [a, a**2, np.abs(a), np.abs(da), da**2, (np.abs(r) >= 0.999).astype(float), (np.abs(r) < 0.05).astype(float),
                (np.abs(dr).max(-1, keepdims=True) > 0.5).astype(float), norm, norm**2, turn, (turn < 0).astype(float)]
    steps = np.arange(1, T + 1)[None, :, None]
    run = np.concatenate([np.cumsum(x, 1) / steps for x in per_step], -1)
    run_std = np.stack([a[:, : t + 1].std(1) for t in range(T)], 1)
    want = np.concatenate([run, run_std], -1)
    assert np.allclose(pooled[..., m.dim :].detach().double().numpy(), want, atol=1e-5)
    post = m.pooled_stats(actions.float(), running=False).double().numpy()
    assert np.allclose(post, want[:, -1], atol=1e-5)
    sat = want[..., 5 * A : 5 * A + 3]
    assert 0.2 < sat[:, -1].mean() < 0.9  # the check is not vacuous: some steps saturate, some do not
    assert 0 < want[:, -1, 5 * A + 9 + A : 5 * A + 9 + 2 * A].mean() < 1  # ... and some changes reverse
    a2 = actions.clone().float()
    a2[:, 4:] += 1.0
    assert torch.equal(m.prior(codes, a2)[0][:, :4], m.prior(codes, actions.float())[0][:, :4])
    with pytest.raises(ValueError, match="list of distinct groups"):
        _model(encoder="window_mean", encoder_stats=["moments", "levels"])
    with pytest.raises(ValueError, match="needs the data's action_mean and action_std"):
        _model(encoder="window_mean", encoder_stats=["rates"])
    with pytest.raises(ValueError, match="rate_dims must be distinct action dims"):
        _model(**{**kw, "rate_dims": [0, 4]})

    _assert_learns_which_of_two_offsets(dict(kw, encoder_stats=["rates"]), codes)
