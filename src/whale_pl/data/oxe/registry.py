"""Per-dataset entries for Open X-Embodiment: the camera, how the native action maps to the 7-D end-effector
delta ``EEF7_ACTION_SPACE`` (gripper: absolute opening in [0, 1], 1 = open), the instruction key, the control
rate and a frame stride. docs/contracts.md describes the gripper modes, key specs and rotation formats."""

from __future__ import annotations

from dataclasses import dataclass

TARGET_HZ = 5.0  # frame strides bring every dataset near this rate


@dataclass(frozen=True)
class ActionMap:
    """How a dataset's native action maps to the 7-D end-effector action."""
    xyz: str | None                   # spec of the translation delta (<= 3 values; zero-padded)
    rot: str | None                   # spec of the rotation delta; None -> zeros
    gripper: str | None               # spec of the gripper command; None with const_* modes
    gripper_mode: str                 # open | open_clip | close_clip | relative | const_open | const_closed
    rot_format: str = "euler"         # "euler" | "euler_deg" | "quat_xyzw" | "rotvec"
    pose: str = "delta"               # "delta" | "absolute" (differenced into deltas)


@dataclass(frozen=True)
class DatasetConfig:
    """One registered OXE dataset: camera, action mapping, language key, rate and frame stride."""
    name: str
    camera: str                       # primary camera, key under steps/observation/
    action: ActionMap
    language: str                     # step key of the instruction
    control_hz: float
    frame_stride: int                 # steps per output frame (actions composed over the stride)
    language_encoding: str = "utf8"   # "utf8" (bytes) | "codepoints" (int32 unicode, 0-padded)



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
    _cfg("fractal20220817_data", "image", _rt1(_GC, "relative"), _NL, 3.0),  # RT-1; base motion ignored
    _cfg("kuka", "image", _rt1(_GC, "relative"), _NL, 10.0),
    _cfg("bridge_dataset", "image_0", _flat("open"), _LI, 5.0),  # native action already is the 7-D layout
    _cfg("taco_play", "rgb_static", _flat("open_clip", gripper="action/rel_actions_world[6]",
                                          xyz="action/rel_actions_world[0:3]", rot="action/rel_actions_world[3:6]"),
         _NL, 15.0),
    _cfg("jaco_play", "image", _rt1(_GC, "relative", rot=None), _NL, 10.0),
    _cfg("berkeley_cable_routing", "image", _rt1(None, "const_closed"), _NL, 10.0),  # the gripper holds the cable
    _cfg("nyu_door_opening_surprising_effectiveness", "image", _rt1(_GC, "relative"), _NL, 3.0),
    _cfg("roboturk", "front_rgb", _rt1(_GC, "close_clip"), _NL, 10.0),
    _cfg("viola", "agentview_rgb", _rt1(_GC, "close_clip"), _NL, 20.0),
    _cfg("berkeley_autolab_ur5", "image", _rt1(_GC, "relative"), _NL, 5.0),
    _cfg("toto", "image", _rt1("action/open_gripper", "open_clip"), _NL, 30.0),
    _cfg("language_table", "rgb", ActionMap(xyz="action[0:2]", rot=None, gripper=None, gripper_mode="const_open"),
         "observation/instruction", 10.0, language_encoding="codepoints"),  # planar pushes (dx, dy)
    _cfg("stanford_hydra_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 10.0),
    _cfg("austin_buds_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 20.0),
    # native 15-D: 7 joint velocities, 3 EE delta position, 3 EE delta rotation, gripper, terminate
    _cfg("nyu_franka_play_dataset_converted_externally_to_rlds", "image",
         _flat("open_clip", gripper="action[13]", xyz="action[7:10]", rot="action[10:13]"), _LI, 3.0),
    _cfg("furniture_bench_dataset_converted_externally_to_rlds", "image",
         _flat("close_clip", gripper="action[7]", rot="action[3:7]", rot_format="quat_xyzw"), _LI, 10.0),
    _cfg("ucsd_kitchen_dataset_converted_externally_to_rlds", "image",
         _flat("open", rot_format="euler_deg", pose="absolute"), _LI, 2.0),
    _cfg("austin_sailor_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 20.0),
    _cfg("austin_sirius_dataset_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 20.0),
    _cfg("bc_z", "image",  # the first of the 10 future waypoints
         ActionMap(xyz="action/future/xyz_residual[0:3]", rot="action/future/axis_angle_residual[0:3]",
                   gripper="action/future/target_close[0]", gripper_mode="close_clip", rot_format="rotvec"),
         _NL, 10.0),
    _cfg("utaustin_mutex", "image", _flat("close_clip"), _LI, 20.0),
    # no gripper action: the gripper state (1 = closed) stands in for it
    _cfg("berkeley_fanuc_manipulation", "image", _flat("close_clip", gripper="observation/state[6]"), _LI, 10.0),
    _cfg("cmu_stretch", "image", _flat("open"), _LI, 10.0),
    _cfg("dlr_edan_shared_control_converted_externally_to_rlds", "image", _flat("close_clip"), _LI, 5.0),
    _cfg("iamlab_cmu_pickup_insert_converted_externally_to_rlds", "image",
         _flat("open", gripper="action[7]", rot="action[3:7]", rot_format="quat_xyzw", pose="absolute"), _LI, 20.0),
]}

# `whale-data oxe --datasets` default sampling weights: the mixture Octo pretrains on ("oxe_magic_soup").
DEFAULT_MIXTURE_WEIGHTS: dict[str, float] = {
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
