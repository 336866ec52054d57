"""Linear-probe accuracy of the behavior prior's z_t on held-out episodes (stage 2's quality measure).

For each behavior checkpoint: cut every episode of the dataset into clips of ``--clip-len`` steps on the
checkpoint's clock (every ``frame_stride``-th recorded frame, actions composed over ``frame_stride`` steps,
as its datamodule cut them; hop ``--hop`` recorded steps), run the frozen tokenizer (each frame alone) and
the causal prior on each clip, and keep the prior mean z_t for t >= ``--t-min`` (z_t has seen steps <= t only). A multinomial logistic regression fitted on
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
    .venv/bin/python benchmarks/behavior_probe.py --posterior           # the posterior mean's probe (the bound)

Last line: ``behavior_probe_acc: <val accuracy of the first checkpoint> fraction``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from whale_pl.analysis.probe import fit_linear_probe
from whale_pl.data.actions import ActionNormaliser


def accuracy_by_history(correct_N, t_N) -> str:
    """'t 8-15 0.60, t 16-31 0.76, ...': the share of correct points whose history length t falls in each
    bucket (empty buckets left out). Arrays or tensors of the same length."""
    ok, t = np.asarray(correct_N, dtype=float), np.asarray(t_N)
    return ", ".join(f"t {lo}-{hi - 1} {ok[(t >= lo) & (t < hi)].mean():.2f}"
                     for lo, hi in ((8, 16), (16, 32), (32, 64), (64, 120)) if ((t >= lo) & (t < hi)).any())


def clips_of(ep, clip_len: int, hop: int, norm: ActionNormaliser):
    """All clips of one episode on the clock ``k = norm.base`` (every k-th frame, actions composed over k
    recorded steps and normalised as the datamodule does): uint8 frames [N,T,3,H,W], actions [N,T,A]."""
    k, T = norm.base, len(ep)
    if T < clip_len * k:
        raise ValueError(f"episode {ep.meta.get('episode_id')} has {T} steps < clip_len x frame_stride = {clip_len * k}")
    starts = np.arange(0, T - clip_len * k + 1, hop)
    idx = starts[:, None] + k * np.arange(clip_len)[None]
    frames = torch.from_numpy(np.ascontiguousarray(ep.frames[idx])).permute(0, 1, 4, 2, 3)
    a_raw = ep.actions[idx] if k == 1 else norm.space.compose(ep.actions[idx[..., None] + np.arange(k)])
    return frames, torch.from_numpy(norm.normalise(a_raw, k))


def action_norm(module) -> ActionNormaliser:
    """The checkpoint's action normalisation and clock (its data_spec's statistics and frame_stride)."""
    return ActionNormaliser.from_data_spec(module.hparams.data_spec)


@torch.no_grad()
def embed_split(module, episodes, families, clip_len, hop, t_min, batch=32):
    """Every point t >= t_min of every clip: the prior mean z_t (``behavior_z``), its family index (-1: a family
    the checkpoint does not know) and its episode index."""
    norm = action_norm(module)
    zs, ys, es = [], [], []
    for e, ep in enumerate(episodes):
        fam = ep.meta["policy"]["family"]
        frames, actions = clips_of(ep, clip_len, hop, norm)
        for i in range(0, len(frames), batch):
            codes = module.batch_codes({"frames": frames[i : i + batch]})
            z = module.model.prior(codes, actions[i : i + batch])[0][:, t_min:]
            zs.append(z.flatten(0, 1))
            ys.append(torch.full((z.shape[0] * z.shape[1],), families.index(fam) if fam in families else -1))
            es.append(torch.full((z.shape[0] * z.shape[1],), e))
    return torch.cat(zs), torch.cat(ys), torch.cat(es)


def ridge_fit(x_NZ: torch.Tensor, y_NK: torch.Tensor, ridge: float = 1e-2):
    """Ridge regression with an intercept; returns the fitted map x -> y."""
    X = torch.cat([x_NZ.double(), torch.ones(len(x_NZ), 1, dtype=torch.float64)], 1)
    W = torch.linalg.solve(X.T @ X + ridge * torch.eye(X.shape[1], dtype=torch.float64), X.T @ y_NK.double())
    return lambda x: torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1) @ W


@torch.no_grad()
def embed_posterior(module, episodes, families, clip_len, hop, batch=32):
    """The posterior mean of every clip (it has seen the whole clip): [N, Z] and families [N]. The posterior mean
    bounds what the prior, trained to predict it from the history, can carry."""
    norm = action_norm(module)
    zs, ys = [], []
    for ep in episodes:
        fam = ep.meta["policy"]["family"]
        frames, actions = clips_of(ep, clip_len, hop, norm)
        for i in range(0, len(frames), batch):
            codes = module.batch_codes({"frames": frames[i : i + batch]})
            mu_BZ, _ = module.model.posterior(codes, actions[i : i + batch])
            zs.append(mu_BZ.float())
            ys.append(torch.full((len(mu_BZ),), families.index(fam) if fam in families else -1))
    return torch.cat(zs), torch.cat(ys)


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
    that fails in one task only shows here and not in ``--by-policy``.
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


def probe_splits(module, eps: dict, families: list[str], a) -> dict:
    """Embed every split, fit the family probe on the train points and score it on val and OOD: accuracies per
    point and per whole episode, and for val the probe's predictions with their labels and episodes."""
    pts = {s: embed_split(module, e, families, a.clip_len, a.hop, a.t_min) for s, e in eps.items() if e}
    xtr, ytr, _ = pts["train"]
    probe = fit_linear_probe(xtr, ytr, n_classes=len(families))
    acc = {"train": probe.accuracy(xtr, ytr)}
    for s in ("val", "ood"):
        if s not in pts:
            continue
        x, y, ep = pts[s]
        keep = y >= 0
        if keep.any():
            acc[s] = probe.accuracy(x[keep], y[keep])
            acc[s + "_episode"] = episode_accuracy(probe, x[keep], y[keep], ep[keep])
    val = None
    if "val" in pts:
        x, y, ep = pts["val"]
        val = {"pred": probe.predict(x), "y": y, "ep": ep}
    return {"pts": pts, "acc": acc, "val": val}


