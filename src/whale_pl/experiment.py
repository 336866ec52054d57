"""The headline experiment (docs/method.md, "the headline claims"), one command, written to a report.

    python -m whale_pl.experiment --scale demo

(1) Behavior-conditioning on against off: OOD value gap and return correlation of the stage's dynamics
model and the same config trained with ``use_behavior: false`` (``runs/<scale>/dynamics_off/0``).
(2) Retracing against a deep ensemble (``runs/<scale>/ensemble/<seed>``, smaller and briefer, member 0
the retracing model): AUROC and Spearman of the per-step uncertainty against the true per-step error
on the same rollouts, and the cost ratio. Side models train with ``whale fit`` (reused once ``DONE`` is
present); ``--train-only`` stops there. Writes ``runs/<scale>/experiment.{json,md}`` and plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from whale_pl.io import write_json_atomic, write_text_atomic
from whale_pl.pipeline import fmt_elapsed

MEMBER_DEFAULTS = {"demo": (64, 2, 4, 120)}  # scale -> (dim, depth, heads, max_steps) of the ensemble members
MODES = ("open_loop", "closed_loop")


def _no_eval_callback(scale: str) -> list[str]:
    """CLI overrides that silence the stage YAML's EvalCallback (the last callback) for side runs."""
    import yaml

    cfg = yaml.safe_load((Path("stages") / scale / "dynamics.yaml").read_text())
    cbs = (cfg.get("trainer") or {}).get("callbacks") or []
    if cbs and str(cbs[-1].get("class_path", "")).endswith("EvalCallback"):
        return ["--trainer.callbacks.init_args.every_n_val_epochs", "1000000"]
    return []


def wait_for(path: Path, what: str, timeout: float = 7200.0) -> None:
    """Block until ``path`` exists (another process is producing it), printing once."""
    if not path.is_file():
        print(f"[experiment] waiting for {what} ({path})", flush=True)
    t0 = time.time()
    while not path.is_file():
        if time.time() - t0 > timeout:
            raise SystemExit(f"[experiment] gave up waiting for {path} after {timeout:.0f}s: build {what} first")
        time.sleep(5)


