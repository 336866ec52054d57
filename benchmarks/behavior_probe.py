"""Linear-probe accuracy of the behavior prior's z_t on held-out episodes (issue 5's quality target).

For each behavior checkpoint: cut every episode of the dataset into clips of ``--clip-len`` steps
(hop ``--hop``), run the frozen tokenizer and the causal prior on each clip, and keep the prior mean
z_t for t >= ``--t-min`` (z_t has seen steps <= t only). A multinomial logistic regression fitted on
the points of the *training* episodes predicts the behavior-policy family of the points of the
held-out *val* episodes (same policies, episodes never trained on); the OOD episodes (policies
never trained on, families seen) are scored too where their family exists in training. Each point is
scored on its own (the headline figure); a whole-episode decision (the probe's log-probabilities
averaged over all of an episode's points) is printed too.

    .venv/bin/python benchmarks/behavior_probe.py                       # runs/demo/behavior best.ckpt
    .venv/bin/python benchmarks/behavior_probe.py --ckpt A.ckpt B.ckpt  # several (e.g. betas)
    .venv/bin/python benchmarks/behavior_probe.py --by-policy           # which family each val policy's points get
    .venv/bin/python benchmarks/behavior_probe.py --layout              # does z also name the task / object places?
    .venv/bin/python benchmarks/behavior_probe.py --by-episode          # the same per val episode (task, policy)
    .venv/bin/python benchmarks/behavior_probe.py --pooled              # window_mean: the statistics before the z head
    .venv/bin/python benchmarks/behavior_probe.py --posterior           # the posterior mean's probe (the bound)
    .venv/bin/python benchmarks/behavior_probe.py --posterior --stats   # does that z hold the clip's action statistics?

Last line: ``behavior_probe_acc: <val accuracy of the first checkpoint> fraction``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from whale_pl.analysis.probe import accuracy_by_history, fit_linear_probe


def clips_of(ep, clip_len: int, hop: int, mean: np.ndarray, std: np.ndarray, norm_mask: np.ndarray):
    """All clips of one episode: uint8 frames [N,T,3,H,W], normalised actions [N,T,A]."""
    T = len(ep)
    if T < clip_len:
        raise ValueError(f"episode {ep.meta.get('episode_id')} has {T} steps < clip_len={clip_len}")
    starts = list(range(0, T - clip_len + 1, hop))
    idx = np.asarray(starts)[:, None] + np.arange(clip_len)[None]
    frames = torch.from_numpy(np.ascontiguousarray(ep.frames[idx])).permute(0, 1, 4, 2, 3)
    a_raw = ep.actions[idx]
    a = np.where(norm_mask, (a_raw - mean) / std, a_raw).astype(np.float32)
    return frames, torch.from_numpy(a)


def action_norm(module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checkpoint's action normalisation: mean, std and which dims it applies to (not the gripper)."""
    spec = module.hparams.data_spec
    mean = np.asarray(spec["action_mean"], np.float32)
    std = np.asarray(spec["action_std"], np.float32)
    gi = spec["action_space"].get("gripper_index")
    mask = np.ones(len(mean), bool)
    if gi is not None:
        mask[gi] = False
    return mean, std, mask


@torch.no_grad()
def embed_split(module, episodes, families, clip_len, hop, t_min, batch=32, pooled: bool = False):
    """Every point t >= t_min of every clip: the prior mean z_t (``behavior_z``), family index, episode index, and with
    ``pooled`` the window-mean prior's running statistics its z head reads (else None) -- from the same codes, so the
    frozen tokenizer runs once per clip."""
    mean, std, mask = action_norm(module)
    zs, ys, es, hs = [], [], [], []
    for e, ep in enumerate(episodes):
        fam = ep.meta["policy"]["family"]
        frames, actions = clips_of(ep, clip_len, hop, mean, std, mask)
        for i in range(0, len(frames), batch):
            codes, a = module.codes(frames[i : i + batch]), actions[i : i + batch]
            if pooled:  # the pooled statistics once; z_t is the prior's head applied to them
                h = module.model.prior_pooled(codes, a)
                z = module.model.prior_from_pooled(h)[0][:, t_min:]
                hs.append(h[:, t_min:].flatten(0, 1))
            else:
                z = module.model.prior(codes, a)[0][:, t_min:]
            zs.append(z.flatten(0, 1))
            ys.append(torch.full((z.shape[0] * z.shape[1],), families.index(fam) if fam in families else -1))
            es.append(torch.full((z.shape[0] * z.shape[1],), e))
    return torch.cat(zs), torch.cat(ys), torch.cat(es), (torch.cat(hs) if pooled else None)


STAT_NAMES = ("a", "a^2", "std a", "|da|", "da^2")


