"""Linear probe and 2-D projection for behavior embeddings: does z_t linearly encode which policy acted? The probe
is L2-regularised multinomial logistic regression on standardised features, scored on held-out episodes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

L2 = 1e-3  # the probe's weight penalty
T_MIN = 4  # split_probes reads z_t from this step on (a few frames of history)


@dataclass
class LinearProbe:
    """A fitted multinomial logistic regression on standardised features."""

    mean_Z: torch.Tensor
    std_Z: torch.Tensor
    weight_ZK: torch.Tensor
    bias_K: torch.Tensor

    def predict(self, x_NZ: torch.Tensor) -> torch.Tensor:
        """The most probable class of each row, [N]."""
        return (((x_NZ.double() - self.mean_Z) / self.std_Z) @ self.weight_ZK + self.bias_K).argmax(-1)

    def accuracy(self, x_NZ: torch.Tensor, y_N: torch.Tensor) -> float:
        """The share of rows whose predicted class is their label."""
        return (self.predict(x_NZ) == y_N.long()).double().mean().item()


def fit_linear_probe(x_NZ: torch.Tensor, y_N: torch.Tensor, n_classes: int | None = None) -> LinearProbe:
    """Fit ``y ~ softmax(W x + b)`` (cross-entropy + ``L2 * |W|^2``), also inside ``torch.inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x_NZ.detach().double().cpu().clone(), y_N.detach().long().cpu().clone()
        K = int(n_classes if n_classes is not None else y.max().item() + 1)
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
        xs = (x - mean) / std
        W = torch.zeros(x.shape[1], K, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([W, b], max_iter=300, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            """The regularised loss, with its gradient."""
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xs @ W + b, y) + L2 * W.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return LinearProbe(mean, std, W.detach(), b.detach())


def probe_accuracy(train_x_NZ: torch.Tensor, train_y_N: torch.Tensor, test_x_NZ: torch.Tensor,
                   test_y_N: torch.Tensor, n_classes: int) -> float:
    """Fit on the training embeddings, return accuracy on the held-out ones."""
    return fit_linear_probe(train_x_NZ, train_y_N, n_classes).accuracy(test_x_NZ, test_y_N)


def pca_2d(x_NZ: torch.Tensor) -> np.ndarray:
    """Project onto the first two principal components, [N, 2] (zeros padded when Z < 2)."""
    x = x_NZ.detach().double().cpu()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = x @ v[:2].T
    return torch.nn.functional.pad(proj, (0, 2 - proj.shape[1])).numpy()


def scatter_figure(points_N2: np.ndarray, labels_N: np.ndarray, names: list[str] | None = None, title: str = ""):
    """A matplotlib figure of 2-D points coloured by label (one legend entry per label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for k in np.unique(labels_N):
        sel = labels_N == k
        name = names[int(k)] if names is not None and int(k) < len(names) else str(int(k))
        ax.scatter(points_N2[sel, 0], points_N2[sel, 1], s=6, alpha=0.6, label=name)
    ax.set(xlabel="PC 1", ylabel="PC 2", title=title)
    ax.legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return fig


def _correct(fit_NTZ: torch.Tensor, fit_y_N: np.ndarray, x_NTZ: torch.Tensor, y_N: np.ndarray,
             n_classes: int) -> np.ndarray:
    """Correct predictions [N, T] on ``x`` of a probe fitted on every point of the ``fit`` episodes."""
    T = x_NTZ.shape[1]
    probe = fit_linear_probe(fit_NTZ.flatten(0, 1), torch.as_tensor(np.repeat(fit_y_N, T)), n_classes)
    return (probe.predict(x_NTZ.flatten(0, 1)).numpy() == np.repeat(y_N, T)).reshape(-1, T)


def _cv_by_start(x_NTZ: torch.Tensor, y_N: np.ndarray, start_N: np.ndarray, n_classes: int) -> np.ndarray:
    """Correct predictions [N, T] of probes fitted on the episodes of every other start state."""
    correct = np.zeros(x_NTZ.shape[:2], bool)
    for s in np.unique(start_N):
        fit, test = start_N != s, start_N == s
        if not fit.any():
            return np.full(x_NTZ.shape[:2], np.nan)
        correct[test] = _correct(x_NTZ[fit], y_N[fit], x_NTZ[test], y_N[test], n_classes)
    return correct


def _accuracy(correct_NT: np.ndarray, chance: float) -> dict:
    """Mean accuracy over episodes (each the share of its points) with a 95 % bootstrap interval over episodes."""
    from whale_pl.rollout.value_metrics import N_BOOT, interval

    per_ep = np.asarray(correct_NT, float).mean(1)
    boot = per_ep[np.random.default_rng(0).integers(0, len(per_ep), (N_BOOT, len(per_ep)))].mean(1)
    return {"acc": float(per_ep.mean()), "acc_ci": interval(boot), "chance": chance, "episodes": len(per_ep)}


def split_probes(z_NTZ: torch.Tensor, policy_N: list[str], split_N: list[str], start_N: np.ndarray) -> dict:
    """The ``policy`` and (for families seen in training) ``family`` probes per split on z_t, t >= ``T_MIN``."""
    from whale_pl.data.policies import parse_policy

    x, split, start = z_NTZ[:, T_MIN:].double(), np.asarray(split_N), np.asarray(start_N)
    fam = np.array([parse_policy(p).family for p in policy_N])
    families = sorted(set(fam[split == "val"]))
    fam_y = np.array([families.index(f) if f in families else -1 for f in fam])
    out: dict = {"t_min": T_MIN, "families": families}
    for s in dict.fromkeys(split):
        sel = split == s
        pols = sorted(set(np.asarray(policy_N)[sel]))
        pol_y = np.array([pols.index(p) for p in np.asarray(policy_N)[sel]])
        out[s] = {"policy": _accuracy(_cv_by_start(x[sel], pol_y, start[sel], len(pols)), 1 / len(pols))}
        if s == "val":
            correct = _cv_by_start(x[sel], fam_y[sel], start[sel], len(families))
        elif (fam_y[sel] >= 0).all():
            correct = _correct(x[split == "val"], fam_y[split == "val"], x[sel], fam_y[sel], len(families))
        else:
            continue  # a family never seen in training has no label the probe could give
        out[s]["family"] = _accuracy(correct, 1 / len(families))
    return out
