"""The headline experiment (docs/method.md, "the headline claims"): behavior-conditioning on against off over
seeds, retracing against an ensemble, rollout PSNR/SSIM beside copying: ``python -m whale_pl.experiment --scale S``
(``make experiment``), written to ``runs/<scale>/experiment.md``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from whale_pl.io import write_json_atomic, write_text_atomic
from whale_pl.pipeline import fmt_elapsed, handoff_args, run_fit, sha256_of
from whale_pl.rollout.value_metrics import MODES, fmt, fmt_key, nan_to_none, split_values, video_summary

STEPS = {"demo": 300}  # scale -> steps of every run (else the config's trainer.max_steps), as make demo's side runs
VAL_SPLITS = "[val]"  # checkpoints are chosen on the training families' held-out episodes, never on OOD ones
SPLIT_NOTES = {"val": "training families, new start states", "ood_params": "new parameters of the training families",
               "ood_families": "behavior families never seen in training"}
MODEL_KEYS = ("psnr", "ssim", "mse", "token_err")
DISCOUNT, K = 0.99, 3  # per model step; retracing anchors per imagined step
VALUE_CLAIM = {"lower with conditioning": "consistent with the claim (conditioning lowers the value gap)",
               "higher with conditioning": "against the claim (conditioning raises the value gap)"}


def fit_command(config: Path, group_dir: Path, seed: int, use_behavior: bool, steps: int, handoff: list[str],
                extra: list[str]) -> list[str]:
    """One run's ``whale fit``: budget in steps, checkpoint chosen on the training families, value hook silenced."""
    return [sys.executable, "-m", "whale_pl.cli", "fit", "--config", str(config), *handoff, "--seed_everything",
            str(seed), "--trainer.callbacks.init_args.every_n_val_epochs", "1000000", "--trainer.max_time", "null",
            "--trainer.max_steps", str(steps), "--data.init_args.val_splits", VAL_SPLITS,
            "--trainer.logger.init_args.save_dir", str(group_dir), "--trainer.logger.init_args.name", str(seed),
            "--trainer.logger.init_args.version", "",
            "--model.init_args.use_behavior", str(use_behavior).lower(), *extra]


def train_run(cmd: list[str], run_dir: Path, record: dict) -> tuple[Path, float]:
    """Train (or reuse, or resume) one run: (checkpoint, seconds); a run ``DONE`` with another ``record`` is refused."""
    done = run_dir / "DONE"
    if done.is_file():
        info = json.loads(done.read_text())
        if {k: info.get(k) for k in record} != record:
            raise SystemExit(f"[experiment] {run_dir} was trained with {({k: info.get(k) for k in record})}, not "
                             f"{record}: move it aside to retrain")
        print(f"[experiment] {run_dir}: complete, reusing {info['ckpt']}", flush=True)
        return Path(info["ckpt"]), float(info["seconds"])
    ckpt, seconds = run_fit(cmd, run_dir, "experiment")
    write_json_atomic(done, {**record, "ckpt": str(ckpt), "sha256": sha256_of(ckpt), "seconds": seconds,
                             "command": cmd[2:]})
    print(f"[experiment] {run_dir}: trained in {fmt_elapsed(seconds)}", flush=True)
    return ckpt, seconds


def train_all(a: argparse.Namespace) -> dict:
    """Train (or reuse) the off models (seeds 0..n-1) and the on models (seeds 0..max(n, M)-1)."""
    from concurrent.futures import ThreadPoolExecutor

    t0, root = time.time(), Path("runs") / a.scale
    config = Path("stages") / a.scale / "dynamics.yaml"

    def one(job: tuple[str, int]) -> tuple[Path, float]:
        """Train (or reuse) one run once the stages it needs are done (``make demo`` trains them meanwhile)."""
        group, seed = job
        stages = ("tokenizer", "behavior") if group == "on" else ("tokenizer",)
        for done, since in ((root / st / "DONE", time.time()) for st in stages):
            if not done.is_file():
                print(f"[experiment] waiting for {done}", flush=True)
            while not done.is_file():
                if time.time() - since > 7200:
                    raise SystemExit(f"[experiment] gave up waiting for {done} after 7200 s: build that stage first")
                time.sleep(5)
        group_dir = root / "experiment" / f"{a.steps}_steps" / group
        cmd = fit_command(config, group_dir, seed, group == "on", a.steps, handoff_args(a.scale, stages), a.fit_args)
        return train_run(cmd, group_dir / str(seed),
                         {"seed": seed, "steps": a.steps, "use_behavior": group == "on", "fit_args": a.fit_args})

    jobs = [("off", s) for s in range(a.seeds)] + [("on", s) for s in range(max(a.seeds, a.members))]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each job is its own `whale fit` process
        done = list(pool.map(one, jobs))
    out: dict = {"on": [], "off": [], "seconds": time.time() - t0}
    for (group, seed), (ckpt, secs) in zip(jobs, done):
        out[group].append({"seed": seed, "ckpt": str(ckpt), "seconds": secs})
    return out


