"""Real returns of behavior policies in Meta-World: how the held-out policies of a data config were chosen.

    .venv/bin/python scripts/policy_returns.py [--config stages/demo/data.yaml] [--extra overshoot_2] [--seeds 3]

Prints, per task and policy (the config's training and held-out ones, plus ``--extra``), the undiscounted return
over the config's ``max_steps`` recorded steps from start seeds 1000.. (min-max over seeds) and its OOD split.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main() -> None:
    """Print the table."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from whale_pl.data.metaworld import CollectConfig, MetaWorldEnv, rollout
    from whale_pl.data.policies import ood_split

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="stages/demo/data.yaml")
    p.add_argument("--extra", nargs="*", default=["overshoot_2"], help="more policies to roll out")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    c = CollectConfig.from_yaml(a.config)
    for task in c.tasks:
        env = MetaWorldEnv(task, c.size, c.camera)
        try:
            for pol in ["expert", *c.train_policies, *c.ood_policies, *a.extra]:
                r = [rollout(env, pol, 1000 + i, c.max_steps, c.action_repeat).rewards.sum() for i in range(a.seeds)]
                split = "train" if pol in c.train_policies else ood_split(pol, c.train_policies)
                print(f"{task:20s} {pol:22s} {split:12s} {np.min(r):6.0f}-{np.max(r):.0f}", flush=True)
        finally:
            env.close()


if __name__ == "__main__":
    main()
