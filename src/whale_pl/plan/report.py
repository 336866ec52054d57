"""``runs/<scale>/mbpo.md``: the set-up, the table with intervals, the paired verdicts, the bar plot of
success per method and the GIF of one planned episode (real beside imagined, with the uncertainty curve)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from whale_pl.plan.summary import NAMES
from whale_pl.rollout.stats import fmt_ci


def _ci(row: dict | None, nd: int = 2) -> str:
    return fmt_ci(row.get("mean", row.get("diff")), row["ci"], nd) if row else "—"


def plot_success(res: dict, path: Path) -> None:
    """Bar plot of the success rate per method with its 95 % interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = res["summary"]["methods"]
    names = list(ms)
    mean = [ms[m]["success"]["mean"] for m in names]
    lo = [max(0.0, mean[i] - ms[m]["success"]["ci"][0]) for i, m in enumerate(names)]
    hi = [max(0.0, ms[m]["success"]["ci"][1] - mean[i]) for i, m in enumerate(names)]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(names)), mean, yerr=[lo, hi], capsize=4, color=["C0"] * 3 + ["C7"] * (len(names) - 3))
    ax.set_xticks(range(len(names)), [NAMES.get(m, m).replace(" ", "\n", 2) for m in names], fontsize=7)
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    s = res["summary"]
    ax.set_title(f"Meta-World success, {len(s['tasks'])} tasks x {s['starts']} start states (95 % interval)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_gif(wm, ep: dict, path: Path, title: str) -> None:
    """The planned episode: real frame after each decision beside the frame the model imagined for it,
    with the chosen plan's first-step uncertainty."""
    from whale_pl.rollout.gif import write_rollout_gif

    real_TCHW = np.ascontiguousarray(np.asarray(ep["frames"])[1:].transpose(0, 3, 1, 2))
    imag_TCHW = wm.decode(ep["imagined_ids"][None])[0].cpu().numpy()
    write_rollout_gif(path, real_TCHW, imag_TCHW, np.asarray(ep["uncertainty_D"]), title=title,
                      labels=("real", "imagined (plan's 1st step)"), uncertainty_label="uncertainty of the plan")


def table_lines(res: dict) -> list[str]:
    """The table of every method's figures with intervals."""
    L = ["| method | success rate | return | imagined − real return | consistency rate | λ |",
         "|---|---|---|---|---|---|"]
    for m, f in res["summary"]["methods"].items():
        lam = res["lambdas"]["chosen"].get(m.removeprefix("plan_"), 0.0 if m == "plan_none" else None)
        L.append(f"| {NAMES.get(m, m)} | {_ci(f['success'])} | {_ci(f['return'], 1)} | "
                 f"{_ci(f.get('exploitation'), 1)} | {_ci(f.get('consistency'))} | {'' if lam is None else lam} |")
    return L


def md_lines(res: dict) -> list[str]:
    """The whole of ``mbpo.md``."""
    s, p = res["summary"], res["plan"]
    L = [f"# Model-based control in imagination ({res['scale']} scale)", "",
         f"Command: `{res['command']}` ({res['seconds'] / 60:.1f} min). Planner: CEM, N={p['samples']} candidates of "
         f"H={p['horizon']} decisions, {p['iterations']} iterations ({p['elites']} elites), {p['context']} real "
         f"context frame(s), {res['maskgit_steps']} MaskGIT step(s) per imagined frame, discount {p['discount']}; "
         f"retracing K={p['K']}; ensemble of {len(res['members'])} on-models ({', '.join(res['members'])}); the "
         f"planning model is the first. A decision is held {res['hold']} simulator steps (the model's clock); "
         f"{res['decisions']} decisions an episode. z: the behavior prior over the real history, then the imagined "
         "frames with the candidate's actions.", "",
         f"Evaluation: tasks {', '.join(s['tasks'])}, {s['starts']} start states each (seed base "
         f"{res['evaluate']['seed']}, disjoint from the dataset's episode seeds), the same for every method. λ "
         f"chosen on {res['evaluate']['tune_starts']} other start state(s) per task (seed base "
         f"{res['evaluate']['tune_seed']}) by mean real return: " +
         "; ".join(f"{pen}: {g} -> {res['lambdas']['chosen'][pen]}" for pen, g in res["lambdas"]["grid"].items()) +
         ". Returns are discounted per decision. Intervals: 95 % bootstrap over start states within each task, "
         "paired across methods.", "", *table_lines(res), "",
         "Imagined − real return: the reward head's prediction of each executed action (the chosen plan's first "
         "step) summed like the real return, minus the real return (model exploitation). Consistency rate: share "
         "of episodes whose imagined success (a first-step success probability > 0.5) agrees with the real one.",
         "", "## Paired comparisons", "", "| comparison | difference | verdict |", "|---|---|---|"]
    L += [f"| {k} | {_ci(v)} | {v['verdict']} |" for k, v in s["comparisons"].items()]
    L += ["", f"![success per method]({Path(res['plot']).name})", ""]
    if res.get("gif"):
        L += [f"One planned episode ({res['gif_caption']}): ![planned episode]({Path(res['gif']).name})", ""]
    return L