def behavior_probe(wm, real, ev) -> dict:
    """``split_probes`` of the behavior prior's z_t on the real rollouts; empty for a model without behavior."""
    import torch

    from whale_pl.analysis.probe import split_probes

    if not wm.uses_behavior:
        return {}
    z = []
    with torch.no_grad():
        for i in range(0, len(real.policy), 32):
            ids = wm.tokenize(real.frames[i: i + 32])
            acts = torch.as_tensor(wm.normaliser.normalise_held(real.actions[i: i + 32]), device=wm.device)
            z.append(wm.module.behavior_z(ids, acts).float().cpu())
    start_B = np.arange(len(real.policy)) % ev.starts  # task-major, then policy, then start
    return split_probes(torch.cat(z), real.policy, [ev.split_of(p) for p in real.policy], start_B)


def evaluate(a: argparse.Namespace, runs: dict) -> dict:
    """Real rollouts; every model's values and video errors; retracing of on-model 0 against the ensemble."""
    from whale_pl.rollout.value import (EvalSet, WorldModel, collect_real, evaluate_values, rollout_errors,
                                        uncertainty_summary)

    on_ckpts, off_ckpts = [r["ckpt"] for r in runs["on"]], [r["ckpt"] for r in runs["off"]]
    wm0 = WorldModel.load(on_ckpts[0], a.device)  # on-model 0 retraces; its clock is the evaluation's
    ev = EvalSet.from_data_config(a.data_config, starts=a.starts, horizon=a.horizon, discount=DISCOUNT,
                                  frame_stride=wm0.frame_stride)
    print(f"[experiment] real rollouts: {len(ev.tasks)} tasks x {len(ev.policies)} policies x {a.starts} starts, "
          f"{a.horizon} steps", flush=True)
    real = collect_real(ev)
    imag: dict = {g: {m: [] for m in MODES} for g in ("on", "off")}
    errors: dict = {"on": [], "off": []}
    for group, ckpts in (("on", on_ckpts[: a.seeds]), ("off", off_ckpts)):
        for i, ck in enumerate(ckpts):
            print(f"[experiment] imagining with {group} seed {i}: {ck}", flush=True)
            first = group == "on" and i == 0
            wm = wm0 if first else WorldModel.load(ck, a.device)
            res = evaluate_values(wm, real, ev, modes=MODES)
            for m in MODES:
                imag[group][m].append(res[m]["imagined_TPK"])
            rollouts = res.pop("_rollouts")
            errors[group].append(rollout_errors(wm, real, rollouts, baselines=first))
            if first:
                rollouts0 = rollouts
    print(f"[experiment] retracing (K={K}) vs the {a.members}-member ensemble", flush=True)
    members = [wm0] + [WorldModel.load(c, a.device) for c in on_ckpts[1: a.members]]
    unc = uncertainty_summary(wm0, rollouts0, errors["on"][0], K, members)
    video = {g: {k: np.mean([e[k] for e in errors[g]], 0) for k in MODEL_KEYS} for g in ("on", "off")}
    video["baselines"] = {k: v for k, v in errors["on"][0].items() if k not in MODEL_KEYS}
    secs = [r["seconds"] for r in runs["on"][: a.members]]
    return {"returns": {**{k: res[k] for k in ("tasks", "policies", "split", "real_TPK", "discount", "horizon")},
                        "on": imag["on"], "off": imag["off"]},
            "value": split_values(res, imag["on"], imag["off"]),
            "video": video_summary(video, np.array([ev.split_of(p) for p in real.policy])),
            "uncertainty": {**unc, "members": a.members,
                            "inference_cost_ratio": unc["seconds"]["ensemble"] / max(unc["seconds"]["retracing"], 1e-9),
                            "training_cost_ratio": sum(secs) / max(secs[0], 1e-9)},
            "probe": behavior_probe(wm0, real, ev), "splits": ev.splits, "tasks": ev.tasks,
            "real_seconds": real.seconds}


