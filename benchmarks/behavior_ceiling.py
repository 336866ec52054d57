"""The honest ceiling for issue 5's probe target, from hand-made causal action statistics.

``benchmarks/behavior_probe.py`` asks a linear probe on the causal prior's z_t (t >= 8 of a clip)
to name the behavior-policy family of held-out val episodes; the target is 0.8. z_t has seen only
the clip's frames and actions up to step t, so this benchmark asks how well the *same* probe does
on features built by hand from exactly that: at every point t >= ``--t-min`` of every clip (hop
``--hop``, the same clips as the probe benchmark), running means over the clip's steps <= t of the
normalised action a, a^2, |a|, the saturation rate (|a| at the [-1, 1] bound), |delta a|,
(delta a)^2, the jump rate (max |delta a| over xyz > 0.5), the near-zero rate, the xyz norm and
its square, plus the running std of a, and the current a_t and |delta a_t|. Bound
and threshold features are taken in the raw action units, i.e. after undoing the per-dim affine
normalisation, which is fixed by the data spec, so every feature is a causal function of the
normalised actions the prior sees (thresholds applied to the normalised values instead lose ~0.02). A multinomial logistic regression
(``whale_pl.analysis.probe.fit_linear_probe``) is fitted on the points of the train episodes and
scored per point on the val episodes, for several clip lengths, with the accuracy by history
length (how many steps the point has seen) and by family. If even these features stay near or
under the target at the training clip length, the target asks for more than a clip's actions
hold; longer clips show what more history buys.

``--expert`` adds the scripted expert's action for the true simulator state (from the episodes'
recorded states via ``whale_pl.data.policies.expert_for``) and residual features against it: an
oracle the prior does not have (it sees frames, not the state), an upper bound on what knowing
the task's expert behaviour could add.

``--frame-expert`` replaces that oracle by an MLP that reads the expert's action off the *frames*
(each frame's tokenizer code grid and its change since the previous frame), fitted on the train
episodes either to the scripted expert's actions (``oracle``: expert labels the behavior model never
gets) or to the behavior data's own actions with an L1 loss (``median``: the action most policies take
at that frame -- all a model without expert labels can learn); it prints how well each predicts the
expert on the val episodes (R^2). It answers whether the frames hold what the target needs.

    .venv/bin/python benchmarks/behavior_ceiling.py                       # clip lengths 16 32 64 120
    .venv/bin/python benchmarks/behavior_ceiling.py --clip-len 16 --expert
    .venv/bin/python benchmarks/behavior_ceiling.py --clip-len 16 32 64 --frame-expert oracle median

Last line: ``behavior_ceiling_acc: <val per-point accuracy at the first clip length> fraction``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch

from whale_pl.analysis.probe import accuracy_by_history, fit_linear_probe
from whale_pl.models.behavior import CHANGE_EDGES, LEVEL_EDGES
from whale_pl.rollout.retracing import ActionNormaliser

# the column groups of causal_features (actions only), in order, with their widths for A action dims
FEATURES = ("a", "a2", "absa", "sat", "absda", "da2", "jump", "near0", "norm", "norm2", "std", "a_t", "absda_t",
            "dhist", "ahist", "turn", "rev")
# the default groups (the hand statistics); "dhist" / "ahist" are the running histograms of delta a / |a| over the
# bins the behavior model's change term uses (CHANGE_EDGES / LEVEL_EDGES): what that term can put into z; "turn" /
# "rev": the running mean of delta a_t * delta a_{t-1} and of its being < 0 (a reversal), per dim
HAND = FEATURES[:13]


def feature_columns(A: int, expert: bool = False) -> np.ndarray:
    """The group name of every column ``causal_features`` returns (``expert`` residual groups as 'expert')."""
    width = {"sat": 3, "jump": 1, "near0": 3, "norm": 1, "norm2": 1}
    names = []
    for g in FEATURES[:10]:
        names += [g] * width.get(g, A)
    if expert:
        names += ["expert"] * (3 * A + 2)
    for g in FEATURES[10:13]:
        names += [g] * A
    names += ["dhist"] * (A * (len(CHANGE_EDGES) + 1)) + ["ahist"] * (A * (len(LEVEL_EDGES) + 1))
    names += ["turn"] * A + ["rev"] * A
    return np.array(names)


def running_histogram(x_TA: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """Row t: per dim, the share of steps <= t whose value falls in each bin ((lo, hi] per bin, as torch.bucketize), [T, A*K]."""
    k = len(edges) + 1
    onehot = np.eye(k)[np.searchsorted(np.asarray(edges), x_TA, side="left")].reshape(len(x_TA), -1)
    return np.cumsum(onehot, 0) / np.arange(1, len(x_TA) + 1)[:, None]


def expert_actions(ep) -> np.ndarray:
    """The scripted expert's action ``[T, A]`` for each recorded simulator state of the episode (clipped to [-1, 1])."""
    from whale_pl.data.policies import expert_for

    ex = expert_for(ep.meta["task"])
    with warnings.catch_warnings():  # Meta-World's "Constant(s) may be too high": we clip, as the collector does
        warnings.simplefilter("ignore", UserWarning)
        a = [np.asarray(ex.get_action(s), np.float64) for s in ep.state.astype(np.float64)]
    return np.clip(np.stack(a), -1, 1)


