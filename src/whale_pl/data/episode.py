"""The Episode record, the action-space descriptor, and Episode <-> WebDataset sample (docs/contracts.md,
"Episodes and actions"; fixed zip timestamps, so the same episode always gives the same bytes)."""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

STEP_FIELDS = ("actions", "rewards", "success", "is_first", "is_last", "is_terminal")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class EpisodeError(ValueError):
    """An episode or sample does not have the documented layout."""


@dataclass
class ActionSpace:
    """Names and composition rules of the action dimensions (``compose``; docs/contracts.md)."""

    names: list[str]
    sum_dims: list[int]
    rot_dims: list[int] = field(default_factory=list)
    gripper_index: int | None = None

    @property
    def dim(self) -> int:
        """Number of action dimensions."""
        return len(self.names)

    @property
    def uncomposable_dims(self) -> list[int]:
        """Dims in none of the sum / rotation / gripper groups."""
        known = {*self.sum_dims, *self.rot_dims, self.gripper_index}
        return [i for i in range(self.dim) if i not in known]

    @property
    def normalised_mask(self) -> np.ndarray:
        """bool [A]: True for dims that are normalised (everything but the gripper)."""
        m = np.ones(self.dim, dtype=bool)
        if self.gripper_index is not None:
            m[self.gripper_index] = False
        return m

    def compose(self, actions_KA: np.ndarray) -> np.ndarray:
        """[..., K, A] -> [..., A]: the one action equivalent to the K consecutive ones: ``sum_dims`` add up,
        ``rot_dims`` (extrinsic xyz Euler deltas) compose as R_K ... R_1, the gripper takes the last command."""
        actions_KA = np.asarray(actions_KA)
        bad = self.uncomposable_dims
        if bad:
            raise EpisodeError(f"ActionSpace cannot compose dims {[self.names[i] for i in bad]}: each dim must be in "
                               f"sum_dims, rot_dims or be the gripper ({self})")
        out = np.empty(actions_KA.shape[:-2] + (self.dim,), dtype=actions_KA.dtype)
        if self.sum_dims:
            out[..., self.sum_dims] = actions_KA[..., :, self.sum_dims].sum(axis=-2)
        if self.gripper_index is not None:
            out[..., self.gripper_index] = actions_KA[..., -1, self.gripper_index]
        if self.rot_dims:
            out[..., self.rot_dims] = _compose_euler_xyz(actions_KA[..., :, self.rot_dims]).astype(actions_KA.dtype)
        return out

    def to_json(self) -> dict:
        """Plain data, as manifests and episode metadata store it."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ActionSpace":
        """The inverse of ``to_json``."""
        return cls(**d)


METAWORLD_ACTION_SPACE = ActionSpace(names=["dx", "dy", "dz", "gripper"], sum_dims=[0, 1, 2], gripper_index=3)
EEF7_ACTION_SPACE = ActionSpace(names=["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"],
                                sum_dims=[0, 1, 2], rot_dims=[3, 4, 5], gripper_index=6)


def _compose_euler_xyz(angles_KR: np.ndarray) -> np.ndarray:
    """[..., K, 3] extrinsic xyz Euler deltas -> [..., 3]: the Euler angles of R_K @ ... @ R_1."""
    from scipy.spatial.transform import Rotation

    lead = angles_KR.shape[:-2]
    k = angles_KR.shape[-2]
    flat = np.asarray(angles_KR, dtype=np.float64).reshape(-1, k, 3)
    total = Rotation.from_euler("xyz", flat[:, 0])
    for j in range(1, k):
        total = Rotation.from_euler("xyz", flat[:, j]) * total
    return total.as_euler("xyz").reshape(lead + (3,))


@dataclass
class Episode:
    """One trajectory. ``actions[t]`` is taken at ``frames[t]``; ``rewards[t]`` follows it. Read from token
    shards, ``frames`` is None and ``ids`` [T, h, w] holds the frames' token ids."""

    frames: np.ndarray | None
    actions: np.ndarray
    rewards: np.ndarray
    success: np.ndarray
    is_first: np.ndarray
    is_last: np.ndarray
    is_terminal: np.ndarray
    state: np.ndarray | None = None
    language: str = ""
    meta: dict = field(default_factory=dict)
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def validate(self, where: str = "episode") -> None:
        """Check dtypes and shapes; raise EpisodeError naming ``where`` and the field at fault."""
        if self.frames is None:
            name, px, ok = "ids", self.ids, "unsigned [T, h, w]"
            good = isinstance(px, np.ndarray) and px.dtype.kind == "u" and px.ndim == 3
        else:
            name, px, ok = "frames", self.frames, "uint8 [T, H, W, 3]"
            good = isinstance(px, np.ndarray) and px.dtype == np.uint8 and px.ndim == 4 and px.shape[-1] == 3
        if not good or px.shape[0] < 1:
            raise EpisodeError(f"{where}: field '{name}' must be {ok}, T >= 1, got {getattr(px, 'dtype', type(px))} "
                               f"{getattr(px, 'shape', '')}")
        t = px.shape[0]
        expect = {"actions": (np.float32, 2), "rewards": (np.float32, 1), "success": (np.float32, 1),
                  "is_first": (np.bool_, 1), "is_last": (np.bool_, 1), "is_terminal": (np.bool_, 1)}
        if self.state is not None:
            expect["state"] = (np.float32, 2)
        for name, (dt, nd) in expect.items():
            x = getattr(self, name)
            if not isinstance(x, np.ndarray) or x.dtype != dt or x.ndim != nd or x.shape[0] != t:
                raise EpisodeError(f"{where}: field '{name}' must be {np.dtype(dt).name} with {nd} dims and "
                                   f"length T={t}, got {getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
        space = self.meta.get("action_space")
        if space is not None and self.actions.shape[1] != len(space["names"]):
            raise EpisodeError(f"{where}: field 'actions' has {self.actions.shape[1]} dims, action_space says "
                               f"{space['names']}")

    def to_sample(self, key: str) -> dict[str, Any]:
        """Encode as a WebDataset sample: {'__key__', 'frames.npz', 'steps.npz', 'meta.json'} (bytes)."""
        if not KEY_RE.match(key):
            raise EpisodeError(f"sample key {key!r} must match {KEY_RE.pattern} (no dots: WebDataset splits on them)")
        self.validate(f"episode {key}")
        steps = {n: getattr(self, n) for n in STEP_FIELDS}
        if self.state is not None:
            steps["state"] = self.state
        meta = {**self.meta, "language": self.language}
        return {
            "__key__": key,
            "frames.npz": npz_bytes({"frames": self.frames}, compress=True),
            "steps.npz": npz_bytes(steps, compress=False),
            "meta.json": json.dumps(meta, sort_keys=True, indent=None).encode("utf-8"),
        }

    @classmethod
    def from_sample(cls, sample: dict[str, Any], frame_size: tuple[int, int] | None = None) -> "Episode":
        """Decode a frame sample, or a token sample (``ids.npy`` -> ``ids``), checked against ``frame_size`` (or
        the token grid) when given; errors name the shard, the key and the field."""
        loc = f"{sample.get('__url__', '?')} key {sample.get('__key__', '?')}"
        member = "ids.npy" if "ids.npy" in sample else "frames.npz"
        try:
            px = load_npz(sample[member])["frames"] if member == "frames.npz" else np.load(
                io.BytesIO(sample[member]), allow_pickle=False)
            member = "steps.npz"
            steps = load_npz(sample[member])
            member = "meta.json"
            meta = json.loads(bytes(sample[member]).decode("utf-8"))
            arrays = {n: steps[n] for n in STEP_FIELDS}
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt member
            what = "field 'frames' (member frames.npz)" if member == "frames.npz" else f"member {member}"
            raise EpisodeError(f"{loc}: {what} cannot be decoded: {e}") from e
        tokens = "ids.npy" in sample
        ep = cls(frames=None if tokens else px, ids=px if tokens else None, state=steps.get("state"),
                 language=meta.pop("language", ""), meta=meta, **arrays)
        ep.validate(loc)
        name = "ids" if tokens else "frames"
        if frame_size is not None and tuple(px.shape[1:3]) != tuple(frame_size):
            raise EpisodeError(f"{loc}: field '{name}' has size {tuple(px.shape[1:3])}, manifest says "
                               f"{tuple(frame_size)}")
        return ep


def npz_bytes(arrays: dict[str, np.ndarray], compress: bool) -> bytes:
    """A deterministic ``.npz`` (fixed zip timestamps) that ``np.load`` reads."""
    buf = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=mode) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.compress_type = mode
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` held in memory."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
