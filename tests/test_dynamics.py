"""Pure-model tests of the ST-MaskGIT dynamics (random token ids and actions, tiny shapes)."""

import math

import pytest
import torch

from whale_pl.models.dynamics import DynamicsModel
from whale_pl.models.maskgit import training_mask

V, HW, A, Z, SD = 16, (3, 3), 4, 5, 6


def _model(behavior=True, max_frames=6, seed=0, code=0, rank=0):
    torch.manual_seed(seed)
    m = DynamicsModel(V, HW, A, behavior_dim=Z if behavior else 0, state_dim=SD, dim=32, depth=2,
                      heads=4, max_frames=max_frames, max_stride=3, code_dim=code,
                      transition_rank=rank)
    if code:
        m.set_code_vectors(torch.nn.functional.normalize(torch.randn(V, code), dim=-1))
    # zero-initialised adaptive norms would hide conditioning bugs: perturb every parameter
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _batch(B=2, T=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, V, (B, T, *HW), generator=g), torch.randn(B, T, A, generator=g),
            torch.randn(B, T, Z, generator=g))


def test_training_mask_context_clean_and_future_masked():
    m = training_mask(64, 5, 9, context_frames=2, generator=torch.Generator().manual_seed(0))
    assert not m[:, :2].any()
    per_frame = m[:, 2:].sum(-1)
    assert (per_frame >= 1).all() and (per_frame <= 9).all()
    assert per_frame.float().std() > 0  # the ratio varies frame to frame


def test_causal_in_time_and_conditioned():
    m = _model()
    ids, act, z = _batch()
    logits, heads = m(ids, act, z)
    assert logits.shape == (2, 5, *HW, V) and heads["state"].shape == (2, 5, SD)
    # changing frame 3 and the action taken at frame 3 (which leads into frame 4) leaves frames <= 2 alone
    ids2, act2 = ids.clone(), act.clone()
    ids2[:, 3] = (ids2[:, 3] + 1) % V
    act2[:, 3] += 1.0
    logits2, _ = m(ids2, act2, z)
    assert torch.allclose(logits[:, :3], logits2[:, :3], atol=1e-5)
    assert not torch.allclose(logits[:, 3:], logits2[:, 3:], atol=1e-4)
    # the action at frame 1 changes frame 2 onwards; z and stride change the predictions too
    act3 = act.clone()
    act3[:, 1] += 1.0
    assert torch.allclose(m(ids, act3, z)[0][:, :2], logits[:, :2], atol=1e-5)
    assert not torch.allclose(m(ids, act3, z)[0][:, 2], logits[:, 2], atol=1e-4)
    assert not torch.allclose(m(ids, act, z + 1)[0][:, 1:], logits[:, 1:], atol=1e-4)
    assert not torch.allclose(m(ids, act, z, torch.tensor([2, 3]))[0], logits, atol=1e-4)


def test_behavior_switch_and_bad_stride():
    m_off = _model(behavior=False)
    ids, act, z = _batch()
    logits, _ = m_off(ids, act, None)
    assert logits.shape[-1] == V
    with pytest.raises(ValueError, match="frame stride"):
        _model()(ids, act, z, torch.tensor([1, 7]))


