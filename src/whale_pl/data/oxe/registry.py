"""Declarative per-dataset entries for Open X-Embodiment: which camera, how the native action maps to the
standard 7-D end-effector delta ``[dx, dy, dz, droll, dpitch, dyaw, gripper]`` (``EEF7_ACTION_SPACE``), where
the language lives, the control rate and a frame stride. Positions and rotation deltas stay in the dataset's
own units and frame (per-dataset statistics in the manifest normalise them); rotations are extrinsic xyz
Euler angles in radians.

**Gripper convention, for every dataset: absolute target opening in [0, 1], 1 = open, 0 = closed** (Octo's).
Native encodings are mapped by ``gripper_mode``:

- ``open``: already 1 = open in [0, 1], copied; ``open_clip``: 1 = open, clipped to [0, 1] (e.g. -1/+1 or
  bool ``open_gripper``); ``close_clip``: 1 = close, ``1 - clip(g, 0, 1)``
- ``relative``: closedness command (+1 close, -1 open, |g| <= 0.1 keeps) integrated to the absolute state;
  before the first command the state is its opposite (open before a first "close")
- ``const_open`` / ``const_closed``: the dataset has no gripper command

Key specs are relative to ``steps/`` and may index the last axis (``"action[0:3]"``, ``"observation/state[6]"``);
translations of fewer than 3 values are zero-padded; ``rot=None`` gives zero rotation. Entries follow each
dataset's TFDS features and Octo's OXE standardisation, except that language is kept wherever there is some
and absolute poses (``pose="absolute"``) are differenced into deltas (rotations ``R[t] R[t-1]^-1``, first 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TARGET_HZ = 5.0  # frame strides bring every dataset near this rate


@dataclass(frozen=True)
class ActionMap:
    """How a dataset's native action maps to the 7-D end-effector action (see the module docstring)."""
    xyz: str | None                   # spec of the translation delta (<= 3 values; zero-padded)
    rot: str | None                   # spec of the rotation delta; None -> zeros
    gripper: str | None               # spec of the gripper command; None with const_* modes
    gripper_mode: str                 # see module docstring
    rot_format: str = "euler"         # "euler" | "euler_deg" | "quat_xyzw" | "rotvec"
    pose: str = "delta"               # "delta" | "absolute" (differenced into deltas)


@dataclass(frozen=True)
class DatasetConfig:
    """One registered OXE dataset: camera, action mapping, language key, rate and frame stride."""
    name: str
    camera: str                       # primary camera, key under steps/observation/
    action: ActionMap
    language: str | None              # step key of the instruction; None: no language
    control_hz: float
    frame_stride: int                 # steps per output frame (actions composed over the stride)
    language_encoding: str = "utf8"   # "utf8" (bytes) | "codepoints" (int32 unicode, 0-padded)
    wrist_camera: str | None = None   # informational: other cameras that exist
    notes: str = ""

    def to_json(self) -> dict:
        """The entry as plain data (stored in the manifest)."""
        return asdict(self)


def _cfg(name, camera, action, language, hz, **kw) -> DatasetConfig:
    return DatasetConfig(name=name, camera=camera, action=action, language=language, control_hz=hz,
                         frame_stride=max(1, round(hz / TARGET_HZ)), **kw)


_NL = "observation/natural_language_instruction"   # RT-1 style datasets
_LI = "language_instruction"                         # datasets converted externally to RLDS


def _rt1(gripper: str | None, mode: str, rot: str | None = "action/rotation_delta") -> ActionMap:
    return ActionMap(xyz="action/world_vector", rot=rot, gripper=gripper, gripper_mode=mode)


def _flat(mode: str, gripper: str | None = "action[6]", xyz: str = "action[0:3]",
          rot: str | None = "action[3:6]", **kw) -> ActionMap:
    return ActionMap(xyz=xyz, rot=rot, gripper=gripper, gripper_mode=mode, **kw)


