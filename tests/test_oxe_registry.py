"""Every dataset of the OXE pretraining mixture converts, through its registry entry, to the 7-D action.

Each case writes a small RLDS dataset with the dataset's published step features (the TFDS
features.json: keys, nesting, shapes, dtypes and image sizes as released), one episode of 6 steps,
converts it at stride 1 and checks the actions against the mapping written out here from the
dataset's documentation (which columns are translation, rotation and gripper, in which encoding),
the frames against the registry's camera and the language against the instruction.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from whale_pl.data.episode import EEF7_ACTION_SPACE
from whale_pl.data.oxe.convert import ConvertOptions, convert_dataset
from whale_pl.data.oxe.registry import DEFAULT_MIXTURE_WEIGHTS, REGISTRY
from whale_pl.data.shards import iter_episodes

import rlds_fixtures as rw  # noqa: E402  (tests/ is on sys.path under pytest)

T = 6
# native gripper commands of one episode and the absolute opening (1 = open) each encoding means
RELATIVE = ([0, 1, 0, 0, -1, 0], [1, 0, 0, 0, 1, 1])          # +1 close, -1 open, 0 keep
CLOSE = ([-0.5, 0, 0.3, 1, 1.5, 0.7], [1, 1, 0.7, 0, 0, 0.3])  # 1 = close, clipped to [0, 1]
OPEN_PM1 = ([-1, 1, -1, 1, 0.5, 2], [0, 1, 0, 1, 0.5, 1])      # 1 = open, -1 = close, clipped
OPEN = ([1, 0, 1, 1, 0, 0.4], [1, 0, 1, 1, 0, 0.4])            # 1 = open, unchanged
BINARY_CLOSE = ([0, 1, 1, 0, 0, 1], [1, 0, 0, 1, 1, 0])        # 1 = closed (bool / int)
BINARY_OPEN = ([1, 0, 0, 1, 1, 0], [1, 0, 0, 1, 1, 0])         # open_gripper bool


def t(*shape, dtype="float32"):
    return rw.tensor(shape, dtype)


def img(h, w):
    return rw.image(h, w, "jpeg")


def depth(h, w):
    """A one-channel float image (a depth camera; not an RGB camera the converter could pick)."""
    return {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
            "image": {"shape": {"dimensions": [str(h), str(w), "1"]}, "dtype": "float32", "encodingFormat": "png"}}


FLAGS = {"is_first": rw.scalar("bool"), "is_last": rw.scalar("bool"), "is_terminal": rw.scalar("bool"),
         "reward": rw.scalar("float32")}


def rt1(action: dict, obs: dict) -> dict:
    """RT-1 style steps: an action dict, the instruction as a string Tensor under observation/."""
    return {"action": action, **FLAGS,
            "observation": {**obs, "natural_language_embedding": t(512),
                            "natural_language_instruction": rw.tensor((), "string")}}


def ext(action_dim: int, obs: dict, **extra) -> dict:
    """Steps of a dataset converted externally to RLDS: a flat action, language_instruction Text."""
    return {"action": t(action_dim), "discount": rw.scalar("float32"), "language_embedding": t(512),
            "language_instruction": rw.text(), "observation": obs, **FLAGS, **extra}


RT1_ACTION = {"base_displacement_vector": t(2), "base_displacement_vertical_rotation": t(1),
              "gripper_closedness_action": t(1), "rotation_delta": t(3), "terminate_episode": t(3, dtype="int32"),
              "world_vector": t(3)}


def wv_rd(v):
    return np.concatenate([v["steps/action/world_vector"], v["steps/action/rotation_delta"]], 1)


def cols(key, a, b):
    return lambda v: v[key][:, a:b]


def quat_delta(v):
    return np.concatenate([v["steps/action"][:, :3], Rotation.from_quat(v["steps/action"][:, 3:7]).as_euler("xyz")], 1)


def absolute(rot):
    """An absolute pose target -> deltas: positions differenced, rotations R[t] R[t-1]^-1, first step 0."""
    def f(v):
        a = v["steps/action"]
        r = rot(a)
        d = np.zeros((T, 6))
        d[1:, :3] = a[1:, :3] - a[:-1, :3]
        d[1:, 3:] = (r[1:] * r[:-1].inv()).as_euler("xyz")
        return d
    return f


# name: (steps features, camera, where the gripper command is (key, column) or None, its encoding
#        (or the constant opening), xyz+rotation expected from the native values, language key)
CASES = {
    "fractal20220817_data": (rt1(RT1_ACTION, {
        "base_pose_tool_reached": t(7), "gripper_closed": t(1), "gripper_closedness_commanded": t(1),
        "height_to_bottom": t(1), "image": img(256, 320), "orientation_box": t(2, 3), "orientation_start": t(4),
        "robot_orientation_positions_box": t(3, 3), "rotation_delta_to_go": t(3), "src_rotation": t(4),
        "vector_to_go": t(3), "workspace_bounds": t(3, 3)}),
        "image", ("steps/action/gripper_closedness_action", 0), RELATIVE, wv_rd),
    "kuka": (rt1(RT1_ACTION, {
        "clip_function_input/base_pose_tool_reached": t(7), "clip_function_input/workspace_bounds": t(3, 3),
        "gripper_closed": t(1), "height_to_bottom": t(1), "image": img(512, 640), "task_id": t(1)}),
        "image", ("steps/action/gripper_closedness_action", 0), RELATIVE, wv_rd),
    "bridge_dataset": (ext(7, {f"image_{i}": img(256, 256) for i in range(4)} | {"state": t(7)}),
                       "image_0", ("steps/action", 6), OPEN, cols("steps/action", 0, 6)),
    "taco_play": (rt1({"actions": t(7), "rel_actions_gripper": t(7), "rel_actions_world": t(7),
                       "terminate_episode": t()},
                      {"depth_gripper": t(84, 84), "depth_static": t(150, 200), "rgb_gripper": img(84, 84),
                       "rgb_static": img(150, 200), "robot_obs": t(15),
                       "structured_language_instruction": rw.tensor((), "string")}),
                  "rgb_static", ("steps/action/rel_actions_world", 6), OPEN_PM1,
                  cols("steps/action/rel_actions_world", 0, 6)),
    "jaco_play": (rt1({"gripper_closedness_action": t(1), "terminate_episode": t(3, dtype="int32"),
                       "world_vector": t(3)},
                      {"end_effector_cartesian_pos": t(7), "end_effector_cartesian_velocity": t(6),
                       "image": img(224, 224), "image_wrist": img(224, 224), "joint_pos": t(8)}),
                  "image", ("steps/action/gripper_closedness_action", 0), RELATIVE,
                  lambda v: np.concatenate([v["steps/action/world_vector"], np.zeros((T, 3))], 1)),
    "berkeley_cable_routing": (rt1({"rotation_delta": t(3), "terminate_episode": t(), "world_vector": t(3)},
                                   {"image": img(128, 128), "robot_state": t(7), "top_image": img(128, 128),
                                    "wrist225_image": img(128, 128), "wrist45_image": img(128, 128)}),
                               "image", None, 0.0, wv_rd),
    "roboturk": (rt1({"gripper_closedness_action": t(1), "rotation_delta": t(3), "terminate_episode": t(),
                      "world_vector": t(3)}, {"front_rgb": img(480, 640)}),
                 "front_rgb", ("steps/action/gripper_closedness_action", 0), CLOSE, wv_rd),
    "nyu_door_opening_surprising_effectiveness": (
        rt1({"gripper_closedness_action": t(1), "rotation_delta": t(3), "terminate_episode": t(),
             "world_vector": t(3)}, {"image": img(720, 960)}),
        "image", ("steps/action/gripper_closedness_action", 0), RELATIVE, wv_rd),
    "viola": (rt1({"gripper_closedness_action": t(), "rotation_delta": t(3), "terminate_episode": t(),
                   "world_vector": t(3)},
                  {"agentview_rgb": img(224, 224), "ee_states": t(16), "eye_in_hand_rgb": img(224, 224),
                   "gripper_states": t(1), "joint_states": t(7)}),
              "agentview_rgb", ("steps/action/gripper_closedness_action", None), CLOSE, wv_rd),
    "berkeley_autolab_ur5": (rt1({"gripper_closedness_action": t(), "rotation_delta": t(3),
                                  "terminate_episode": t(), "world_vector": t(3)},
                                 {"hand_image": img(480, 640), "image": img(480, 640),
                                  "image_with_depth": depth(480, 640), "robot_state": t(15)}),
                             "image", ("steps/action/gripper_closedness_action", None), RELATIVE, wv_rd),
    "toto": (rt1({"open_gripper": rw.scalar("bool"), "rotation_delta": t(3), "terminate_episode": t(),
                  "world_vector": t(3)}, {"image": img(480, 640), "state": t(7)}),
             "image", ("steps/action/open_gripper", None), BINARY_OPEN, wv_rd),
    "language_table": ({"action": t(2), **FLAGS,
                        "observation": {"effector_target_translation": t(2), "effector_translation": t(2),
                                        "instruction": t(512, dtype="int32"), "rgb": img(360, 640)}},
                       "rgb", None, 1.0, lambda v: np.concatenate([v["steps/action"], np.zeros((T, 4))], 1)),
    "stanford_hydra_dataset_converted_externally_to_rlds": (
        ext(7, {"image": img(240, 320), "state": t(27), "wrist_image": img(240, 320)},
            is_dense=rw.scalar("bool")),
        "image", ("steps/action", 6), CLOSE, cols("steps/action", 0, 6)),
    "austin_buds_dataset_converted_externally_to_rlds": (
        ext(7, {"image": img(128, 128), "state": t(24), "wrist_image": img(128, 128)}),
        "image", ("steps/action", 6), CLOSE, cols("steps/action", 0, 6)),
    "nyu_franka_play_dataset_converted_externally_to_rlds": (
        ext(15, {"depth": t(128, 128, 1, dtype="int32"), "depth_additional_view": t(128, 128, 1, dtype="int32"),
                 "image": img(128, 128), "image_additional_view": img(128, 128), "state": t(13)}),
        "image", ("steps/action", 13), OPEN_PM1, cols("steps/action", 7, 13)),
    "furniture_bench_dataset_converted_externally_to_rlds": (
        ext(8, {"image": img(224, 224), "state": t(35), "wrist_image": img(224, 224)},
            skill_completion=rw.scalar("float32")),
        "image", ("steps/action", 7), CLOSE, quat_delta),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": (
        ext(8, {"image": img(480, 640), "state": t(21)}),
        "image", ("steps/action", 6), OPEN, absolute(lambda a: Rotation.from_euler("xyz", np.deg2rad(a[:, 3:6])))),
    "austin_sailor_dataset_converted_externally_to_rlds": (
        ext(7, {"image": img(128, 128), "state": t(8), "state_ee": t(16), "state_gripper": t(1),
                "state_joint": t(7), "wrist_image": img(128, 128)}),
        "image", ("steps/action", 6), CLOSE, cols("steps/action", 0, 6)),
    "austin_sirius_dataset_converted_externally_to_rlds": (
        ext(7, {"image": img(84, 84), "state": t(8), "state_ee": t(16), "state_gripper": t(1),
                "state_joint": t(7), "wrist_image": img(84, 84)}, action_mode=t(1), intv_label=t(1)),
        "image", ("steps/action", 6), CLOSE, cols("steps/action", 0, 6)),
    "bc_z": (rt1({"future/axis_angle_residual": t(30), "future/target_close": t(10, dtype="int64"),
                  "future/xyz_residual": t(30)},
                 {"episode_success": t(), "image": img(171, 213), "present/autonomous": t(dtype="int64"),
                  "present/axis_angle": t(3), "present/intervention": t(dtype="int64"), "present/sensed_close": t(1),
                  "present/xyz": t(3), "sequence_length": t(dtype="int64")}),
             "image", ("steps/action/future/target_close", 0), BINARY_CLOSE,
             lambda v: np.concatenate([v["steps/action/future/xyz_residual"][:, :3], Rotation.from_rotvec(
                 v["steps/action/future/axis_angle_residual"][:, :3]).as_euler("xyz")], 1)),
    "dlr_edan_shared_control_converted_externally_to_rlds": (
        ext(7, {"image": img(360, 640), "state": t(7)}),
        "image", ("steps/action", 6), CLOSE, cols("steps/action", 0, 6)),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": (
        ext(8, {"image": img(360, 640), "state": t(20), "wrist_image": img(240, 320)}),
        "image", ("steps/action", 7), OPEN, absolute(lambda a: Rotation.from_quat(a[:, 3:7]))),
    "utaustin_mutex": (ext(7, {"image": img(128, 128), "state": t(24), "wrist_image": img(128, 128)}),
                       "image", ("steps/action", 6), CLOSE, cols("steps/action", 0, 6)),
    "berkeley_fanuc_manipulation": (
        ext(6, {"end_effector_state": t(7), "image": img(224, 224), "state": t(13), "wrist_image": img(224, 224)}),
        "image", ("steps/observation/state", 6), BINARY_CLOSE, cols("steps/action", 0, 6)),
    "cmu_stretch": (ext(8, {"image": img(128, 128), "state": t(4)}),
                    "image", ("steps/action", 6), OPEN, cols("steps/action", 0, 6)),
}


def test_every_mixture_dataset_is_registered_and_tested():
    assert set(DEFAULT_MIXTURE_WEIGHTS) == set(REGISTRY) and len(REGISTRY) == 25
    assert set(CASES) == set(REGISTRY)


PRIMARY, OTHER = (200, 40, 40), (40, 200, 40)  # the registry's camera, every other camera


def _leaves(node: dict, prefix: str = "steps") -> dict[str, dict]:
    out = {}
    for k, v in node.items():
        out.update({f"{prefix}/{k}": v} if "pythonClassName" in v else _leaves(v, f"{prefix}/{k}"))
    return out


def _instruction_key(leaves: dict) -> str:
    for key in ("steps/observation/natural_language_instruction", "steps/language_instruction",
                "steps/observation/instruction"):
        if key in leaves:
            return key
    raise AssertionError("no instruction feature")


def _value(key: str, node: dict, camera: str, instruction: str, instruction_key: str, rng: np.random.Generator):
    """One episode's values of one feature: constant-colour camera images, the instruction, random numbers."""
    if "image" in node:
        h, w, c = (int(d) for d in node["image"]["shape"]["dimensions"])
        if c != 3:
            return [rw.encode_image(np.zeros((h, w, 3), np.uint8), "png")] * T
        colour = PRIMARY if key == f"steps/observation/{camera}" else OTHER
        return [rw.encode_image(np.full((h, w, 3), colour, np.uint8))] * T
    spec = node.get("tensor", {})
    if "text" in node or spec.get("dtype") == "string":
        return [instruction.encode() if key == instruction_key else b"other"] * T
    shape = tuple(int(d) for d in spec.get("shape", {}).get("dimensions", []))
    if key == "steps/observation/instruction":  # Language-Table: unicode code points, 0-padded
        codes = np.zeros((T, 512), np.int32)
        codes[:, :len(instruction)] = [ord(ch) for ch in instruction]
        return codes
    if key.rsplit("/", 1)[-1] in ("is_first", "is_last", "is_terminal"):
        return {"is_first": np.arange(T) == 0}.get(key.rsplit("/", 1)[-1], np.arange(T) == T - 1)
    if spec.get("dtype", "float32").startswith("float"):
        return (rng.normal(size=(T, *shape)) * 0.3).astype(np.float32)
    return rng.integers(0, 2, size=(T, *shape))