def train_member(scale: str, group: str, seed: int, use_behavior: bool, size: tuple[int, int, int] | None,
                 steps: int | None, runs: Path, extra: list[str]) -> tuple[Path, float]:
    """Train (or reuse) one dynamics model with the stage's config; returns (checkpoint, seconds).
    ``size`` / ``steps`` None: the stage config's own model size / step budget."""
    run_dir = runs / scale / group / str(seed)
    if (run_dir / "DONE").is_file():
        info = json.loads((run_dir / "DONE").read_text())
        print(f"[experiment] {group}/{seed}: complete, reusing {info['ckpt']}", flush=True)
        return Path(info["ckpt"]), float(info["seconds"])
    cmd = [sys.executable, "-m", "whale_pl.cli", "fit", "--config", str(Path("stages") / scale / "dynamics.yaml"),
           "--seed_everything", str(seed), *_no_eval_callback(scale),
           "--trainer.logger.init_args.save_dir", str(runs / scale / group), "--trainer.logger.init_args.name",
           str(seed), "--model.init_args.use_behavior", "true" if use_behavior else "false"]
    if steps is not None:
        cmd += ["--trainer.max_steps", str(steps), "--data.init_args.steps_per_epoch", str(steps)]
    for key, v in zip(("dim", "depth", "heads"), size or ()):
        cmd += [f"--model.init_args.net.{key}", str(v)]
    cmd += list(extra)
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        cmd += ["--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]
    print(f"[experiment] {group}/{seed}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise SystemExit(f"[experiment] training {group}/{seed} failed (exit {proc.returncode}); rerun to resume")
    seconds = time.time() - t0
    ckpt = next((p for p in (run_dir / "checkpoints" / n for n in ("best.ckpt", "last.ckpt")) if p.is_file()), None)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoints/best.ckpt or last.ckpt under {run_dir}")
    write_json_atomic(run_dir / "DONE", {"ckpt": str(ckpt), "seconds": seconds, "steps": steps, "seed": seed,
                                         "use_behavior": use_behavior, "size": None if size is None else list(size)})
    print(f"[experiment] {group}/{seed}: trained in {fmt_elapsed(seconds)}", flush=True)
    return ckpt, seconds


def _global_step(ckpt: Path) -> int | None:
    """The global step a checkpoint was saved at (None if unreadable)."""
    from whale_pl.lit.checkpoint import read_checkpoint

    try:
        return int(read_checkpoint(ckpt)["global_step"])
    except Exception:  # noqa: BLE001 - a figure for the report, not a gate
        return None


def _f(x, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _value_row(name: str, v: dict, mode: str) -> str:
    m = v.get(mode)
    if m is None:
        return f"| {name} | {mode} | n/a | n/a | n/a | n/a | n/a |"
    ood, al = m.get("ood") or {}, m.get("all") or {}
    return (f"| {name} | {mode} | {_f(ood.get('value_gap'))} | {_f(ood.get('spearman'), 2)} | "
            f"{_f(ood.get('pearson'), 2)} | {_f(al.get('value_gap'))} | {_f(al.get('regret_at_1'))} |")


def verdicts(res: dict) -> list[str]:
    """Does each headline claim reproduce here? Stated plainly, whatever the answer."""
    out = []
    for mode in MODES:
        a, b = ((res[k]["value"].get(mode) or {}).get("ood") for k in ("main", "off"))
        if not a or not b:
            out.append(f"- (1) {mode}: OOD figures undefined (too few OOD policies or equal real returns).")
            continue
        gap = "lower with conditioning (claim reproduces)" if a["value_gap"] < b["value_gap"] else \
            "NOT lower with conditioning (claim does not reproduce)"
        corr = "higher" if (a["spearman"] or -2) > (b["spearman"] or -2) else "not higher"
        out.append(f"- (1) {mode}: OOD value gap on {_f(a['value_gap'])} vs off {_f(b['value_gap'])} -> {gap}; "
                   f"OOD Spearman on {_f(a['spearman'], 2)} vs off {_f(b['spearman'], 2)} -> {corr}.")
    u = res["uncertainty"]
    r, e = u["quality_vs_mse"]["retracing_score"], u["quality_vs_mse"]["ensemble_score"]
    worse = [n for n, ok in (("AUROC", (r["auroc"] or 0) >= (e["auroc"] or 0)),
                             ("Spearman", (r["spearman"] or -2) >= (e["spearman"] or -2))) if not ok]
    quality = "at least as good (claim reproduces)" if not worse else \
        f"not as good on {', '.join(worse)} (claim does not reproduce)"
    ratio = u.get("cost_ratio_ensemble_over_retracing")
    out.append(f"- (2) retracing AUROC {_f(r['auroc'], 2)} vs ensemble {_f(e['auroc'], 2)}, Spearman "
               f"{_f(r['spearman'], 2)} vs {_f(e['spearman'], 2)} -> {quality}; inference cost: the ensemble takes "
               f"{_f(ratio, 2)}x the retracing time ({'retracing cheaper' if ratio and ratio > 1 else 'retracing NOT cheaper'}), "
               f"training cost {res['members']}x (N models against one).")
    return out


def _setup_lines(res: dict, cmd: str) -> list[str]:
    """The experiment's command, evaluation set and models, for the top of ``experiment.md``."""
    steps = [("?" if st is None else str(st)) for st in (res.get("steps_trained") or [None, None])[:2]]
    return [f"# Headline experiment ({res['scale']} scale)", "",
            f"Command: `{cmd}` (total {fmt_elapsed(res['seconds'])}; training {fmt_elapsed(res['train_seconds'])}).",
            "", f"Evaluation set: tasks {', '.join(res['tasks'])}; {res['starts']} start state(s) per task; horizon "
            f"{res['horizon']}; discount {res['discount']}; training policies {', '.join(res['train_policies'])}; "
            f"OOD policies {', '.join(res['ood_policies'])}. Real returns from Meta-World, imagined returns from the "
            "reward head, same start states.", "",
            f"Models: (1) the stage's dynamics model (`{res['main']['dynamics']}`, behavior on) against the same "
            f"config with behavior-conditioning off (seed 0), trained for {steps[0]} and {steps[1]} steps; "
            f"(2) {res['members']} ensemble members (behavior on, seeds 0..{res['members'] - 1}), each dim "
            f"{res['member_size'][0]}, depth {res['member_size'][1]}, {res['member_steps']} steps, else the stage "
            "config; member 0 is the retracing model, so both methods score the same rollouts.", ""]


def write_report(res: dict, path: Path, cmd: str) -> None:
    """``experiment.md``: the set-up, the verdicts, the tables of (1) and (2), the plots."""
    L = _setup_lines(res, cmd) + ["## Verdicts", "", *verdicts(res), "", "## (1) Behavior-conditioning on vs off", "",
                                  "| model | mode | OOD value gap | OOD Spearman | OOD Pearson | all: value gap | "
                                  "all: regret@1 |", "|---|---|---|---|---|---|---|"]
    for name, key in (("on (stage model)", "main"), ("off (same config)", "off"), ("member 0 (small, on)", "on")):
        L += [_value_row(name, res[key]["value"], mode) for mode in MODES]
    L += ["", "Real and imagined returns per policy:", "",
          "| policy | split | real | " + " | ".join(f"{k} {m}" for k in ("on", "off") for m in ("open", "closed")) + " |",
          "|---|---|---|---|---|---|---|"]
    v_on, v_off = res["main"]["value"], res["off"]["value"]
    for i, p in enumerate(v_on["policies"]):
        cells = [_f((v.get(m) or {}).get("imagined_return", [None] * (i + 1))[i], 2) for v in (v_on, v_off) for m in MODES]
        L.append(f"| {p} | {v_on['split'][i]} | {_f(v_on['real_return'][i], 2)} | " + " | ".join(cells) + " |")
    u = res["uncertainty"]
    L += ["", f"## (2) Retracing (K={u['K']}) vs a {u['ensemble_size']}-member ensemble", "",
          f"Same open-loop rollouts of member 0 ({u['steps_scored']} imagined steps with >= 2 anchors). True error: "
          "pixel MSE of the decoded frame and share of wrong tokens against the real frame. AUROC: "
          "bad step = error above the median.", "",
          "| uncertainty | AUROC (MSE) | Spearman (MSE) | AUROC (tokens) | Spearman (tokens) |", "|---|---|---|---|---|"]
    for k, a in u["quality_vs_mse"].items():
        b = u["quality_vs_token_err"][k]
        L.append(f"| {k} | {_f(a['auroc'])} | {_f(a['spearman'])} | {_f(b['auroc'])} | {_f(b['spearman'])} |")
    mu = res["main"].get("uncertainty", {}).get("quality_vs_mse", {}).get("retracing_score")
    if mu:
        L.append(f"| stage model: retracing_score | {_f(mu['auroc'])} | {_f(mu['spearman'])} | | |")
    s = u["seconds"]
    L += ["", f"Cost: retracing {s['retracing']:.1f} s, ensemble {s['ensemble']:.1f} s for the same steps -> ratio "
          f"{_f(u.get('cost_ratio_ensemble_over_retracing'), 2)}; training {fmt_elapsed(res['member_train_seconds'][0])} "
          f"for one model against {fmt_elapsed(sum(res['member_train_seconds']))} for the ensemble.", "",
          "## Plots", "", *(f"- {name}: ![{name}]({Path(p).name})" for name, p in res["plots"].items()), "",
          "Regenerate: the command above (reuses trained members; delete `runs/<scale>/ensemble*` to retrain).", ""]
    write_text_atomic(path, "\n".join(L))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m whale_pl.experiment``."""
    p = argparse.ArgumentParser(prog="python -m whale_pl.experiment", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    p.add_argument("--runs", default="runs")
    p.add_argument("--data-config", default=None, help="default stages/<scale>/data.yaml")
    p.add_argument("--dynamics", default=None, help="the stage model; default runs/<scale>/dynamics best.ckpt")
    p.add_argument("--members", type=int, default=5)
    for name in ("dim", "depth", "heads", "steps"):
        p.add_argument(f"--member-{name}", type=int, default=None)
    p.add_argument("--starts", type=int, default=1)
    p.add_argument("--horizon", type=int, default=None,
                   help="imagined steps (model steps); default: 24, or fewer when the training episodes are shorter")
    p.add_argument("--discount", type=float, default=0.99)
    p.add_argument("--K", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1, help="ensemble members trained at once (one process each; 2 on a "
                   "2-core machine once the stage models are done)")
    p.add_argument("--train-only", action="store_true",
                   help="train (or reuse) the off model and the ensemble members, then stop")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `whale fit` overrides for the members (last on the command line)")
    a = p.parse_args(argv)
    if a.members < 2:
        p.error(f"--members must be >= 2, got {a.members}")
    a.main_ckpt = Path(a.dynamics) if a.dynamics else Path(a.runs) / a.scale / "dynamics" / "checkpoints" / "best.ckpt"
    if not a.train_only and not a.main_ckpt.is_file():
        p.error(f"the stage's dynamics checkpoint {a.main_ckpt} is missing: train it first "
                f"(python -m whale_pl.pipeline dynamics --scale {a.scale})")
    a.data_config = a.data_config or str(Path("stages") / a.scale / "data.yaml")
    dim, depth, heads, steps = MEMBER_DEFAULTS.get(a.scale, (128, 4, 4, 600))
    a.size = (a.member_dim or dim, a.member_depth or depth, a.member_heads or heads)
    a.steps = a.member_steps or steps
    return a


def train_side_models(a: argparse.Namespace) -> dict:
    """Train (or reuse) the behavior-off model (the stage config as is) and the ensemble members."""
    from concurrent.futures import ThreadPoolExecutor

    t0, runs = time.time(), Path(a.runs)
    wait_for(runs / a.scale / "tokenizer" / "DONE", "the tokenizer stage")
    off_ckpt, off_secs = train_member(a.scale, "dynamics_off", 0, False, None, None, runs, a.fit_args)
    wait_for(runs / a.scale / "behavior" / "DONE", "the behavior stage")
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each job is its own `whale fit` process
        done = list(pool.map(lambda seed: train_member(a.scale, "ensemble", seed, True, a.size, a.steps, runs,
                                                       a.fit_args), range(a.members)))
    return {"off": off_ckpt, "off_seconds": off_secs, "members": [c for c, _ in done],
            "member_seconds": [s for _, s in done], "seconds": time.time() - t0}


def evaluate(a: argparse.Namespace, side: dict) -> dict:
    """One set of real rollouts; the stage model, the off model and member 0 against the ensemble."""
    from whale_pl.rollout.value import EvalSet, collect_real, frame_stride_of
    from whale_pl.rollout.value_cli import run

    k = frame_stride_of(a.main_ckpt)
    if a.horizon is None:  # no longer than the model has seen episodes run (in its own steps)
        from whale_pl.data.metaworld import CollectConfig

        a.horizon = max(2, min(24, CollectConfig.from_yaml(a.data_config).max_steps // k - 1))
    ev = EvalSet.from_data_config(a.data_config, starts=a.starts, horizon=a.horizon, discount=a.discount,
                                  frame_stride=k)
    print(f"[experiment] real rollouts: {len(ev.tasks)} tasks x {len(ev.policies)} policies x {a.starts} starts",
          flush=True)
    common = dict(data_config=a.data_config, starts=a.starts, horizon=a.horizon, discount=a.discount, K=a.K,
                  modes=list(MODES), real=collect_real(ev))
    print("[experiment] the stage's model (behavior on)", flush=True)
    main_res = run(str(a.main_ckpt), None, **common)
    print("[experiment] the same config with behavior off", flush=True)
    off = run(str(side["off"]), None, **common, uncertainty=False)  # (1) compares values only
    print("[experiment] member 0: retracing vs the ensemble on its rollouts", flush=True)
    on = run(str(side["members"][0]), [str(c) for c in side["members"]], **common)
    return {"scale": a.scale, "members": a.members, "member_size": list(a.size), "member_steps": a.steps,
            "member_train_seconds": side["member_seconds"], "off_train_seconds": side["off_seconds"],
            "train_seconds": side["seconds"], "steps_trained": [_global_step(c) for c in (a.main_ckpt, side["off"])],
            "tasks": ev.tasks, "starts": a.starts, "horizon": a.horizon, "discount": a.discount,
            "train_policies": ev.train_policies, "ood_policies": ev.ood_policies, "on": on, "off": off,
            "main": main_res, "uncertainty": on["uncertainty"], "plots": {}}


def write_plots(res: dict, out_dir: Path) -> None:
    """The return scatter of each model and the uncertainty plot, named in ``res["plots"]``."""
    from whale_pl.rollout.value_cli import plot_returns, plot_uncertainty

    for key in ("on", "off", "main"):
        pth = out_dir / f"experiment_returns_{key}.png"
        plot_returns(res[key]["value"], pth, title=f"{key}: {res[key]['dynamics']}")
        res["plots"][f"returns ({key})"] = str(pth)
    pth = out_dir / "experiment_uncertainty.png"
    plot_uncertainty(res["uncertainty"], pth, title="retracing (member 0) vs ensemble")
    res["plots"]["uncertainty vs true error"] = str(pth)


def main(argv: list[str] | None = None) -> int:
    """Train or reuse the side models; unless ``--train-only``, evaluate and write the report."""
    from whale_pl.rollout.value_metrics import nan_to_none

    a = parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    t_start = time.time()
    side = train_side_models(a)
    if a.train_only:
        print(f"[experiment] models trained or reused in {fmt_elapsed(side['seconds'])}", flush=True)
        return 0
    res = evaluate(a, side)
    out_dir = Path(a.runs) / a.scale
    write_plots(res, out_dir)
    res["seconds"] = time.time() - t_start
    write_json_atomic(out_dir / "experiment.json", nan_to_none(res))
    cmd = "python -m whale_pl.experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    write_report(res, out_dir / "experiment.md", cmd.strip())
    print("\n".join(verdicts(res)))
    print(f"[experiment] wrote {out_dir / 'experiment.md'} and experiment.json in {fmt_elapsed(res['seconds'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
