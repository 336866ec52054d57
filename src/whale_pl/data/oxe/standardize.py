"""One parsed RLDS episode record -> standard arrays: 7-D actions, frames, language, step flags.

Every read is checked against the features.json schema; a missing key or a list of the wrong length raises
`RecordError` naming file, record index and key."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from whale_pl.data.oxe.registry import ActionMap
from whale_pl.data.oxe.schema import DatasetSchema

_SPEC = re.compile(r"^(?P<key>[A-Za-z0-9_\-/]+?)(?:\[(?P<a>\d+)(?::(?P<b>\d+))?\])?$")


class RecordError(ValueError):
    """A record disagrees with the schema: the message names the file, record index and key."""


@dataclass(frozen=True)
class Where:
    """The file and record index being read, for error messages."""
    path: str
    index: int

    def err(self, key: str, msg: str) -> RecordError:
        """A RecordError about ``key`` of this record."""
        return RecordError(f"{self.path}: record {self.index}: key {key!r}: {msg}")


def parse_spec(spec: str) -> tuple[str, slice]:
    """``"action/world_vector"`` -> ("steps/action/world_vector", all); ``"action[6]"`` -> (.., 6:7)."""
    m = _SPEC.match(spec)
    a, b = m.group("a"), m.group("b")
    sl = slice(None) if a is None else slice(int(a), int(b) if b is not None else int(a) + 1)
    return "steps/" + m.group("key"), sl


def _get(ex: dict, key: str, where: Where):
    if key not in ex:
        raise where.err(key, "missing from the record (features.json promises it)")
    return ex[key]


def episode_length(ex: dict, schema: DatasetSchema, camera_key: str, where: Where) -> int:
    """Number of steps, from ``steps/is_first`` (or the camera's list when the schema has no flags)."""
    return len(_get(ex, "steps/is_first" if "steps/is_first" in schema.features else camera_key, where))


def step_array(ex: dict, schema: DatasetSchema, key: str, t: int, where: Where) -> np.ndarray:
    """A numeric step feature as float64 [T, n] (n = values per step from the schema)."""
    v = _get(ex, key, where)
    if isinstance(v, list):
        raise where.err(key, "holds byte strings; not readable as numbers")
    arr = np.asarray(v, dtype=np.float64)
    n = schema.size(key)
    if n is None:
        if t == 0 or arr.size % t:
            raise where.err(key, f"{arr.size} values do not split into {t} steps")
        n = arr.size // t
    if arr.size != t * n:
        raise where.err(key, f"expected {t} steps x {n} values = {t * n}, record has {arr.size}")
    return arr.reshape(t, n)


def step_bytes(ex: dict, key: str, t: int, where: Where) -> list[bytes]:
    """A byte-string step feature (encoded images, text): one entry per step."""
    v = _get(ex, key, where)
    if not isinstance(v, list):
        raise where.err(key, f"expected {t} byte strings, record holds numbers")
    if len(v) != t:
        raise where.err(key, f"expected {t} entries (one per step), record has {len(v)}")
    return v


def _select(ex, schema, spec: str, t: int, where: Where) -> np.ndarray:
    key, sl = parse_spec(spec)
    arr = step_array(ex, schema, key, t, where)
    out = arr[:, sl]
    want = (sl.stop - sl.start) if sl.start is not None else arr.shape[1]
    if out.shape[1] != want:
        raise where.err(key, f"spec {spec!r} asks for columns {sl.start}:{sl.stop}, feature has "
                             f"{arr.shape[1]} values per step")
    return out


def _to_euler(rot: np.ndarray, fmt: str) -> np.ndarray:
    """Rotations in ``fmt`` (euler, euler_deg, quat_xyzw, rotvec) -> extrinsic xyz Euler angles in radians."""
    if fmt in ("euler", "euler_deg"):
        return rot if fmt == "euler" else np.deg2rad(rot)
    from scipy.spatial.transform import Rotation  # imported only when needed: ~0.8 s

    if fmt == "rotvec":
        return Rotation.from_rotvec(rot).as_euler("xyz")
    norm = np.linalg.norm(rot, axis=1, keepdims=True)  # quat_xyzw; a zero quaternion is the identity
    q = np.where(norm > 0, rot / np.where(norm > 0, norm, 1), np.array([0, 0, 0, 1.0]))
    return Rotation.from_quat(q).as_euler("xyz")


def _absolute_to_delta(xyz: np.ndarray, rpy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial.transform import Rotation

    dxyz = np.zeros_like(xyz)
    dxyz[1:] = xyz[1:] - xyz[:-1]
    drpy = np.zeros_like(rpy)
    if len(rpy) > 1:
        r = Rotation.from_euler("xyz", rpy)
        drpy[1:] = (r[1:] * r[:-1].inv()).as_euler("xyz")
    return dxyz, drpy


def relative_gripper_to_absolute(cmd: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Relative closedness commands (+1 close, -1 open, else keep) -> absolute opening (1 = open)."""
    nz = np.flatnonzero(np.abs(cmd) > threshold)
    state = 1.0 if nz.size == 0 or cmd[nz[0]] > 0 else 0.0
    out = np.empty(len(cmd), np.float64)
    for i, c in enumerate(cmd):
        if c > threshold:
            state = 0.0
        elif c < -threshold:
            state = 1.0
        out[i] = state
    return out


_GRIPPER = {"open": lambda g: g, "open_clip": lambda g: np.clip(g, 0.0, 1.0),
            "close_clip": lambda g: 1.0 - np.clip(g, 0.0, 1.0), "relative": relative_gripper_to_absolute}


def _gripper_values(ex, schema, amap: ActionMap, t: int, where: Where) -> np.ndarray:
    """The absolute opening [T] under ``amap.gripper_mode`` (docs/contracts.md lists the modes)."""
    if amap.gripper_mode.startswith("const_"):
        return np.full(t, 1.0 if amap.gripper_mode == "const_open" else 0.0)
    return _GRIPPER[amap.gripper_mode](_select(ex, schema, amap.gripper, t, where)[:, 0])


def standard_actions(ex: dict, schema: DatasetSchema, amap: ActionMap, t: int, where: Where) -> np.ndarray:
    """float32 [T, 7]: (dx, dy, dz, droll, dpitch, dyaw, gripper) under the registry's mapping."""
    xyz = np.zeros((t, 3))
    if amap.xyz is not None:
        v = _select(ex, schema, amap.xyz, t, where)
        xyz[:, : v.shape[1]] = v
    rpy = np.zeros((t, 3))
    if amap.rot is not None:
        rot = _select(ex, schema, amap.rot, t, where)
        want = 4 if amap.rot_format == "quat_xyzw" else 3
        if rot.shape[1] != want:
            raise where.err(parse_spec(amap.rot)[0], f"rotation ({amap.rot_format}) needs {want} values, "
                                                     f"spec gives {rot.shape[1]}")
        rpy = _to_euler(rot, amap.rot_format)
    if amap.pose == "absolute":
        xyz, rpy = _absolute_to_delta(xyz, rpy)
    g = _gripper_values(ex, schema, amap, t, where)
    return np.concatenate([xyz, rpy, g[:, None]], axis=1).astype(np.float32)


def language_of(ex: dict, key: str, encoding: str, t: int, where: Where) -> str:
    """The episode's instruction: the first non-empty step instruction ('' when there is none)."""
    if encoding == "codepoints":
        arr = np.asarray(_get(ex, key, where), dtype=np.int64)
        if t == 0 or arr.size % t:
            raise where.err(key, f"{arr.size} code points do not split into {t} steps")
        for row in arr.reshape(t, -1):
            s = "".join(chr(c) for c in row if c > 0)
            if s:
                return s
        return ""
    for b in step_bytes(ex, key, t, where):
        if b:
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError as e:
                raise where.err(key, f"instruction is not UTF-8: {e}") from e
    return ""


def decode_frame(data: bytes, size: int, key: str, step: int, where: Where) -> np.ndarray:
    """Encoded image -> uint8 [H, W, 3]; unless ``size`` is 0, centre-cropped to a square and resized to ``size``.
    Large JPEGs are decoded at a reduced DCT scale, never below twice ``size``."""
    try:
        im = Image.open(io.BytesIO(data))
        if size and im.format == "JPEG":
            w, h = im.size
            m = min(w, h)
            if m >= 4 * size:
                im.draft("RGB", (max(1, w * 2 * size // m), max(1, h * 2 * size // m)))
        im = im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt frame
        raise where.err(key, f"step {step}: image cannot be decoded: {e}") from e
    w, h = im.size
    if size and (w, h) != (size, size):
        m = min(w, h)
        left, top = (w - m) // 2, (h - m) // 2
        im = im.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + m, top + m))
    return np.asarray(im, dtype=np.uint8)