def action_stats(actions_NTA: torch.Tensor) -> torch.Tensor:
    """Each clip's action statistics [N, 5A]: mean of a, a^2, the std of a, mean |a_t - a_{t-1}| and
    (a_t - a_{t-1})^2 per dim (normalised units) -- the hand statistics a linear family probe reads best
    (``behavior_ceiling.py --features a a2 std absda da2``)."""
    a = actions_NTA.double()
    d = a.diff(dim=1)
    return torch.cat([a.mean(1), a.pow(2).mean(1), a.std(1, unbiased=False), d.abs().mean(1), d.pow(2).mean(1)], 1)


def ridge_fit(x_NZ: torch.Tensor, y_NK: torch.Tensor, ridge: float = 1e-2):
    """Ridge regression with an intercept; returns the fitted map x -> y."""
    X = torch.cat([x_NZ.double(), torch.ones(len(x_NZ), 1, dtype=torch.float64)], 1)
    W = torch.linalg.solve(X.T @ X + ridge * torch.eye(X.shape[1], dtype=torch.float64), X.T @ y_NK.double())
    return lambda x: torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) @ W


def stats_readout(z_tr, s_tr, y_tr, z_va, s_va, y_va, n_classes: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Does z hold the clip's action statistics, and would they name the family? Val R^2 of a ridge map
    z -> statistics (fitted on train clips) per statistic, and val accuracy of the clip-level family probe on
    the statistics themselves, on z, and on z mapped to the statistics (a linear function of z)."""
    f = ridge_fit(z_tr, s_tr)
    r2 = 1 - (f(z_va) - s_va).pow(2).mean(0) / s_va.var(0, unbiased=False).clamp_min(1e-12)
    acc = {}
    for name, (xa, xb) in {"statistics": (s_tr, s_va), "z": (z_tr, z_va), "z -> statistics": (f(z_tr), f(z_va))}.items():
        acc[name] = fit_linear_probe(xa, y_tr, n_classes=n_classes).accuracy(xb, y_va)
    return r2, acc


@torch.no_grad()
def embed_posterior(module, episodes, families, clip_len, hop, batch=32):
    """The posterior mean of every clip (it has seen the whole clip): [N, Z], families [N], and the clip's
    ``action_stats`` [N, 5A]. The posterior mean bounds what the prior, trained to predict it from the history,
    can carry."""
    mean, std, mask = action_norm(module)
    zs, ys, st = [], [], []
    for ep in episodes:
        fam = ep.meta["policy"]["family"]
        frames, actions = clips_of(ep, clip_len, hop, mean, std, mask)
        for i in range(0, len(frames), batch):
            mu_BZ, _ = module.model.posterior(module.codes(frames[i : i + batch]), actions[i : i + batch])
            zs.append(mu_BZ.float())
            ys.append(torch.full((len(mu_BZ),), families.index(fam) if fam in families else -1))
            st.append(action_stats(actions[i : i + batch]))
    return torch.cat(zs), torch.cat(ys), torch.cat(st)


def episode_accuracy(probe, x_NZ, y_N, ep_N) -> float:
    """Whole-episode decision: the probe's log-probabilities averaged over all of an episode's z_t."""
    logp = (((x_NZ.double() - probe.mean_Z) / probe.std_Z) @ probe.weight_ZK + probe.bias_K).log_softmax(-1)
    eps = ep_N.unique()
    right = [(logp[ep_N == e].mean(0).argmax() == y_N[ep_N == e][0]).item() for e in eps]
    return sum(right) / len(right)


def family_shares_by_policy(pred_N: torch.Tensor, ep_N: torch.Tensor, policy_of_episode: list[str],
                            n_families: int) -> dict[str, list[float]]:
    """{policy name: share of its points the probe assigns to each family}, policies in sorted order.

    A family probe can fail because one family's policies sit far apart in z (``noise_0.1`` beside the
    expert, ``noise_0.5`` beside ``eps``), which a per-family accuracy hides."""
    pol_N = np.asarray(policy_of_episode)[ep_N.numpy()]
    pred = pred_N.numpy()
    return {pol: [float((pred[pol_N == pol] == k).mean()) for k in range(n_families)] for pol in sorted(set(pol_N))}


def episode_breakdown(pred_N: torch.Tensor, y_N: torch.Tensor, ep_N: torch.Tensor, names: list[str],
                      families: list[str]) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """Per episode (in index order): its name, the share of its points given its true family, and the two families
    given most of its points with their shares. One val episode per (task, policy) in the demo data, so a policy
    that fails in one task only (bias_x0.3 in push, where the arm stalls) shows here and not in ``--by-policy``.
    Episodes that share a name are counted together (``family_shares_by_policy`` keyed by name)."""
    shares = family_shares_by_policy(pred_N, ep_N, names, len(families))  # keyed by episode name
    rows = []
    for e in ep_N.unique().tolist():
        share = np.asarray(shares[names[e]])
        top = [(families[k], float(share[k])) for k in np.argsort(-share, kind="stable")[:2] if share[k] > 0]
        rows.append((names[e], float(share[int(y_N[ep_N == e][0])]), top))
    return rows


def layout_readout(x_tr: torch.Tensor, ep_tr: torch.Tensor, eps_tr: list, x_va: torch.Tensor, ep_va: torch.Tensor,
                   eps_va: list, ridge: float = 1e-2) -> tuple[float, dict[int, float]]:
    """What z holds besides the policy: val accuracy of a linear probe for the episode's *task*, and the val R^2
    of a ridge regression from z to each varying dimension of the episode's first recorded state (object and
    goal positions), both fitted on the train points. Returns (task accuracy, {state dim: R^2})."""
    tasks = sorted({e.meta.get("task") for e in eps_tr})
    t_tr = torch.tensor([tasks.index(eps_tr[i].meta.get("task")) for i in ep_tr.tolist()])
    keep = np.array([eps_va[i].meta.get("task") in tasks for i in ep_va.tolist()])
    t_va = torch.tensor([tasks.index(eps_va[i].meta.get("task")) for i in ep_va[keep].tolist()])
    acc = fit_linear_probe(x_tr, t_tr, n_classes=len(tasks)).accuracy(x_va[keep], t_va) if len(tasks) > 1 else float("nan")
    if any(e.state is None for e in eps_tr + eps_va):
        return acc, {}
    s_tr = np.stack([eps_tr[i].state[0] for i in ep_tr.tolist()]).astype(np.float64)
    s_va = np.stack([eps_va[i].state[0] for i in ep_va.tolist()]).astype(np.float64)
    resid = ((ridge_fit(x_tr, torch.from_numpy(s_tr), ridge)(x_va).numpy() - s_va) ** 2).sum(0)
    total = ((s_va - s_va.mean(0)) ** 2).sum(0)
    return acc, {int(d): float(1 - resid[d] / total[d]) for d in np.where(s_va.std(0) > 1e-4)[0]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", nargs="+", default=["runs/demo/behavior/checkpoints/best.ckpt"])
    p.add_argument("--data-config", default="stages/demo/data.yaml")
    p.add_argument("--clip-len", type=int, default=16, help="clip length the prior runs over (training clip_len)")
    p.add_argument("--hop", type=int, default=8)
    p.add_argument("--t-min", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--by-policy", action="store_true",
                   help="also print, for each val policy, the share of its points given to each family")
    p.add_argument("--layout", action="store_true",
                   help="also print how well z names the episode's task and its first state (object/goal positions)")
    p.add_argument("--by-episode", action="store_true",
                   help="also print, for each val episode (task, policy), the share of its points named right")
    p.add_argument("--pooled", action="store_true",
                   help="also probe the window-mean prior's running statistics before its z head (what the head drops)")
    p.add_argument("--posterior", action="store_true",
                   help="also probe the posterior mean of each clip (sees the whole clip: the prior's upper bound)")
    p.add_argument("--stats", action="store_true",
                   help="with --posterior: how well the posterior mean holds each clip's action statistics, and the "
                        "clip-level family probe on those statistics, on z, and on z mapped to them")
    a = p.parse_args(argv)
    if a.stats and not a.posterior:
        raise SystemExit("--stats reads the posterior mean: give --posterior too")
    torch.set_num_threads(a.threads)

    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.behavior_module import BehaviorModule
    from whale_pl.lit.handoff import load_frozen

    dm = MetaWorldDataModule(config=a.data_config)
    eps = {s: dm.episodes(split=s) for s in ("train", "val", "ood")}
    results = []
    for ckpt in a.ckpt:
        t0 = time.time()
        module = load_frozen(ckpt, BehaviorModule, data_spec=dm.data_spec,
                             data_spec_keys=["frame_size", "action_dim", "action_mean", "action_std", "families"])
        families = list(module.hparams.data_spec["families"])
        pooled = a.pooled and module.model.encoder == "window_mean"
        pts = {s: embed_split(module, e, families, a.clip_len, a.hop, a.t_min, pooled=pooled) for s, e in eps.items() if e}
        xtr, ytr, _, _ = pts["train"]
        probe = fit_linear_probe(xtr, ytr, n_classes=len(families))
        acc = {"train": probe.accuracy(xtr, ytr)}
        per_family = {}
        for s in ("val", "ood"):
            if s not in pts:
                continue
            x, y, ep, _ = pts[s]
            keep = y >= 0
            if keep.any():
                acc[s] = probe.accuracy(x[keep], y[keep])
                acc[s + "_episode"] = episode_accuracy(probe, x[keep], y[keep], ep[keep])
            if s == "val":
                pred, y_val, ep_val = probe.predict(x), y, ep
                t_N = torch.arange(a.t_min, a.clip_len).repeat(len(y) // (a.clip_len - a.t_min))  # each point's t
                by_hist = accuracy_by_history((pred == y).numpy(), t_N.numpy())
                per_family = {f: (pred[y == k] == k).double().mean().item() for k, f in enumerate(families) if (y == k).any()}
                shares = family_shares_by_policy(pred, ep, [e.meta["policy"]["name"] for e in eps["val"]], len(families))
        hp = module.hparams
        print(f"{ckpt}: beta={hp.beta} z_dim={module.model.z_dim} "
              f"free_bits={hp.free_bits} | probe accuracy train {acc['train']:.3f}  val (held-out episodes) "
              f"{acc.get('val', float('nan')):.3f}  ood (unseen policies) {acc.get('ood', float('nan')):.3f} | "
              f"chance {1 / len(families):.3f} | whole-episode decisions: val {acc.get('val_episode', float('nan')):.3f} "
              f"ood {acc.get('ood_episode', float('nan')):.3f} | {len(ytr)} train points, t >= {a.t_min} of {a.clip_len}-step clips "
              f"| {time.time() - t0:.0f}s", flush=True)
        print("  val accuracy per family: " + ", ".join(f"{f} {v:.2f}" for f, v in per_family.items()), flush=True)
        if per_family:
            print("  val accuracy by history: " + by_hist, flush=True)
        if a.by_policy and per_family:
            width = max(len(k) for k in shares)
            print("  val points by policy: the share the probe gives each family")
            print(f"    {'':{width}s} " + " ".join(f"{f[:6]:>6}" for f in families))
            for pol, row in shares.items():
                print(f"    {pol:{width}s} " + " ".join(f"{v:6.2f}" for v in row), flush=True)
        if a.by_episode and per_family:
            print("  val episodes: the share of their points given their family (the two families given most)")
            names = [f"{e.meta.get('task')} {e.meta['policy']['name']}" for e in eps["val"]]
            width = max(len(n) for n in names)
            for name, right, top in episode_breakdown(pred, y_val, ep_val, names, families):
                print(f"    {name:{width}s} {right:.2f}  (" + ", ".join(f"{f} {v:.2f}" for f, v in top) + ")", flush=True)
        if a.pooled and module.model.encoder != "window_mean":
            print(f"  --pooled: not for this checkpoint (encoder {module.model.encoder!r}; the pooled statistics are the "
                  "window_mean encoder's)", flush=True)
        elif pooled and "val" in pts:
            htr, hva, yva = pts["train"][3], pts["val"][3], pts["val"][1]
            hp_ = fit_linear_probe(htr, ytr, n_classes=len(families))
            print(f"  the prior's pooled statistics before the z head ({htr.shape[1]} dims): probe train "
                  f"{hp_.accuracy(htr, ytr):.3f} val {hp_.accuracy(hva[yva >= 0], yva[yva >= 0]):.3f}", flush=True)
        if a.posterior and "val" in pts:
            ptr, pytr, str_ = embed_posterior(module, eps["train"], families, a.clip_len, a.hop)
            pva, pyva, sva = embed_posterior(module, eps["val"], families, a.clip_len, a.hop)
            post = fit_linear_probe(ptr, pytr, n_classes=len(families))
            print(f"  posterior mean (one point per clip, sees all of it): probe train {post.accuracy(ptr, pytr):.3f} "
                  f"val {post.accuracy(pva[pyva >= 0], pyva[pyva >= 0]):.3f} ({len(pytr)} train clips)", flush=True)
            if a.stats:
                r2, sacc = stats_readout(ptr, str_, pytr, pva, sva, pyva, len(families))
                A = str_.shape[1] // len(STAT_NAMES)
                print("  posterior mean -> clip action statistics, val R^2: " + "; ".join(
                    f"{n} " + " ".join(f"{v:.2f}" for v in r2[k * A : (k + 1) * A].tolist())
                    for k, n in enumerate(STAT_NAMES)), flush=True)
                print("  clip-level family probe, val: " + ", ".join(f"on {k} {v:.3f}" for k, v in sacc.items()),
                      flush=True)
        if a.layout and "val" in pts:
            task_acc, r2 = layout_readout(xtr, pts["train"][2], eps["train"], pts["val"][0], pts["val"][2], eps["val"])
            print(f"  layout: task probe val {task_acc:.3f}; ridge R^2 of the first state's varying dims: "
                  + ", ".join(f"{d}: {v:.2f}" for d, v in r2.items()), flush=True)
        results.append(acc.get("val", float("nan")))
    print(f"behavior_probe_acc: {results[0]:.3f} fraction")


if __name__ == "__main__":
    sys.exit(main())
