"""What the behavior prior's architecture reaches on issue 5's probe when it is *told* the family (a bound, not a model).

The stage-2 config (``stages/demo/behavior_episodes.yaml``) learns z_t without labels. This benchmark asks how much of
the gap to the 0.8 target is the objective and how much the architecture and the data: it builds the same causal prior
(``BehaviorModel`` with ``encoder: window_mean``, actions only, action deltas, ``--z-dim``), puts a linear classifier on
its mean z_t, and trains both with the family labels (cross-entropy at every t >= ``--t-min`` of the whole 120-step
training episodes; AdamW, batches of 16 episodes, ``--steps``). It then scores, on the val episodes, the classifier
itself and the issue's probe (``fit_linear_probe`` refitted on the train episodes' z_t, as ``behavior_probe.py`` does).
Actions are normalised with the data's own statistics; no frames are read, so no tokenizer is needed.

``--per-policy N`` keeps only the first N training episodes of each (task, policy): with a data config collected with
more episodes per policy (same seed), N = 4 is exactly the demo's training set and the val episodes are the demo's.

    .venv/bin/python benchmarks/behavior_supervised.py                          # demo data, seed 0
    .venv/bin/python benchmarks/behavior_supervised.py --data-config D.yaml --per-policy 8
    .venv/bin/python benchmarks/behavior_supervised.py --encoder-stats moments rates turns std   # the config's z heads

Last line: ``behavior_supervised_acc: <val accuracy of the issue's probe on the supervised z_t> fraction``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from whale_pl.analysis.probe import accuracy_by_history, fit_linear_probe
from whale_pl.models.behavior import STAT_GROUPS, BehaviorModel
from whale_pl.rollout.retracing import ActionNormaliser


def episode_index(ep) -> int:
    """The episode's index within its (task, policy, split) group: the last part of ``episode_id``."""
    eid = str(ep.meta.get("episode_id", ""))
    try:
        return int(eid.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"episode_id {eid!r}: expected '<task>/<policy>/<split>/<index>'") from None


def split_tensors(episodes, families: list[str], normaliser, clip_len: int, per_policy: int | None = None):
    """Normalised actions [N, clip_len, A] of each episode's first ``clip_len`` steps and family indices [N]."""
    if per_policy is not None:
        episodes = [ep for ep in episodes if episode_index(ep) < per_policy]
    short = [ep.meta.get("episode_id") for ep in episodes if len(ep) < clip_len]
    if short:
        raise ValueError(f"episodes {short[:3]} have fewer than clip_len={clip_len} steps")
    a = np.stack([normaliser.normalise(ep.actions[:clip_len]) for ep in episodes]).astype(np.float32)
    y = [families.index(ep.meta["policy"]["family"]) for ep in episodes]
    return torch.from_numpy(a), torch.tensor(y)


def prior_z(model: BehaviorModel, actions_BTA: torch.Tensor) -> torch.Tensor:
    """The causal prior's mean z_t [B, T, Z] from the actions alone (``encoder_frames`` off: no frame feature)."""
    feat_BTD = actions_BTA.new_zeros(*actions_BTA.shape[:2], model.dim)
    return model.prior_from_features(feat_BTD, actions_BTA)[0]


def train_supervised(a_tr: torch.Tensor, y_tr: torch.Tensor, n_classes: int, z_dim: int, steps: int, t_min: int,
                     seed: int, batch: int = 16, lr: float = 1e-3, stats: dict | None = None
                     ) -> tuple[BehaviorModel, torch.nn.Linear]:
    """The prior and a linear classifier on its z_t, trained together with the family labels at every t >= t_min.
    ``stats``: ``BehaviorModel``'s ``encoder_stats`` arguments (the groups, and for ``rates`` the raw-unit scale)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = BehaviorModel(code_dim=1, action_dim=a_tr.shape[-1], grid_tokens=1, z_dim=z_dim, encoder="window_mean",
                          encoder_frames=False, action_deltas=True, **(stats or {}))
    cls = torch.nn.Linear(z_dim, n_classes)
    params = list(model.prior_in.parameters()) + list(model.prior_local.parameters()) + \
        list(model.prior_head.parameters()) + list(cls.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for _ in range(steps):
        idx = torch.randint(0, len(a_tr), (batch,), generator=g)
        logits = cls(prior_z(model, a_tr[idx])[:, t_min:])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y_tr[idx].repeat_interleave(logits.shape[1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cls.eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-config", default="stages/demo/data.yaml")
    p.add_argument("--per-policy", type=int, default=None, help="train episodes per (task, policy) to use (default all)")
    p.add_argument("--clip-len", type=int, default=120)
    p.add_argument("--t-min", type=int, default=8)
    p.add_argument("--z-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--encoder-stats", nargs="+", default=[], choices=STAT_GROUPS,
                   help="fixed statistics the z head also reads, as the stage's encoder_stats (default none; the "
                        "episodes config's: moments rates turns std)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from whale_pl.data.datamodule import MetaWorldDataModule

    dm = MetaWorldDataModule(config=a.data_config)
    families = list(dm.data_spec["families"])
    nz = ActionNormaliser.from_data_spec(dm.data_spec)
    a_tr, y_tr = split_tensors(dm.episodes(split="train"), families, nz, a.clip_len, a.per_policy)
    a_va, y_va = split_tensors(dm.episodes(split="val"), families, nz, a.clip_len)
    t0 = time.time()
    stats = None
    if a.encoder_stats:
        from whale_pl.lit.behavior_module import rate_args

        stats = dict(encoder_stats=a.encoder_stats, **rate_args(dm.data_spec, a.encoder_stats))
    model, cls = train_supervised(a_tr, y_tr, len(families), a.z_dim, a.steps, a.t_min, a.seed, stats=stats)
    with torch.no_grad():
        z_tr, z_va = prior_z(model, a_tr)[:, a.t_min:], prior_z(model, a_va)[:, a.t_min:]
        direct = (cls(z_va).argmax(-1) == y_va[:, None]).double().mean().item()
    n = z_tr.shape[1]
    yt, yv = y_tr.repeat_interleave(n), y_va.repeat_interleave(n)
    probe = fit_linear_probe(z_tr.flatten(0, 1), yt, n_classes=len(families))
    ok = (probe.predict(z_va.flatten(0, 1)) == yv).numpy()
    hist = np.tile(np.arange(a.t_min, a.clip_len), len(y_va))
    print(f"{a.data_config}: {len(y_tr)} train / {len(y_va)} val episodes, seed {a.seed}, {a.steps} steps, "
          f"{time.time() - t0:.0f}s, encoder_stats {a.encoder_stats or 'none'} | classifier val {direct:.3f} | probe train {probe.accuracy(z_tr.flatten(0, 1), yt):.3f}"
          f" val {ok.mean():.3f}")
    print("  val accuracy by history:", accuracy_by_history(ok, hist))
    print("  val accuracy per family:", ", ".join(f"{f} {ok[yv.numpy() == k].mean():.2f}" for k, f in enumerate(families)
                                                  if (yv == k).any()))
    print(f"behavior_supervised_acc: {ok.mean():.3f} fraction")


if __name__ == "__main__":
    main()
