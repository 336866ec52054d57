"""The linear probe and PCA projection used to judge behavior embeddings."""

from pathlib import Path

import numpy as np
import torch

from whale_pl.analysis.probe import fit_linear_probe, pca_2d, probe_accuracy, scatter_figure


def _blobs(n_per: int, seed: int, sep: float):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]) * sep
    x = torch.cat([c + torch.randn(n_per, 4, generator=g) for c in centers])
    y = torch.arange(3).repeat_interleave(n_per)
    return x, y


def test_probe_separates_linearly_separable_classes_and_not_noise():
    xtr, ytr = _blobs(100, 0, sep=8.0)
    xte, yte = _blobs(50, 1, sep=8.0)
    assert probe_accuracy(xtr, ytr, xte, yte, 3) > 0.97
    # labels unrelated to the features: held-out accuracy stays near chance (1/3)
    g = torch.Generator().manual_seed(2)
    noise_tr, noise_te = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 3, (150,), generator=g)
    acc = probe_accuracy(xtr, noise_tr, xte, noise_te, 3)
    assert acc < 0.5


def test_probe_is_linear_not_a_lookup():
    # XOR-like classes are not linearly separable: a linear probe must fail on them
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 2, (400, 2), generator=g).double() * 6 - 3 + 0.3 * torch.randn(400, 2, generator=g).double()
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    assert fit_linear_probe(x, y).accuracy(x, y) < 0.8


def test_pca_finds_the_main_axis_and_figure_renders():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 1, generator=g)
    direction = torch.tensor([[3.0, 4.0, 0.0, 0.0]]) / 5
    x = t * 10 * direction + 0.1 * torch.randn(200, 4, generator=g)
    p = pca_2d(x)
    assert p.shape == (200, 2)
    assert abs(np.corrcoef(p[:, 0], t[:, 0].numpy())[0, 1]) > 0.99
    assert p[:, 0].var() > 100 * p[:, 1].var()
    fig = scatter_figure(p, np.repeat(np.arange(2), 100), ["a", "b"], "z")
    fig.canvas.draw()
    assert fig.axes[0].get_legend() is not None


def test_probe_fits_inside_inference_mode():
    """The behavior module probes in ``on_validation_epoch_end``; ``trainer.validate`` runs it under
    ``torch.inference_mode``, where LBFGS's ``enable_grad`` alone does not bring autograd back."""
    xtr, ytr = _blobs(100, 0, sep=8.0)
    xte, yte = _blobs(50, 1, sep=8.0)
    with torch.inference_mode():
        xtr, ytr, xte, yte = xtr.clone(), ytr.clone(), xte.clone(), yte.clone()  # inference tensors
        acc = probe_accuracy(xtr, ytr, xte, yte, 3)
    assert acc == probe_accuracy(xtr.clone(), ytr.clone(), xte.clone(), yte.clone(), 3) and acc > 0.97


def test_accuracy_by_history_buckets_points_by_history_length():
    """The benchmark's (benchmarks/behavior_probe.py) bucketing of probe accuracy by history length."""
    import importlib.util

    bench_py = Path(__file__).parents[1] / "benchmarks" / "behavior_probe.py"
    spec = importlib.util.spec_from_file_location("bench_probe", bench_py)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    accuracy_by_history = bench.accuracy_by_history
    t = np.array([8, 9, 20, 40, 70, 100])
    ok = np.array([1, 0, 1, 1, 0, 1])
    assert accuracy_by_history(ok, t) == "t 8-15 0.50, t 16-31 1.00, t 32-63 1.00, t 64-119 0.50"
    assert accuracy_by_history(ok[:2], t[:2]) == "t 8-15 0.50"  # empty buckets are left out


def test_split_probes_read_families_and_policies_per_split_beside_chance():
    """Synthetic z: the family is written in dims 0-1 and the policy's parameter in dim 2, with noise. The
    family probe reads training families (leave one start out) and a seen family's new parameter; policies
    are told apart within each split; a family never seen in training gets no family figure; pure noise
    reads about chance."""
    from whale_pl.analysis.probe import split_probes

    rng = np.random.default_rng(0)
    splits = {"val": ["noise_0.1", "noise_0.5", "lag_3", "lag_6"], "ood_params": ["noise_1.0", "lag_8"],
              "ood_families": ["sine_0.5", "pause_0.1"]}
    code = {"noise": (1.0, 0.0), "lag": (0.0, 1.0), "sine": (-1.0, 0.0), "pause": (0.0, -1.0)}
    pol, spl, start, z = [], [], [], []
    for s, ps in splits.items():
        for p in ps:
            fam, par = p.split("_")
            for k in range(5):
                pol.append(p), spl.append(s), start.append(k)
                mean = np.array([*code[fam], float(par), 0.0])
                z.append(mean + 0.05 * rng.normal(size=(10, 4)))
    z_NTZ = torch.as_tensor(np.stack(z), dtype=torch.float32)
    out = split_probes(z_NTZ, pol, spl, np.array(start))
    assert out["families"] == ["lag", "noise"]
    assert out["val"]["family"]["acc"] == 1.0 and out["val"]["family"]["chance"] == 0.5
    assert out["ood_params"]["family"]["acc"] == 1.0 and "family" not in out["ood_families"]
    for s, ps in splits.items():
        assert out[s]["policy"]["acc"] > 0.95 and out[s]["policy"]["chance"] == 1 / len(ps)
        assert out[s]["policy"]["episodes"] == 5 * len(ps)
    noise = split_probes(torch.randn_like(z_NTZ), pol, spl, np.array(start))
    lo, hi = noise["val"]["policy"]["acc_ci"]
    assert lo - 0.1 <= 0.25 <= hi + 0.1 and noise["val"]["policy"]["acc"] < 0.5