def test_loss_falls_on_fixed_batch():
    m = _model().train()
    ids, act, z = _batch(B=4, T=4)
    # a learnable rule: each frame is the previous one shifted by the sign of the action
    ids[:, 1:] = (ids[:, :1] + (act[:, :-1, :1] > 0).long().cumsum(1).unsqueeze(-1)) % V
    rew, suc, st = torch.randn(4, 4), (torch.rand(4, 4) > 0.5).float(), torch.randn(4, 4, SD)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        out = m.training_losses(ids, act, z, rew, suc, st, context_frames=1, corrupt_prob=0.1, generator=g)
        loss = out["ce"] + out["reward"] + out["success"] + out["state"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_teacher_forced_matches_masked_full_pass():
    m = _model()
    ids, act, z = _batch()
    tf = m.teacher_forced(ids, act, z)
    for t in (1, 4):
        inp = ids[:, : t + 1].clone()
        inp[:, t] = m.mask_id
        full, _ = m(inp, act[:, : t + 1], z[:, : t + 1])
        assert torch.allclose(tf[:, t - 1], full[:, t], atol=1e-4)


def test_predict_next_matches_teacher_forced_and_strides():
    m = _model()
    ids, act, z = _batch()
    tf = m.teacher_forced(ids, act, z)
    out = m.predict_next(ids[:, :3], act[:, :3], z[:, :3])
    assert torch.allclose(out["probs_BhwV"], tf[:, 2].softmax(-1), atol=1e-5)
    assert torch.allclose(out["probs_BhwV"].sum(-1), torch.ones(2, *HW))
    k2 = m.predict_next(ids[:, :3], act[:, :3], z[:, :3], stride_B=torch.tensor([2, 2]))
    assert not torch.allclose(k2["probs_BhwV"], out["probs_BhwV"])


@pytest.mark.parametrize("code,rank", [(0, 0), (3, 0), (3, 2)])
def test_imagine_cache_equals_no_cache(code, rank):
    m = _model(max_frames=4, code=code, rank=rank)  # 1 context + 7 new frames: the window restarts twice
    ids, act, z = _batch(T=7)
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        runs.append(m.imagine(ids[:, :1], act, z, steps=3, temperature=1.0, use_cache=use_cache, generator=g))
    a, b = runs
    assert a["ids_BThw"].shape == (2, 7, *HW)
    assert torch.equal(a["ids_BThw"], b["ids_BThw"])
    for k in ("token_prob_BThw", "reward_BT", "success_BT", "state_BTP"):
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_imagine_with_prior_callable_is_causal():
    m = _model()
    ids, act, _ = _batch(T=5)
    seen = []

    def z_fn(ids_BThw, actions_BTA):
        seen.append(ids_BThw.shape[1])
        return ids_BThw.float().mean((2, 3)).unsqueeze(-1).expand(-1, -1, Z) / V + actions_BTA[..., :1]

    out = m.imagine(ids[:, :2], act, z_fn, steps=2, temperature=0.0)
    assert out["ids_BThw"].shape == (2, 4, *HW)
    assert max(seen) <= 5 and seen == sorted(seen)  # the prior only ever sees the history so far
    # greedy decoding is deterministic and one step from a masked frame equals predict_next's argmax
    one = m.imagine(ids[:, :2], act, z_fn, horizon=1, steps=1, temperature=0.0)
    zs = z_fn(ids[:, :2], act[:, :2])
    nxt = m.predict_next(ids[:, :2], act[:, :2], zs)
    assert torch.equal(one["ids_BThw"][:, 0], nxt["probs_BhwV"].argmax(-1))


def test_imagine_with_act_fn_chooses_actions_from_what_was_imagined():
    """Closed loop: act_fn(t, so_far) is asked for each frame's action in order, sees only the frames
    imagined before it, and a hook that returns the given actions reproduces the open-loop rollout."""
    m = _model(max_frames=4)  # 2 context + 5 new frames: the window restarts
    ids, act, z = _batch(T=6)
    z_fn = lambda ids_BThw, actions_BTA: actions_BTA[..., :1].expand(-1, -1, Z) + ids_BThw.float().mean((2, 3))[..., None] / V  # noqa: E731
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    open_loop = m.imagine(ids[:, :2], act, z_fn, steps=2, temperature=1.0, generator=g())
    seen = []

    def act_fn(t, so_far):
        seen.append((t, 0 if not so_far else so_far["ids_BThw"].shape[1]))
        if so_far:  # what it sees are the frames imagined so far, as the open loop imagined them
            assert torch.equal(so_far["ids_BThw"], open_loop["ids_BThw"][:, : t - 1])
            assert so_far["state_BTP"].shape == (2, t - 1, SD)
        return act[:, t]

    closed = m.imagine(ids[:, :2], act[:, :1], z_fn, horizon=5, steps=2, temperature=1.0, generator=g(),
                       act_fn=act_fn)
    assert seen == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    for k in open_loop:
        assert torch.equal(closed[k], open_loop[k]), k
    with pytest.raises(ValueError, match="pass the horizon"):
        m.imagine(ids[:, :2], None, z_fn, act_fn=act_fn)


def test_random_context_lengths_leave_a_clean_prefix_per_clip():
    g = torch.Generator().manual_seed(0)
    ctx = torch.tensor([1, 3, 4, 2])
    m = training_mask(4, 5, 9, ctx, generator=g)
    for b, c in enumerate(ctx.tolist()):
        assert not m[b, :c].any() and (m[b, c:].sum(-1) >= 1).all()
    model = _model()
    ids, act, z = _batch(B=8)
    out = model.training_losses(ids, act, z, torch.zeros(8, 5), torch.zeros(8, 5), context_frames=1,
                                max_context_frames=4, corrupt_prob=0.2, generator=g)
    assert torch.isfinite(out["ce"])


def test_copy_logit_starts_at_copy_baseline_and_learns_the_changes():
    """A fresh copy-logit model predicts 'same as the previous frame' everywhere; trained on clips
    where one position follows the action and the rest stand still, it beats copying."""
    torch.manual_seed(0)
    m = DynamicsModel(V, HW, A, behavior_dim=0, dim=32, depth=2, heads=4, max_frames=6)
    g = torch.Generator().manual_seed(0)
    B, T = 16, 5
    ids = torch.randint(0, V, (B, 1, *HW), generator=g).repeat(1, T, 1, 1)
    act = torch.randn(B, T, A, generator=g)
    ids[:, 1:, 0, 0] = (act[:, :-1, 0] > 0).long() * 7  # position (0, 0) is set by the action
    tf = m.eval().teacher_forced(ids, act).argmax(-1)
    assert torch.equal(tf, ids[:, :-1])  # copies at init
    copy_acc = (ids[:, :-1] == ids[:, 1:]).float().mean().item()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    rew, suc = torch.zeros(B, T), torch.zeros(B, T)
    m.train()
    for _ in range(60):
        out = m.training_losses(ids, act, None, rew, suc, context_frames=1, generator=g)
        opt.zero_grad()
        out["ce"].backward()
        opt.step()
    acc = (m.eval().teacher_forced(ids, act).argmax(-1) == ids[:, 1:]).float().mean().item()
    assert acc > copy_acc + 0.5 * (1 - copy_acc), (acc, copy_acc)


def test_code_vectors_enter_embedding_and_logits():
    m = _model(code=3)
    ids, act, z = _batch()
    a, _ = m(ids, act, z)
    vec = m.code_vectors.clone()
    m.set_code_vectors(torch.roll(vec, 1, dims=0))
    b, _ = m(ids, act, z)
    assert not torch.allclose(a, b, atol=1e-4)
    m.set_code_vectors(vec)
    assert torch.allclose(m(ids, act, z)[0], a)
    assert "code_vectors" not in m.state_dict()  # the codebook is the frozen tokenizer's, not a weight


def test_change_weight_weights_changed_targets_and_corrects_the_logits():
    """change_weight w: the training CE (on raw logits) is a weighted mean in which targets whose id
    changed since the frame before count w times (w = 1: the plain mean, which it lies between the
    plain mean and the changed-only mean); every other path adds log w to the previous id's logit."""
    ids, act, z = _batch(B=4, T=5)
    ids[:, 2:, 0] = ids[:, 1:2, 0]  # some positions stand still, so both kinds of targets exist
    rew, suc = torch.zeros(4, 5), torch.zeros(4, 5)
    ce = {}
    for w in (1.0, 3.0, 1e6):
        m = _model()
        m.change_weight = w
        g = torch.Generator().manual_seed(5)
        ce[w] = m.train().training_losses(ids, act, z, rew, suc, generator=g)["ce"].item()
    lo, hi = sorted((ce[1.0], ce[1e6]))
    assert lo < ce[3.0] < hi
    plain = _model()
    weighted = _model()
    weighted.change_weight = 3.0
    diff = weighted.teacher_forced(ids, act, z) - plain.teacher_forced(ids, act, z)
    at_prev = torch.nn.functional.one_hot(ids[:, :-1], V).bool()
    assert torch.allclose(diff[at_prev], torch.full_like(diff[at_prev], math.log(3.0)), atol=1e-5)
    assert torch.allclose(diff[~at_prev], torch.zeros_like(diff[~at_prev]), atol=1e-5)
    with pytest.raises(ValueError, match="change_weight must be > 0"):
        DynamicsModel(V, HW, A, dim=32, depth=1, heads=4, change_weight=0.0)


def test_change_weight_keeps_predictions_calibrated():
    """One position changes at random with probability 0.3 (unpredictable); the rest stand still.
    Trained with change_weight 10, the raw logits over-predict the change (odds x10: about 0.81),
    while the corrected probabilities stay near the true 0.3, so the argmax mostly copies (measured:
    corrected p 0.37, copies 68 %, accuracy 0.60; raw p 0.71, copies 0 %, accuracy 0.19)."""
    torch.manual_seed(0)
    m = DynamicsModel(V, HW, A, behavior_dim=0, dim=32, depth=1, heads=4, max_frames=6, change_weight=10.0)
    g = torch.Generator().manual_seed(0)
    B, T = 32, 5
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    rew, suc = torch.zeros(B, T), torch.zeros(B, T)

    def clip():
        ids = torch.randint(0, V, (B, 1, *HW), generator=g).repeat(1, T, 1, 1)
        flip = torch.rand(B, T, generator=g) < 0.3
        for t in range(1, T):  # position (0, 0) jumps to id (prev + 1) % V with probability 0.3
            ids[:, t, 0, 0] = torch.where(flip[:, t], (ids[:, t - 1, 0, 0] + 1) % V, ids[:, t - 1, 0, 0])
        return ids, torch.zeros(B, T, A)

    m.train()
    for _ in range(150):
        ids, act = clip()
        out = m.training_losses(ids, act, None, rew, suc, context_frames=1, generator=g)
        opt.zero_grad()
        out["ce"].backward()
        opt.step()
    ids, act = clip()
    m.eval()
    nxt = (ids[:, :-1, 0, 0] + 1) % V
    logits = m.teacher_forced(ids, act)[:, :, 0, 0]
    p_change = logits.softmax(-1).gather(-1, nxt[..., None]).mean().item()
    raw = logits.scatter_add(-1, ids[:, :-1, 0, 0, None], torch.full_like(logits[..., :1], -math.log(10.0)))
    p_change_raw = raw.softmax(-1).gather(-1, nxt[..., None]).mean().item()
    assert 0.15 < p_change < 0.45 and p_change_raw > 0.6, (p_change, p_change_raw)
    truth = ids[:, 1:, 0, 0]
    acc, acc_raw = ((x.argmax(-1) == truth).float().mean().item() for x in (logits, raw))
    copies, copies_raw = ((x.argmax(-1) == ids[:, :-1, 0, 0]).float().mean().item() for x in (logits, raw))
    assert copies > 0.5 > copies_raw and acc > acc_raw  # corrected: copying stays the best guess, and pays


def _perm_clips(perms_SV: torch.Tensor, B: int, T: int, seed: int) -> torch.Tensor:
    """Clips where each position's next id is a fixed function of (position, its id): perms_SV[s][id]."""
    g = torch.Generator().manual_seed(seed)
    S = perms_SV.shape[0]
    ids = torch.zeros(B, T, S, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (B, S), generator=g)
    for t in range(1, T):
        ids[:, t] = perms_SV[torch.arange(S), ids[:, t - 1]]
    return ids.view(B, T, *HW)


def _transition_model(rank: int) -> DynamicsModel:
    torch.manual_seed(0)
    m = DynamicsModel(V, HW, A, dim=32, depth=2, heads=4, max_frames=6, code_dim=8,
                      transition_rank=rank)
    m.set_code_vectors(torch.nn.functional.normalize(torch.randn(V, 8, generator=torch.Generator().manual_seed(5)), dim=-1))
    return m


def test_transition_table_starts_as_the_plain_model_and_ignores_unknown_ids():
    m = _transition_model(2).eval()
    ids, act, _ = _batch(T=4)
    with_table = m.teacher_forced(ids, act)
    table, m.trans = m.trans, None
    plain = m.teacher_forced(ids, act)
    m.trans = table
    assert torch.equal(with_table, plain)  # zero-initialised rows add nothing
    with torch.no_grad():
        m.trans.weight.normal_()
    h = torch.randn(2, 1, 9, 32)
    prev = torch.tensor([[[0, 3, V, V + 1, 5, 6, 7, 8, 9]] * 1] * 2)
    q = m.transition_query(h, prev)
    assert (q[:, :, 2:4] == 0).all() and (q[:, :, [0, 1, 4]] != 0).any(-1).all()
    assert not torch.equal(m.teacher_forced(ids, act), plain)


def test_transition_table_learns_per_position_transitions_sooner():
    """Each position's next id is a fixed permutation of its id, different per position: with the
    (position, previous id) table the model gets held-out clips right after 40 steps; without it, not yet."""
    g = torch.Generator().manual_seed(0)
    perms = torch.stack([torch.randperm(V, generator=g) for _ in range(HW[0] * HW[1])])
    train, held_out = _perm_clips(perms, 32, 5, seed=1), _perm_clips(perms, 32, 5, seed=2)
    acc = {}
    for rank in (0, 2):
        m = _transition_model(rank)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        act = torch.randn(32, 5, A, generator=g)
        m.train()
        for _ in range(40):
            out = m.training_losses(train, act, None, torch.zeros(32, 5), torch.zeros(32, 5), context_frames=1, generator=g)
            opt.zero_grad()
            out["ce"].backward()
            opt.step()
        acc[rank] = (m.eval().teacher_forced(held_out, act).argmax(-1) == held_out[:, 1:]).float().mean().item()
    assert acc[2] > 0.9 and acc[2] > acc[0] + 0.3, acc


def test_transition_rank_needs_code_vectors_and_a_whole_number():
    with pytest.raises(ValueError, match="code_dim"):
        DynamicsModel(V, HW, A, dim=32, depth=1, heads=4, transition_rank=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="transition_rank"):
            DynamicsModel(V, HW, A, dim=32, depth=1, heads=4, code_dim=8, transition_rank=bad)


def test_shared_context_computes_the_history_once_and_imagines_the_same():
    """Candidates of one plan share their context frames, actions and z: with ``shared_context`` the history's
    keys/values are computed on one row (one trunk pass of batch 1) and the rollouts are those of the plain path."""
    m = _model()
    ids, act, z = _batch(B=1, T=6)
    N = 5
    ctx = ids[:, :2].expand(N, -1, -1, -1)
    acts = torch.cat([act[:, :1].expand(N, -1, -1), torch.randn(N, 4, A, generator=torch.Generator().manual_seed(3))], 1)
    z_fn = lambda ids_BThw, actions_BTA: actions_BTA[..., :1].expand(-1, -1, Z) + ids_BThw.float().mean((2, 3))[..., None] / V  # noqa: E731
    batches = []
    trunk = m.trunk
    m.trunk = lambda ids_BTS, *a, **k: (batches.append(ids_BTS.shape[0]), trunk(ids_BTS, *a, **k))[1]
    plain = DynamicsModel.imagine(m, ctx, acts, z_fn, steps=2, temperature=0.0)
    first_plain, batches[:] = batches[0], []
    shared = DynamicsModel.imagine(m, ctx, acts, z_fn, steps=2, temperature=0.0, shared_context=True)
    assert first_plain == N and batches[0] == 1  # the priming pass ran on one row
    assert torch.equal(plain["ids_BThw"], shared["ids_BThw"])
    for k in ("token_prob_BThw", "reward_BT", "success_BT", "state_BTP"):
        torch.testing.assert_close(plain[k], shared[k], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain["reward_BT"][0], plain["reward_BT"][1])  # the candidates do differ