@pytest.mark.parametrize("name", sorted(CASES))
def test_registered_dataset_maps_to_the_7d_action(name, tmp_path, monkeypatch):
    steps, camera, grip, encoding, xyz_rot = CASES[name]
    leaves = _leaves(steps)
    instruction = f"do the {name.split('_')[0]} task"
    rng = np.random.default_rng(len(name))
    vals = {k: _value(k, node, camera, instruction, _instruction_key(leaves), rng) for k, node in leaves.items()}
    if grip is None:
        want_grip = np.full(T, encoding)
    else:
        key, col = grip
        native, want_grip = np.asarray(encoding[0]), np.asarray(encoding[1], np.float64)
        arr = vals[key]
        if col is None:
            vals[key] = native.astype(arr.dtype).reshape(arr.shape)
        else:
            arr[:, col] = native
    src = rw.write_dataset(tmp_path / name / "0.1.0", rw.features_json(steps), {"train": [[rw.episode_record(vals)]]})
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], frame_stride=1))  # native steps
    m = convert_dataset(src, tmp_path / "out", ConvertOptions(size=16, workers=1), progress=False)
    (ep,) = list(iter_episodes(tmp_path / "out"))
    assert m["action_space"] == EEF7_ACTION_SPACE.to_json() and m["extra"]["oxe"]["registry"]["name"] == name
    native = {k: np.asarray(v, np.float64) for k, v in vals.items() if not isinstance(v, list)}
    want = np.concatenate([xyz_rot(native), want_grip[:, None]], 1)
    np.testing.assert_allclose(ep.actions, want, atol=1e-5)
    assert np.abs(ep.frames.reshape(-1, 3).mean(0) - PRIMARY).max() < 8  # the registry's camera
    assert ep.language == instruction
