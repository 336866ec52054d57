"""What knowing the behavior-policy family is worth to the behavior stage's action decoder, in nats.

Issue 5's probe asks z to carry the family; the stage's loss (action NLL + beta * KL) only rewards z for
information that lowers the action NLL by more than it costs in KL. This benchmark measures that
worth directly: it trains the stage's own decoder (``BehaviorModel.decode``: grid pooling of the frozen
tokenizer's codes of o_t, a_{t-1} with ``decoder_prev_action``, and a conditioning vector) three times on
the same clips, with the conditioning vector

- ``none``: zeros (what the decoder does with no behavior information),
- ``family``: the one-hot behavior-policy family (an oracle z that carries exactly the family),
- ``policy``: the one-hot behavior policy (finer: noise_0.1 and noise_0.5 apart),

and scores each on the held-out val episodes' 16-step clips: mean action NLL per step (nats, summed over
action dims). ``none - family`` is what a z that carried the family perfectly could gain per step; the
VAE spends ``beta * KL`` per step on whatever z does carry (``val/kl`` in the stage's TensorBoard logs).

    .venv/bin/python benchmarks/behavior_family_value.py              # demo data and tokenizer
    .venv/bin/python benchmarks/behavior_family_value.py --steps 3000

Last line: ``behavior_family_value: <val NLL none - family> nats/step``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from whale_pl.models.behavior import BehaviorModel, gaussian_nll
from whale_pl.rollout.retracing import ActionNormaliser


@torch.no_grad()
def episode_codes(tok, ep) -> torch.Tensor:
    """[T, h, w, C] code vectors of an episode's frames, each frame tokenized alone (as the code cache does)."""
    from whale_pl.lit.behavior_module import encode_frames_alone

    return tok.embed(encode_frames_alone(tok, torch.from_numpy(ep.frames).permute(0, 3, 1, 2))).float()


def clips(data: list, clip_len: int, starts: list[list[int]]):
    """Stack clips: codes [N,T,h,w,C], actions [N,T,A], labels [N, 2] (family, policy)."""
    c, a, y = [], [], []
    for (codes, act, lab), ss in zip(data, starts):
        for s in ss:
            c.append(codes[s : s + clip_len])
            a.append(act[s : s + clip_len])
            y.append(lab)
    return torch.stack(c), torch.stack(a), torch.tensor(y)


def condition(y_N2: torch.Tensor, kind: str, n_fam: int, n_pol: int) -> torch.Tensor:
    """[N, n_fam + n_pol] conditioning vectors: zeros, the family one-hot, or the policy one-hot."""
    z = torch.zeros(len(y_N2), n_fam + n_pol)
    if kind == "family":
        z[torch.arange(len(y_N2)), y_N2[:, 0]] = 1.0
    elif kind == "policy":
        z[torch.arange(len(y_N2)), n_fam + y_N2[:, 1]] = 1.0
    return z


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-config", default="stages/demo/data.yaml")
    p.add_argument("--tokenizer", default="runs/demo/tokenizer/checkpoints/best.ckpt")
    p.add_argument("--clip-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    from whale_pl.data.datamodule import MetaWorldDataModule
    from whale_pl.lit.handoff import load_frozen
    from whale_pl.lit.tokenizer_module import TokenizerModule

    dm = MetaWorldDataModule(config=a.data_config)
    spec = dm.data_spec
    families, policies = list(spec["families"]), list(spec["policies"])
    norm = ActionNormaliser.from_data_spec(spec)
    tok = load_frozen(a.tokenizer, TokenizerModule).model
    t0 = time.time()
    data = {}
    for s in ("train", "val"):
        eps = dm.episodes(split=s)
        if not eps:
            raise SystemExit(f"{a.data_config}: no {s} episodes (collect the demo data first)")
        data[s] = [(episode_codes(tok, ep), torch.from_numpy(norm.normalise(ep.actions).astype(np.float32)),
                    (families.index(ep.meta["policy"]["family"]), policies.index(ep.meta["policy"]["name"])))
                   for ep in eps]
    print(f"{len(data['train'])} train / {len(data['val'])} val episodes tokenized ({time.time() - t0:.0f}s)", flush=True)
    val_starts = [list(range(0, len(act) - a.clip_len + 1, 8)) for _, act, _ in data["val"]]
    vc, va, vy = clips(data["val"], a.clip_len, val_starts)
    _, h, w, C = data["train"][0][0].shape
    A = data["train"][0][1].shape[1]
    nf, npol = len(families), len(policies)
    results = {}
    for kind in ("none", "family", "policy"):
        torch.manual_seed(a.seed)
        g = np.random.default_rng(a.seed)
        model = BehaviorModel(C, A, h * w, z_dim=nf + npol, decoder_prev_action=True)
        params = list(model.pool.parameters()) + list(model.decoder.parameters())
        opt = torch.optim.AdamW(params, 1e-3, weight_decay=0.01)
        t0 = time.time()
        for _ in range(a.steps):
            eps_i = g.integers(len(data["train"]), size=a.batch_size)
            starts = [[int(g.integers(len(data["train"][i][1]) - a.clip_len + 1))] for i in eps_i]
            c, act, y = clips([data["train"][i] for i in eps_i], a.clip_len, starts)
            z = condition(y, kind, nf, npol)[:, None].expand(-1, a.clip_len, -1)
            mu, logvar = model.decode(model.frame_features(c), z, act)
            loss = gaussian_nll(act, mu, logvar).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            nll = []
            for i in range(0, len(vc), 64):
                z = condition(vy[i : i + 64], kind, nf, npol)[:, None].expand(-1, a.clip_len, -1)
                mu, logvar = model.decode(model.frame_features(vc[i : i + 64]), z, va[i : i + 64])
                nll.append(gaussian_nll(va[i : i + 64], mu, logvar).sum(-1).flatten())
            results[kind] = torch.cat(nll).mean().item()
        print(f"conditioning {kind:7s}: val action NLL {results[kind]:.3f} nats/step (train loss at the end "
              f"{loss.item():.3f}; {a.steps} steps, {time.time() - t0:.0f}s)", flush=True)
    print(f"knowing the family lowers the val NLL by {results['none'] - results['family']:.3f} nats/step, the policy "
          f"by {results['none'] - results['policy']:.3f}")
    print(f"behavior_family_value: {results['none'] - results['family']:.3f} nats/step")


if __name__ == "__main__":
    sys.exit(main())