def print_summary(ckpt: str, module, res: dict, families: list[str], a, seconds: float) -> None:
    """The checkpoint's headline line, then val accuracy per family and by history length."""
    acc, hp, nan = res["acc"], module.hparams, float("nan")
    print(f"{ckpt}: beta={hp.beta} z_dim={module.model.z_dim} "
          f"kl_balance={hp.kl_balance} | probe accuracy train {acc['train']:.3f}  val (held-out episodes) "
          f"{acc.get('val', nan):.3f}  ood (unseen policies) {acc.get('ood', nan):.3f} | "
          f"chance {1 / len(families):.3f} | whole-episode decisions: val {acc.get('val_episode', nan):.3f} "
          f"ood {acc.get('ood_episode', nan):.3f} | {len(res['pts']['train'][1])} train points, t >= {a.t_min} of "
          f"{a.clip_len}-step clips | {seconds:.0f}s", flush=True)
    v = res["val"]
    per_family = {} if v is None else {f: (v["pred"][v["y"] == k] == k).double().mean().item()
                                       for k, f in enumerate(families) if (v["y"] == k).any()}
    print("  val accuracy per family: " + ", ".join(f"{f} {x:.2f}" for f, x in per_family.items()), flush=True)
    if per_family:
        t_N = torch.arange(a.t_min, a.clip_len).repeat(len(v["y"]) // (a.clip_len - a.t_min))  # each point's t
        print("  val accuracy by history: " + accuracy_by_history((v["pred"] == v["y"]).numpy(), t_N.numpy()),
              flush=True)


def print_val_breakdowns(res: dict, val_eps: list, families: list[str], by_policy: bool, by_episode: bool) -> None:
    """``--by-policy``: the share of each val policy's points given to each family; ``--by-episode``: the share of
    each val episode's points given its own family, and the two families given most."""
    v = res["val"]
    if v is None or not (v["y"] >= 0).any():
        return
    if by_policy:
        shares = family_shares_by_policy(v["pred"], v["ep"], [e.meta["policy"]["name"] for e in val_eps], len(families))
        width = max(len(k) for k in shares)
        print("  val points by policy: the share the probe gives each family")
        print(f"    {'':{width}s} " + " ".join(f"{f[:6]:>6}" for f in families))
        for pol, row in shares.items():
            print(f"    {pol:{width}s} " + " ".join(f"{x:6.2f}" for x in row), flush=True)
    if by_episode:
        print("  val episodes: the share of their points given their family (the two families given most)")
        names = [f"{e.meta.get('task')} {e.meta['policy']['name']}" for e in val_eps]
        width = max(len(n) for n in names)
        for name, right, top in episode_breakdown(v["pred"], v["y"], v["ep"], names, families):
            print(f"    {name:{width}s} {right:.2f}  (" + ", ".join(f"{f} {x:.2f}" for f, x in top) + ")", flush=True)


def print_posterior(module, eps: dict, families: list[str], a) -> None:
    """``--posterior``: the family probe on each clip's posterior mean (train clips -> val clips)."""
    ptr, pytr = embed_posterior(module, eps["train"], families, a.clip_len, a.hop)
    pva, pyva = embed_posterior(module, eps["val"], families, a.clip_len, a.hop)
    post = fit_linear_probe(ptr, pytr, n_classes=len(families))
    print(f"  posterior mean (one point per clip, sees all of it): probe train {post.accuracy(ptr, pytr):.3f} "
          f"val {post.accuracy(pva[pyva >= 0], pyva[pyva >= 0]):.3f} ({len(pytr)} train clips)", flush=True)


def print_layout(res: dict, eps: dict) -> None:
    """``--layout``: how well z names the episode's task and its first state's varying dims."""
    (xtr, _, ep_tr), (xva, _, ep_va) = res["pts"]["train"], res["pts"]["val"]
    task_acc, r2 = layout_readout(xtr, ep_tr, eps["train"], xva, ep_va, eps["val"])
    print(f"  layout: task probe val {task_acc:.3f}; ridge R^2 of the first state's varying dims: "
          + ", ".join(f"{d}: {x:.2f}" for d, x in r2.items()), flush=True)


def parse_args(argv: list[str] | None):
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", nargs="+", default=["runs/demo/behavior/checkpoints/best.ckpt"])
    p.add_argument("--data-config", default="stages/demo/data.yaml")
    p.add_argument("--clip-len", type=int, default=12, help="clip length the prior runs over (training clip_len)")
    p.add_argument("--hop", type=int, default=8)
    p.add_argument("--t-min", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--by-policy", action="store_true",
                   help="also print, for each val policy, the share of its points given to each family")
    p.add_argument("--layout", action="store_true",
                   help="also print how well z names the episode's task and its first state (object/goal positions)")
    p.add_argument("--by-episode", action="store_true",
                   help="also print, for each val episode (task, policy), the share of its points named right")
    p.add_argument("--posterior", action="store_true",
                   help="also probe the posterior mean of each clip (sees the whole clip: the prior's upper bound)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Probe each checkpoint; the last line is the first checkpoint's val accuracy."""
    a = parse_args(argv)
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
        res = probe_splits(module, eps, families, a)
        print_summary(ckpt, module, res, families, a, time.time() - t0)
        print_val_breakdowns(res, eps["val"], families, a.by_policy, a.by_episode)
        if a.posterior and eps["val"]:
            print_posterior(module, eps, families, a)
        if a.layout and res["val"] is not None:
            print_layout(res, eps)
        results.append(res["acc"].get("val", float("nan")))
    print(f"behavior_probe_acc: {results[0]:.3f} fraction")


if __name__ == "__main__":
    sys.exit(main())