@torch.no_grad()
def frame_inputs(tok, ep) -> torch.Tensor:
    """[T, 2 * h*w*C]: each frame's tokenizer code grid (frame tokenized alone) and its change since the previous one."""
    from whale_pl.lit.behavior_module import encode_frames_alone

    codes = tok.embed(encode_frames_alone(tok, torch.from_numpy(ep.frames).permute(0, 3, 1, 2))).flatten(1).float()
    return torch.cat([codes, codes - torch.cat([codes[:1], codes[:-1]])], 1)


def state_inputs(eps: dict) -> dict:
    """Each episode's low-dimensional state ``[T, S]``, standardised with the training episodes' mean and std."""
    for s, e in eps.items():
        missing = [ep.meta.get("episode_id") for ep in e if ep.state is None or ep.state.shape[-1] == 0]
        if missing:
            raise ValueError(f"--expert-input state: {s} episodes {missing[:3]} carry no low-dimensional state")
    tr = np.concatenate([ep.state for ep in eps["train"]]).astype(np.float64)
    mu, sd = tr.mean(0), np.maximum(tr.std(0), 1e-3)
    return {s: [torch.from_numpy((ep.state - mu) / sd).float() for ep in e] for s, e in eps.items()}


def fit_frame_expert(x_tr: list, y_tr: list, loss: str, steps: int = 3000, seed: int = 0) -> torch.nn.Module:
    """MLP per-frame inputs (codes or state) -> action, fitted with MSE (``oracle`` labels) or L1 (``median``)
    by AdamW on batches of 256."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X, Y = torch.cat(x_tr), torch.from_numpy(np.concatenate(y_tr)).float()
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, Y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.01)
    for _ in range(steps):
        i = torch.randint(len(X), (256,), generator=g)
        err = net(X[i]) - Y[i]
        out = err.pow(2).mean() if loss == "mse" else err.abs().mean()
        opt.zero_grad()
        out.backward()
        opt.step()
    return net.eval()


def causal_features(a_TA: np.ndarray, raw_TA: np.ndarray, expert_TA: np.ndarray | None = None) -> np.ndarray:
    """Running statistics over one clip: row t uses steps <= t only. ``a_TA`` normalised actions,
    ``raw_TA`` the same in raw units (for bounds and thresholds), ``expert_TA`` optional raw expert actions."""
    n = len(a_TA)
    da = np.diff(a_TA, axis=0, prepend=a_TA[:1])
    draw = np.diff(raw_TA, axis=0, prepend=raw_TA[:1])
    xyz = raw_TA[:, :3]
    norm = np.linalg.norm(xyz, axis=1, keepdims=True)
    cols = [a_TA, a_TA**2, np.abs(a_TA), (np.abs(xyz) > 0.999).astype(float), np.abs(da), da**2,
            (np.abs(draw[:, :3]).max(1, keepdims=True) > 0.5).astype(float),
            (np.abs(xyz) < 0.05).astype(float), norm, norm**2]
    if expert_TA is not None:
        r = raw_TA - expert_TA
        lag3 = np.concatenate([np.repeat(expert_TA[:1], 3, 0), expert_TA[:-3]])  # lag_3's signature
        cols += [r, r**2, np.abs(r), (np.abs(r[:, :3]).max(1, keepdims=True) < 1e-3).astype(float),
                 (np.abs(raw_TA - lag3)[:, :3].max(1, keepdims=True) < 1e-3).astype(float)]
    x = np.concatenate(cols, 1)
    m = np.cumsum(x, 0) / np.arange(1, n + 1)[:, None]
    A = a_TA.shape[1]
    var = np.maximum(m[:, A : 2 * A] - m[:, :A] ** 2, 0)  # running variance of a
    # the changes from t = 1; row 0 has seen none (all zeros), so every row stays causal
    d_hist = np.zeros((n, A * (len(CHANGE_EDGES) + 1)))
    if n > 1:
        d_hist[1:] = running_histogram(np.diff(a_TA, axis=0), CHANGE_EDGES)
    turn = da * np.concatenate([np.zeros_like(da[:1]), da[:-1]])  # delta a_t * delta a_{t-1}, 0 at t <= 1
    turns = np.cumsum(np.concatenate([turn, (turn < 0).astype(float)], 1), 0) / np.arange(1, n + 1)[:, None]
    return np.concatenate([m, np.sqrt(var), a_TA, np.abs(da), d_hist, running_histogram(np.abs(a_TA), LEVEL_EDGES),
                           turns], 1)


def change_histogram_nll(train, val, normaliser, edges: tuple[float, ...] = CHANGE_EDGES) -> dict[str, float]:
    """What the behavior model's change term can reach: the val episodes' mean NLL per step (nats, summed over action
    dims) of the bin of each change a_t - a_{t-1} under per-dim histograms counted on the train episodes -- one for all
    (what a z-free term gets), one per family, one per policy (what knowing the policy gives) -- and under each val
    episode's own histogram (in-sample: a floor). Counts get +0.5 per bin."""
    k = len(edges) + 1

    def bins(ep):
        return np.searchsorted(np.asarray(edges), np.diff(normaliser.normalise(ep.actions).astype(np.float64), axis=0),
                               side="left")

    def counts(b):
        return np.stack([np.bincount(b[:, j], minlength=k) for j in range(b.shape[1])]).astype(np.float64)

    def nll(b, c):
        p = (c + 0.5) / (c + 0.5).sum(1, keepdims=True)
        return float(-np.log(p[np.arange(b.shape[1])[None], b]).sum(1).mean())

    tb = [(ep.meta["policy"], bins(ep)) for ep in train]
    pooled = sum(counts(b) for _, b in tb)
    by = {key: {} for key in ("family", "name")}
    for pol, b in tb:
        for key in by:
            by[key][pol[key]] = by[key].get(pol[key], 0) + counts(b)
    vb = [(ep.meta["policy"], bins(ep)) for ep in val]
    return {"one histogram": float(np.mean([nll(b, pooled) for _, b in vb])),
            "per family": float(np.mean([nll(b, by["family"][p["family"]]) for p, b in vb])),
            "per policy": float(np.mean([nll(b, by["name"][p["name"]]) for p, b in vb])),
            "own episode": float(np.mean([nll(b, counts(b)) for _, b in vb]))}