_GC = "action/gripper_closedness_action"
REGISTRY: dict[str, DatasetConfig] = {c.name: c for c in [
    _cfg("fractal20220817_data", "image", _rt1(_GC, "relative"), _NL, 3.0,
         notes="RT-1 (Google robot); base motion fields ignored"),
    _cfg("kuka", "image", _rt1(_GC, "relative"), _NL, 10.0, notes="QT-Opt; the instruction is templated"),
    _cfg("bridge", "image", _rt1("action/open_gripper", "open_clip"), _NL, 5.0,
         wrist_camera=None, notes="BridgeData V2 as released in OXE (480x640)"),
    _cfg("bridge_dataset", "image_0", _flat("open"), _LI, 5.0, wrist_camera=None,
         notes="BridgeData V2 RLDS release (image_0..image_3); native action already is "
               "[dx,dy,dz,droll,dpitch,dyaw,gripper(1=open)] and is copied unchanged"),
    _cfg("taco_play", "rgb_static",
         _flat("open_clip", gripper="action/rel_actions_world[6]", xyz="action/rel_actions_world[0:3]",
               rot="action/rel_actions_world[3:6]"), _NL, 15.0, wrist_camera="rgb_gripper",
         notes="gripper -1 close / +1 open"),
    _cfg("jaco_play", "image", _rt1(_GC, "relative", rot=None), _NL, 10.0,
         wrist_camera="image_wrist", notes="translation only; rotation zero"),
    _cfg("berkeley_cable_routing", "image", _rt1(None, "const_closed"), _NL, 10.0, wrist_camera="wrist45_image",
         notes="no gripper command: the gripper holds the cable (closed)"),
    _cfg("nyu_door_opening_surprising_effectiveness", "image", _rt1(_GC, "relative"), _NL, 3.0,
         notes="Hello Stretch opening cabinet doors; one camera (720x960); RT-1 style action dict"),
    _cfg("roboturk", "front_rgb", _rt1(_GC, "close_clip"), _NL, 10.0),
    _cfg("viola", "agentview_rgb", _rt1(_GC, "close_clip"), _NL, 20.0, wrist_camera="eye_in_hand_rgb"),
    _cfg("berkeley_autolab_ur5", "image", _rt1(_GC, "relative"), _NL, 5.0, wrist_camera="hand_image"),
    _cfg("toto", "image", _rt1("action/open_gripper", "open_clip"), _NL, 30.0),
    _cfg("language_table", "rgb", ActionMap(xyz="action[0:2]", rot=None, gripper=None, gripper_mode="const_open"),
         "observation/instruction", 10.0, language_encoding="codepoints",
         notes="2-D planar pushes (dx, dy); no gripper"),
    _cfg("stanford_hydra_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 10.0,
         wrist_camera="wrist_image"),
    _cfg("austin_buds_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 20.0,
         wrist_camera="wrist_image"),
    _cfg("nyu_franka_play_dataset_converted_externally_to_rlds", "image",
         _flat("open_clip", gripper="action[13]", xyz="action[7:10]", rot="action[10:13]"), _LI, 3.0,
         wrist_camera="image_additional_view",
         notes="native 15-D: 7 joint velocities, 3 EE delta pos, 3 EE delta rot, gripper, terminate"),
    _cfg("furniture_bench_dataset_converted_externally_to_rlds", "image",
         _flat("close_clip", gripper="action[7]", rot="action[3:7]", rot_format="quat_xyzw"), _LI, 10.0,
         wrist_camera="wrist_image", notes="rotation delta given as a quaternion (x, y, z, w)"),
    _cfg("ucsd_kitchen_dataset_converted_externally_to_rlds", "image",
         _flat("open", rot_format="euler_deg", pose="absolute"), _LI, 2.0,
         notes="native action is an absolute EE position + orientation (degrees) target; differenced"),
    _cfg("austin_sailor_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 20.0,
         wrist_camera="wrist_image", notes="native [3 EE delta pos, 3 EE delta rot, gripper (1 = close)]"),
    _cfg("austin_sirius_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 20.0,
         wrist_camera="wrist_image",
         notes="two 84x84 cameras; native [3 EE delta pos, 3 EE delta rot, gripper (1 = close)]"),
    _cfg("bc_z", "image",
         ActionMap(xyz="action/future/xyz_residual[0:3]", rot="action/future/axis_angle_residual[0:3]",
                   gripper="action/future/target_close[0]", gripper_mode="close_clip",
                   rot_format="rotvec"), _NL, 10.0,
         notes="first of the 10 future waypoints; axis-angle residual converted to Euler"),
    _cfg("utaustin_mutex", "image", _flat("close_clip"), _LI, 20.0, wrist_camera="wrist_image"),
    _cfg("berkeley_fanuc_manipulation", "image", _flat("close_clip", gripper="observation/state[6]"), _LI, 10.0,
         wrist_camera="wrist_image", notes="no gripper action: the gripper state (1 = closed) stands in for it"),
    _cfg("cmu_stretch", "image", _flat("open"), _LI, 10.0, notes="native 8-D (last = terminate)"),
    _cfg("dlr_edan_shared_control_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 5.0),
    _cfg("iamlab_cmu_pickup_insert_converted_externally_to_rlds", "image",
         _flat("open", gripper="action[7]", rot="action[3:7]", rot_format="quat_xyzw", pose="absolute"),
         _LI, 20.0, wrist_camera="wrist_image",
         notes="native action is an absolute EE pose (position + quaternion) target; differenced"),
]}

# The Open X-Embodiment pretraining mixture Octo trains on ("oxe_magic_soup"): dataset -> sampling
# weight. Every one of them is registered above.
OXE_MAGIC_SOUP: dict[str, float] = {
    "fractal20220817_data": 0.54087122203, "kuka": 0.8341046294, "bridge_dataset": 1.0, "taco_play": 2.0,
    "jaco_play": 1.0, "berkeley_cable_routing": 1.0, "roboturk": 2.0,
    "nyu_door_opening_surprising_effectiveness": 1.0, "viola": 2.0, "berkeley_autolab_ur5": 2.0, "toto": 1.0,
    "language_table": 0.1, "stanford_hydra_dataset_converted_externally_to_rlds": 2.0,
    "austin_buds_dataset_converted_externally_to_rlds": 1.0,
    "nyu_franka_play_dataset_converted_externally_to_rlds": 3.0,
    "furniture_bench_dataset_converted_externally_to_rlds": 0.1,
    "ucsd_kitchen_dataset_converted_externally_to_rlds": 2.0,
    "austin_sailor_dataset_converted_externally_to_rlds": 1.0,
    "austin_sirius_dataset_converted_externally_to_rlds": 1.0, "bc_z": 0.2,
    "dlr_edan_shared_control_converted_externally_to_rlds": 1.0,
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": 1.0, "utaustin_mutex": 1.0,
    "berkeley_fanuc_manipulation": 2.0, "cmu_stretch": 1.0,
}
# Default sampling weights of `whale-data oxe --datasets` (1.0 for a dataset not listed).
DEFAULT_MIXTURE_WEIGHTS: dict[str, float] = {**OXE_MAGIC_SOUP, "bridge": 1.0}

GRIPPER_MODES = ("open", "open_clip", "close_clip", "relative", "const_open", "const_closed")
ROT_FORMATS = ("euler", "euler_deg", "quat_xyzw", "rotvec")


def check_config(cfg: DatasetConfig) -> None:
    """Raise ValueError if an entry is malformed (unknown mode/format, missing gripper spec)."""
    a = cfg.action
    if a.gripper_mode not in GRIPPER_MODES:
        raise ValueError(f"{cfg.name}: gripper_mode {a.gripper_mode!r} not in {GRIPPER_MODES}")
    if a.rot_format not in ROT_FORMATS:
        raise ValueError(f"{cfg.name}: rot_format {a.rot_format!r} not in {ROT_FORMATS}")
    if (a.gripper is None) != a.gripper_mode.startswith("const_"):
        raise ValueError(f"{cfg.name}: gripper spec {a.gripper!r} does not fit mode {a.gripper_mode!r}")
    if a.pose not in ("delta", "absolute"):
        raise ValueError(f"{cfg.name}: pose {a.pose!r} not 'delta' or 'absolute'")
    if cfg.frame_stride < 1:
        raise ValueError(f"{cfg.name}: frame_stride must be >= 1")
    if cfg.language_encoding not in ("utf8", "codepoints"):
        raise ValueError(f"{cfg.name}: language_encoding {cfg.language_encoding!r}")