def uncertainty_claim(u: dict) -> str:
    """Claim (2) from the within-step AUROCs: retracing better than chance and not behind the ensemble."""
    r, e, d = u["scores"]["retracing"], u["scores"]["ensemble"], u["differences"]["retracing - ensemble"]
    if "undefined" in (r["verdict_within"], e["verdict_within"], d["verdict"]):
        return "undefined (a figure or its interval is undefined)"
    if r["verdict_within"] != "better than chance":
        return f"not supported: retracing is {r['verdict_within']} within a step index"
    if d["verdict"] == "ensemble higher":
        return "not supported: retracing is better than chance but the ensemble ranks steps better"
    return f"consistent with the claim: retracing is better than chance and {d['verdict']} against the ensemble"


def verdicts(res: dict) -> list[str]:
    """The verdict lines of both claims, stated plainly with their intervals, whatever the answer."""
    gaps = [(mode, split, figs["value_gap"]) for mode in MODES for split, figs in res["value"][mode].items()
            if split not in ("all", "val")]
    out = [f"- (1) {mode}, `{split}` ({SPLIT_NOTES.get(split, split)}): value gap on {fmt_key(g, 'on')} vs off "
           f"{fmt_key(g, 'off')}; on − off {fmt_key(g, 'diff')}: {VALUE_CLAIM.get(g['verdict'], g['verdict'])}."
           for mode, split, g in gaps]
    u = res["uncertainty"]
    r, e = u["mse"]["scores"]["retracing"], u["mse"]["scores"]["ensemble"]
    out.append(f"- (2) AUROC within a step index (pixel MSE): retracing {fmt_key(r, 'auroc_within', 2)} "
               f"({r['verdict_within']}), {u['members']}-member ensemble {fmt_key(e, 'auroc_within', 2)} "
               f"({e['verdict_within']}): {uncertainty_claim(u['mse'])}. Inference: the ensemble takes "
               f"{fmt(u['inference_cost_ratio'], 2)}x retracing's time; training {fmt(u['training_cost_ratio'], 2)}x.")
    return out


def _setup_lines(res: dict) -> list[str]:
    """The command, the one-seed note, the evaluation set and the models, for the top of ``experiment.md``."""
    L = [f"# Headline experiment ({res['scale']} scale)", ""]
    if res["seeds"] < 3:
        L += [f"**One-seed version** ({res['seeds']} seed each way, {res['members']} ensemble members): its intervals "
              "cover policies and start states, not the spread between training seeds. The full experiment: "
              f"`python -m whale_pl.experiment --scale {res['scale']}` (`make experiment`).", ""]
    return L + [f"Command: `{res['command']}` (total {fmt_elapsed(res['seconds'])}; training "
                f"{fmt_elapsed(res['train_seconds'])}; it reuses the finished runs under `runs/{res['scale']}/"
                f"experiment/{res['steps']}_steps`: move them aside to retrain).", "",
                f"Evaluation set: tasks {', '.join(res['tasks'])}; {res['starts']} start state(s) per task; horizon "
                f"{res['horizon']} model steps (the episode); discount {res['discount']}. Splits: " +
                "; ".join(f"`{k}` ({SPLIT_NOTES.get(k, k)}): {', '.join(v)}" for k, v in res["splits"].items()) + ".",
                "", f"Models: `stages/{res['scale']}/dynamics.yaml`, {res['steps']} steps, seeds 0..{res['seeds'] - 1} "
                f"with behavior-conditioning on and off, each checkpoint chosen on `val/ce` of the `val` split only; "
                f"the ensemble: the on models of seeds 0..{res['members'] - 1} (member 0 retraces). Intervals: "
                "docs/method.md, \"Value evaluation\".", ""]