def split_points(episodes, families, clip_len, hop, t_min, normaliser, experts: list | None = None):
    """Features ``[N, F]``, family labels ``[N]`` and history lengths ``[N]`` of every point t >= t_min of every clip."""
    X, Y, H = [], [], []
    for i, ep in enumerate(episodes):
        T = len(ep)
        if T < clip_len:
            raise ValueError(f"episode {ep.meta.get('episode_id')} has {T} steps < clip_len={clip_len}")
        a = normaliser.normalise(ep.actions).astype(np.float64)  # as the behavior stage sees them
        raw = ep.actions.astype(np.float64)
        ea = experts[i] if experts is not None else None
        y = families.index(ep.meta["policy"]["family"])
        for s0 in range(0, T - clip_len + 1, hop):
            sl = slice(s0, s0 + clip_len)
            f = causal_features(a[sl], raw[sl], None if ea is None else ea[sl])[t_min:]
            X.append(f)
            Y.append(np.full(len(f), y))
            H.append(np.arange(t_min, clip_len))
    return torch.from_numpy(np.concatenate(X)), torch.from_numpy(np.concatenate(Y)), np.concatenate(H)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-config", default="stages/demo/data.yaml")
    p.add_argument("--clip-len", type=int, nargs="+", default=[16, 32, 64, 120],
                   help="clip lengths; the first is the headline (16 = the demo's training clip_len)")
    p.add_argument("--hop", type=int, default=8)
    p.add_argument("--t-min", type=int, default=8)
    p.add_argument("--expert", action="store_true", help="add oracle residuals against the scripted expert's action")
    p.add_argument("--frame-expert", nargs="+", choices=["oracle", "median"], default=[],
                   help="residuals against an MLP reading the expert's action off the frames (see above)")
    p.add_argument("--expert-input", choices=["codes", "state"], default="codes",
                   help="what the --frame-expert MLP reads: the tokenizer's code grid (and its change) per frame, "
                        "or the recorded low-dimensional state (standardised with the training episodes' statistics)")
    p.add_argument("--tokenizer", default="runs/demo/tokenizer/checkpoints/best.ckpt",
                   help="stage-1 checkpoint whose codes --frame-expert reads")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    p.add_argument("--features", nargs="+", choices=FEATURES, default=list(HAND),
                   help="which groups of hand features the probe reads (running means of a, a^2, |a|, the saturation "
                        "rate, |delta a|, (delta a)^2, the jump rate, the near-zero rate, the xyz norm and its square; "
                        "the running std; the current a_t and |delta a_t|; default all of these): which statistics "
                        "carry the ceiling. 'dhist' / 'ahist': running histograms of delta a / |a| over the behavior "
                        "model's change-term bins; 'turn' / 'rev': running mean of delta a_t * delta a_{t-1} and the "
                        "reversal rate (that product < 0)")
    p.add_argument("--change-nll", action="store_true",
                   help="also print the val NLL per step of the action-change bins under train histograms (one for all, "
                        "per family, per policy): the references for the behavior model's change term")
    a = p.parse_args(argv)
    if a.expert and a.frame_expert:
        raise SystemExit("--expert and --frame-expert are separate comparisons: give one of them")
    if a.expert_input != "codes" and not a.frame_expert:
        raise SystemExit(f"--expert-input {a.expert_input} chooses what --frame-expert reads: give --frame-expert too")
    torch.set_num_threads(a.threads)

    from whale_pl.data.datamodule import MetaWorldDataModule

    dm = MetaWorldDataModule(config=a.data_config)
    spec = dm.data_spec
    families = list(spec["families"])
    normaliser = ActionNormaliser.from_data_spec(spec)
    eps = {s: dm.episodes(split=s) for s in ("train", "val")}
    for s, e in eps.items():
        if not e:
            raise ValueError(f"{a.data_config}: no {s} episodes (collect the demo data first)")
    print(f"{len(eps['train'])} train / {len(eps['val'])} val episodes, families {families}, "
          f"expert oracle {'on' if a.expert else 'off'}", flush=True)
    if a.change_nll:
        ref = change_histogram_nll(eps["train"], eps["val"], normaliser)
        print("change-bin NLL per step on val episodes (nats, summed over action dims), histograms counted on train: "
              + ", ".join(f"{k} {v:.3f}" for k, v in ref.items()), flush=True)
    if a.expert or a.frame_expert:
        t0 = time.time()
        true_expert = {s: [expert_actions(ep) for ep in e] for s, e in eps.items()}
        print(f"expert actions for every recorded state ({time.time() - t0:.0f}s)", flush=True)
    # --expert: the oracle alone (as before); otherwise actions only, then each --frame-expert beside it
    variants = {"scripted expert (oracle)": true_expert} if a.expert else {"actions only": {s: None for s in eps}}
    if a.frame_expert:
        from whale_pl.lit.handoff import load_frozen
        from whale_pl.lit.tokenizer_module import TokenizerModule

        if a.expert_input == "codes":
            tok = load_frozen(a.tokenizer, TokenizerModule).model
            x = {s: [frame_inputs(tok, ep) for ep in e] for s, e in eps.items()}
        else:
            x = state_inputs(eps)
        yv = np.concatenate(true_expert["val"])
        for kind in a.frame_expert:
            t0 = time.time()
            labels = true_expert["train"] if kind == "oracle" else [ep.actions for ep in eps["train"]]
            net = fit_frame_expert(x["train"], labels, "mse" if kind == "oracle" else "l1")
            with torch.no_grad():
                pred = {s: [net(xe).clamp(-1, 1).double().numpy() for xe in x[s]] for s in eps}
            r2 = 1 - ((np.concatenate(pred["val"]) - yv) ** 2).mean(0) / yv.var(0)
            print(f"frame expert '{kind}' from {a.expert_input} ({'MSE on expert labels' if kind == 'oracle' else 'L1 on the data actions'}): "
                  f"val R^2 against the scripted expert per action dim {np.round(r2, 3).tolist()} ({time.time() - t0:.0f}s)",
                  flush=True)
            variants[f"frame expert '{kind}'"] = pred

    results = []
    for L in a.clip_len:
        for name, experts in variants.items():
            t0 = time.time()
            xtr, ytr, _ = split_points(eps["train"], families, L, a.hop, a.t_min, normaliser, experts["train"])
            xv, yv, hv = split_points(eps["val"], families, L, a.hop, a.t_min, normaliser, experts["val"])
            cols = feature_columns(int(spec["action_dim"]), expert=experts["train"] is not None)
            if len(cols) != xtr.shape[1]:
                raise RuntimeError(f"feature_columns names {len(cols)} columns, causal_features gives {xtr.shape[1]}")
            keep = torch.from_numpy(np.isin(cols, list(a.features) + ["expert"]))
            xtr, xv = xtr[:, keep], xv[:, keep]
            probe = fit_linear_probe(xtr, ytr, n_classes=len(families), max_iter=500)
            ok = (probe.predict(xv) == yv).numpy()
            by_hist = accuracy_by_history(ok, hv)
            by_fam = [f"{f} {ok[yv.numpy() == k].mean():.2f}" for k, f in enumerate(families) if (yv == k).any()]
            print(f"clip_len {L}, {name}: val per-point accuracy {ok.mean():.3f}  train {probe.accuracy(xtr, ytr):.3f} | "
                  f"{len(ytr)} train / {len(yv)} val points, {xtr.shape[1]} features | {time.time() - t0:.0f}s", flush=True)
            print("  by history: " + by_hist, flush=True)
            print("  by family:  " + ", ".join(by_fam), flush=True)
            results.append(float(ok.mean()))
    print(f"behavior_ceiling_acc: {results[0]:.3f} fraction")


if __name__ == "__main__":
    sys.exit(main())
