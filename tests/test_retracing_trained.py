"""Retracing-rollout and ensemble uncertainty on tiny dynamics models trained here.

The toy world: one object token on a 4x4 torus of background tokens; the action's (dx, dy) moves it
(wrapping), so k moves compose by summing — exactly Meta-World's action-space rule. The models are
trained like the real stage: MaskGIT loss, a share of the clips with stride k and composed actions.
"""

import numpy as np
import pytest
import torch

from whale_pl.data.episode import METAWORLD_ACTION_SPACE
from whale_pl.models.dynamics import DynamicsModel
from whale_pl.data.actions import ActionNormaliser
from whale_pl.rollout.retracing import ensemble_uncertainty, retracing_uncertainty

G, V, K, T = 2, 5, 3, 4  # grid side, codes, max stride, clip length
NORM = ActionNormaliser(METAWORLD_ACTION_SPACE, np.zeros(4), np.ones(4))
OFFSET = torch.tensor([[0, 2], [1, 3]])  # each position shows the counter plus its own offset


def episodes(B: int, L: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token frames [B, L, G, G] and single-step raw actions [B, L, 4] (dx, dy=0, dz=0, gripper=0):
    a counter c moves by dx in {-1, 0, 1} (mod V); position (i, j) shows (c + OFFSET[i, j]) mod V."""
    dx = torch.randint(-1, 2, (B, L), generator=g)
    c0 = torch.randint(0, V, (B, 1), generator=g)
    c = (c0 + torch.cumsum(torch.cat([torch.zeros_like(dx[:, :1]), dx[:, :-1]], 1), 1)) % V
    acts = torch.zeros(B, L, 4)
    acts[..., 0] = dx.float()
    return (c[..., None, None] + OFFSET) % V, acts


def strided_clip(ids, acts, k):
    """Stride-k clip of T frames from each episode, with composed (summed) actions."""
    B = ids.shape[0]
    idx = torch.arange(T) * k
    win = acts[:, : T * k].reshape(B, T, k, 4)
    comp = torch.as_tensor(NORM.compose_normalised(win.numpy()))
    return ids[:, idx], comp


def train_tiny(seed: int, steps: int = 600) -> DynamicsModel:
    torch.manual_seed(seed)
    m = DynamicsModel(V, (G, G), 4, dim=32, depth=2, heads=4, max_frames=T, max_stride=K)
    opt = torch.optim.AdamW(m.parameters(), lr=6e-3)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        ids, acts = episodes(32, T * K, g)
        k = int(torch.randint(1, K + 1, (1,), generator=g))
        cids, cacts = strided_clip(ids, acts, k)
        stride = torch.full((32,), k)
        loss = m.training_losses(cids, cacts, None, torch.zeros(32, T), torch.zeros(32, T), stride_B=stride,
                                 generator=g)
        opt.zero_grad()
        loss["ce"].backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def models():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is faster than two on a shared 2-core box
    try:
        yield [train_tiny(s) for s in range(2)]
    finally:
        torch.set_num_threads(threads)


def test_trained_model_predicts_strided_moves(models):
    g = torch.Generator().manual_seed(7)
    ids, acts = episodes(64, T * K, g)
    for k in (1, K):
        cids, cacts = strided_clip(ids, acts, k)
        out = models[0].predict_next(cids[:, :2], cacts[:, :2], stride_B=torch.full((64,), k))
        acc = (out["probs_BhwV"].argmax(-1) == cids[:, 2]).float().mean().item()
        assert acc > 0.95, f"stride {k}: next-frame token accuracy {acc:.3f}"


def test_uncertainty_higher_for_scrambled_actions(models):
    g = torch.Generator().manual_seed(8)
    ids, acts = episodes(32, 8, g)
    scrambled = acts[:, torch.randperm(8, generator=g)]
    moved = (scrambled[..., :2] != acts[..., :2]).any(-1).float().mean()
    assert moved > 0.3
    one_hot, no_z = torch.eye(V), [None] * len(models)  # scored on the code distributions themselves
    real = retracing_uncertainty(models[0], ids, acts, NORM, first=2, K=K, codebook_VE=one_hot, z_fn=None)
    scr = retracing_uncertainty(models[0], ids, scrambled, NORM, first=2, K=K, codebook_VE=one_hot, z_fn=None)
    assert (real["n_predictions_T"] >= 2).all()
    for part in ("score", "disagreement", "entropy"):
        r, s = real[f"{part}_BT"].mean().item(), scr[f"{part}_BT"].mean().item()
        assert s > 2 * r, f"{part}: scrambled {s:.4f} vs real {r:.4f}"
    ens_real = ensemble_uncertainty(models, ids, acts, first=2, codebook_VE=one_hot, z_fns=no_z)
    ens_scr = ensemble_uncertainty(models, ids, scrambled, first=2, codebook_VE=one_hot, z_fns=no_z)
    assert ens_scr["score_BT"].mean() > 2 * ens_real["score_BT"].mean()