def _value_lines(res: dict) -> list[str]:
    """One table per split: every value figure on and off with intervals, the difference, its verdict."""
    L = ["## (1) Behavior-conditioning on vs off: value estimation per split", "",
         "The figures and their intervals: docs/method.md, \"Value evaluation\"; bias: mean (V̂ − V) over the "
         "task's real return range (positive: over-estimates).", ""]
    for split in res["value"][MODES[0]]:
        pols = ", ".join(res["splits"].get(split, [])) or "every policy"
        L += [f"### `{split}`: {SPLIT_NOTES.get(split, 'all splits together')} ({pols})", "",
              "| figure | mode | on | off | on − off | verdict |", "|---|---|---|---|---|---|"]
        for fig in res["value"][MODES[0]][split]:
            for mode in MODES:
                row = res["value"][mode][split][fig]
                L.append(f"| {fig} | {mode} | {fmt_key(row, 'on')} | {fmt_key(row, 'off')} | {fmt_key(row, 'diff')} | "
                         f"{row['verdict']} |")
        L.append("")
    return L


def _uncertainty_lines(res: dict) -> list[str]:
    """The scores of retracing, the ensemble and the step index within and across step indices; costs."""
    u = res["uncertainty"]
    L = [f"## (2) Retracing (K={u['K']}) vs a {u['members']}-member ensemble", "",
         f"Open-loop rollouts of on-model 0, imagined steps 2..{res['horizon'] - 1} (each with >= 2 retracing "
         "anchors). Within a step index: bad step = error above that step's median, so the step index alone scores "
         "0.5 there (chance); pooled over all steps it is the baseline the uncertainties must beat.", "",
         "| uncertainty | error | AUROC within a step | Spearman within a step | AUROC pooled | verdict within |",
         "|---|---|---|---|---|---|"]
    for target, name in (("mse", "pixel MSE"), ("token_err", "wrong tokens")):
        for k, row in u[target]["scores"].items():
            L.append(f"| {k} | {name} | {fmt_key(row, 'auroc_within')} | {fmt_key(row, 'spearman_within')} | "
                     f"{fmt_key(row, 'auroc_pooled')} | {row['verdict_within']} |")
    L += [""] + [f"- {k} (AUROC within a step, {t}): {fmt_key(d, 'diff')}: {d['verdict']}"
                 for t in ("mse", "token_err") for k, d in u[t]["differences"].items()]
    s = u["seconds"]
    return L + ["", f"Cost: retracing {s['retracing']:.2f} s, ensemble {s['ensemble']:.2f} s on the same steps "
                f"(ratio {fmt(u['inference_cost_ratio'], 2)}); training the ensemble took "
                f"{fmt(u['training_cost_ratio'], 2)}x one model's time.", ""]


def _video_lines(res: dict) -> list[str]:
    """PSNR / SSIM of the open-loop rollouts per split beside copying the last real frame."""
    L = ["## (3) Video fidelity of the open-loop rollouts", "",
         "Imagined frames 1..H-1 against the real ones; on/off averaged over seeds; copying the last real frame is "
         "what a model must beat, the tokenizer's reconstruction the ceiling.", "",
         "| split | rollout | PSNR (dB) | SSIM |", "|---|---|---|---|"]
    for split, rows in res["video"].items():
        L += [f"| {split} | {name} | {fmt(v['psnr'], 2)} | {fmt(v['ssim'])} |" for name, v in rows.items()]
    return L + [""]


def _probe_lines(res: dict) -> list[str]:
    """The behavior probe per split (a diagnostic), beside chance."""
    pr = res["probe"]
    L = ["## Behavior probe (a diagnostic)", ""]
    if not pr:
        return L + ["_no behavior-conditioned model: no probe_", ""]
    L += [f"A linear probe of the on-model 0's prior z_t (t >= {pr['t_min']}) on the real rollouts above "
          "(docs/method.md, \"Value evaluation\"); interval: 95 % bootstrap over episodes.", "",
          "| split | probe | accuracy | chance | episodes |", "|---|---|---|---|---|"]
    for split in [k for k in pr if isinstance(pr[k], dict)]:
        for kind in ("family", "policy"):
            row = pr[split].get(kind)
            L.append(f"| {split} | {kind} | " + (f"{fmt_key(row, 'acc')} | {fmt(row['chance'])} | {row['episodes']} |"
                                                  if row else "undefined (family never seen in training) | | |"))
    return L + [""]


def write_report(res: dict, path: Path) -> None:
    """``experiment.md``: the set-up, the verdicts, the tables of (1), (2) and (3), the plots."""
    L = _setup_lines(res) + ["## Verdicts", "", *verdicts(res), ""] + _value_lines(res)
    L += [f"![{k}]({Path(p).name})" for k, p in res["plots"].items() if k.startswith("returns")] + [""]
    L += _uncertainty_lines(res) + [f"![{k}]({Path(p).name})" for k, p in res["plots"].items()
                                    if k.startswith("AUROC")] + [""] + _video_lines(res) + _probe_lines(res)
    write_text_atomic(path, "\n".join(L))


def write_plots(res: dict, out_dir: Path) -> None:
    """The return scatter (on and off) and the per-step AUROC curve, named in ``res["plots"]``."""
    from whale_pl.rollout.value_metrics import write_plots

    res["plots"] = write_plots(
        res, out_dir / "experiment", {g: res["returns"][g] for g in ("on", "off")},
        ("returns (on and off)", "AUROC per imagined step"),
        (f"imagined vs real returns, behavior-conditioning on and off ({res['seeds']} seed(s) each)",
         f"retracing (on-model 0) vs {res['members']}-member ensemble: AUROC against pixel MSE"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m whale_pl.experiment``."""
    p = argparse.ArgumentParser(prog="python -m whale_pl.experiment", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="demo")
    p.add_argument("--seeds", type=int, default=3, help="training seeds of each of on and off")
    p.add_argument("--members", type=int, default=5, help="ensemble members (on models of seeds 0..M-1)")
    p.add_argument("--steps", type=int, help=f"training steps of every run (default {STEPS}, else trainer.max_steps)")
    p.add_argument("--starts", type=int, default=5, help="start states per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (one process each)")
    p.add_argument("--train-only", action="store_true", help="train (or reuse) the runs, then stop")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `whale fit` overrides for every run (last on the command line)")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.members < 2 or a.starts < 1:
        p.error(f"--seeds >= 1, --members >= 2 and --starts >= 1 expected, got {a.seeds}, {a.members}, {a.starts}")
    import yaml

    from whale_pl.data.metaworld import CollectConfig

    a.data_config = str(Path("stages") / a.scale / "data.yaml")
    cfg = yaml.safe_load((Path("stages") / a.scale / "dynamics.yaml").read_text())
    a.steps = a.steps or STEPS.get(a.scale) or int(cfg["trainer"]["max_steps"])
    stride = int(((cfg.get("data") or {}).get("init_args") or {}).get("frame_stride", 1))
    a.horizon = CollectConfig.from_yaml(a.data_config).max_steps // stride  # the whole episode
    return a


def main(argv: list[str] | None = None) -> int:
    """Train or reuse the runs; unless ``--train-only``, evaluate and write the report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    os.environ.setdefault("MUJOCO_GL", "egl")
    t_start = time.time()
    runs = train_all(a)
    if a.train_only:
        print(f"[experiment] runs trained or reused in {fmt_elapsed(runs['seconds'])}", flush=True)
        return 0
    res = evaluate(a, runs)
    res.update({k: getattr(a, k) for k in ("scale", "seeds", "members", "steps", "starts", "horizon")},
               discount=DISCOUNT, runs=runs, train_seconds=runs["seconds"],
               command=" ".join(["python -m whale_pl.experiment", *argv]))
    out_dir = Path("runs") / a.scale
    write_plots(res, out_dir)
    res["seconds"] = time.time() - t_start
    write_json_atomic(out_dir / "experiment.json", nan_to_none(res))
    write_report(res, out_dir / "experiment.md")
    print("\n".join(verdicts(res)))
    print(f"[experiment] wrote {out_dir / 'experiment.md'} and experiment.json in {fmt_elapsed(res['seconds'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
