"""Behavior-policy families built on Meta-World's scripted experts, one class per family. A name fully determines
its policy (``parse_policy``, forms in ``NAME_HELP``); its descriptor ``{"name", "family", "params"}`` goes into each
episode's metadata, and every random draw comes from the generator passed to ``reset`` (seeded per episode)."""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import numpy as np

NAME_HELP = ("expert | noise_<sigma> | eps_<p> | slow_<scale in (0,1]> | lag_<k steps> | "
             "bias_<axis in x,y,z,g><offset>[...] | mix_<name>+<name>[+...] | sine_<amplitude> | "
             "overshoot_<gain > 1> | pause_<p in [0,1]> | goal_<axis in x,y,z><offset in m>[...]")
MIX_SEGMENT = 10
SINE_PERIOD = 16  # steps of one cycle of the sine family's perturbation
PAUSE_STEPS = (4, 12)  # a pause lasts a uniform whole number of steps in [low, high)
_NUM = r"-?\d+(?:\.\d+)?"
_AXES = {"x": 0, "y": 1, "z": 2, "g": 3}


class PolicyNameError(ValueError):
    """A policy name that does not describe a policy (the message lists the valid forms)."""


class BehaviorPolicy:
    """The scripted expert, and the base of the other families: ``reset(task, rng)``, then ``act(obs)``."""
    family = "expert"

    def __init__(self, name: str, params: dict[str, Any] | None = None):
        self.name, self.params = name, params or {}
        self.expert, self.rng = None, None

    def descriptor(self) -> dict:
        """``{"name", "family", "params"}``, as stored in each episode's metadata."""
        return {"name": self.name, "family": self.family, "params": dict(self.params)}

    def reset(self, task: str, rng: np.random.Generator) -> None:
        """Start an episode of ``task`` with a fresh scripted expert; every random draw comes from ``rng``."""
        from metaworld.policies import ENV_POLICY_MAP  # (every Meta-World v3 task, the tasks CollectConfig accepts)

        self.expert, self.rng = ENV_POLICY_MAP[task](), rng

    def expert_action(self, obs: np.ndarray) -> np.ndarray:
        """The scripted expert's action for ``obs``, clipped to [-1, 1] (float64)."""
        return np.clip(np.asarray(self.expert.get_action(obs), np.float64), -1.0, 1.0)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The float32 [4] action for ``obs``."""
        return self._act(obs).astype(np.float32)

    def _act(self, obs: np.ndarray) -> np.ndarray:
        return self.expert_action(obs)


class Noise(BehaviorPolicy):
    """Expert + N(0, sigma^2) on every dim, re-clipped."""
    family = "noise"

    def _act(self, obs):
        return np.clip(self.expert_action(obs) + self.rng.normal(0.0, self.params["sigma"], size=4), -1, 1)


class EpsRandom(BehaviorPolicy):
    """With probability p a uniform random action, else the expert."""
    family = "eps"

    def _act(self, obs):
        a = self.expert_action(obs)  # always queried, so the expert's internal state stays in step
        return self.rng.uniform(-1.0, 1.0, size=4) if self.rng.random() < self.params["p"] else a


class Slow(BehaviorPolicy):
    """Expert xyz scaled by ``scale``; gripper unchanged."""
    family, factor = "slow", "scale"

    def _act(self, obs):
        a = self.expert_action(obs)
        a[:3] *= self.params[self.factor]
        return np.clip(a, -1, 1)  # a no-op for a scale <= 1


class Lag(BehaviorPolicy):
    """The expert acting on the observation ``k`` steps old (the first one until there is one)."""
    family = "lag"

    def reset(self, task, rng):
        """Start an episode with an empty observation buffer."""
        super().reset(task, rng)
        self.buf: deque = deque(maxlen=self.params["k"] + 1)

    def _act(self, obs):
        self.buf.append(np.array(obs, copy=True))
        return self.expert_action(self.buf[0])


class Bias(BehaviorPolicy):
    """Expert + a constant offset per axis, re-clipped."""
    family = "bias"

    def _act(self, obs):
        off = np.zeros(4)
        for ax, v in self.params["offset"].items():
            off[_AXES[ax]] = v
        return np.clip(self.expert_action(obs) + off, -1, 1)


class Mix(BehaviorPolicy):
    """Segments of ``MIX_SEGMENT`` steps, each driven by a component picked uniformly at random."""
    family = "mix"

    def __init__(self, name, params, components: list[BehaviorPolicy]):
        super().__init__(name, params)
        self.components = components

    def reset(self, task, rng):
        """Start an episode: every component shares ``rng``."""
        self.rng = rng
        for c in self.components:
            c.reset(task, rng)
        self.t = self.cur = 0

    def _act(self, obs):
        if self.t % MIX_SEGMENT == 0:
            self.cur = int(self.rng.integers(len(self.components)))
        self.t += 1
        actions = [c.act(obs) for c in self.components]  # every component sees every obs (lag buffers)
        return actions[self.cur]


class Sine(BehaviorPolicy):
    """Expert xyz + a periodic push ``amplitude * sin(2 pi t / SINE_PERIOD + phase)``, a random phase per axis."""
    family = "sine"

    def reset(self, task, rng):
        """Start an episode at t = 0 with fresh phases."""
        super().reset(task, rng)
        self.t, self.phase = 0, rng.uniform(0.0, 2 * np.pi, size=3)

    def _act(self, obs):
        a = self.expert_action(obs)
        a[:3] += self.params["amplitude"] * np.sin(2 * np.pi * self.t / SINE_PERIOD + self.phase)
        self.t += 1
        return np.clip(a, -1, 1)


class Overshoot(Slow):
    """Expert xyz multiplied by a gain above 1 (it overshoots its targets and corrects back), re-clipped."""
    family, factor = "overshoot", "gain"


class Pause(BehaviorPolicy):
    """The expert, but at each step it may (probability p) stop moving for a random stretch, gripper held."""
    family = "pause"

    def reset(self, task, rng):
        """Start an episode moving."""
        super().reset(task, rng)
        self.left = 0

    def _act(self, obs):
        a = self.expert_action(obs)
        if self.left == 0 and self.rng.random() < self.params["p"]:
            self.left = int(self.rng.integers(*PAUSE_STEPS))
        if self.left > 0:
            self.left -= 1
            a[:3] = 0.0
        return a


class Goal(BehaviorPolicy):
    """The expert heading for targets displaced by a fixed offset (metres): it is shown its hand at
    ``hand - offset``, so every reach ends ``offset`` away from where the expert's would."""
    family = "goal"

    def _act(self, obs):
        seen = np.array(obs, dtype=np.float64, copy=True)
        for ax, v in self.params["offset"].items():
            seen[_AXES[ax]] -= v
        return self.expert_action(seen)


def _offsets(arg: str) -> dict[str, float]:
    """'y-0.3z0.2' -> {'y': -0.3, 'z': 0.2}."""
    return {a: float(v) for a, v in re.findall(rf"([xyzg])({_NUM})", arg)}


# family -> (class, parameter, the argument's form, its value, the values allowed, the rule for the error message)
_FAMILY = {
    "noise": (Noise, "sigma", _NUM, float, lambda v: v >= 0, "sigma must be a number >= 0"),
    "eps": (EpsRandom, "p", _NUM, float, lambda v: 0 <= v <= 1, "the probability must be a number in [0, 1]"),
    "slow": (Slow, "scale", _NUM, float, lambda v: 0 < v <= 1, "the scale must be a number in (0, 1]"),
    "sine": (Sine, "amplitude", _NUM, float, lambda v: v > 0, "the amplitude must be a number > 0"),
    "overshoot": (Overshoot, "gain", _NUM, float, lambda v: v > 1, "the gain must be a number > 1"),
    "pause": (Pause, "p", _NUM, float, lambda v: 0 <= v <= 1, "the probability must be a number in [0, 1]"),
    "lag": (Lag, "k", r"\d+", int, lambda v: True, "lag must be a whole number of steps"),
    "bias": (Bias, "offset", rf"(?:[xyzg]{_NUM})+", _offsets, lambda v: True,
             "the offset must look like x0.4 or y-0.3z0.2 (axes x, y, z, g)"),
    "goal": (Goal, "offset", rf"(?:[xyz]{_NUM})+", _offsets, lambda v: True,
             "the offset must look like x0.1 or y-0.1z0.05 (axes x, y, z)"),
}


def parse_policy(name: str) -> BehaviorPolicy:
    """Build the policy a name describes; PolicyNameError listing the valid forms otherwise."""
    if name == "expert":
        return BehaviorPolicy(name, {})
    if name.startswith("mix_"):
        comps = [parse_policy(p) for p in name[4:].split("+")]
        if len(comps) < 2:  # (a component holds no '+', so it is never itself a mixture)
            raise PolicyNameError(f"policy {name!r}: a mixture needs >= 2 components joined by '+'; "
                                  f"valid names: {NAME_HELP}")
        return Mix(name, {"components": [c.descriptor() for c in comps], "segment": MIX_SEGMENT}, comps)
    fam, _, arg = name.partition("_")
    if fam not in _FAMILY:
        raise PolicyNameError(f"unknown behavior policy {name!r}; valid names: {NAME_HELP}")
    cls, key, form, value, ok, rule = _FAMILY[fam]
    if not re.fullmatch(form, arg) or not ok(value(arg)):
        raise PolicyNameError(f"policy {name!r}: {rule}; valid names: {NAME_HELP}")
    return cls(name, {key: value(arg)})


def families_of(name: str) -> set[str]:
    """The families a policy draws on: its own, and for a mixture its components' too."""
    pol = parse_policy(name)
    return {pol.family, *(c.family for c in getattr(pol, "components", []))}


def ood_split(name: str, train_policies: list[str]) -> str:
    """``ood_params`` when every family of ``name`` is among the training policies' (new parameters of seen
    families), else ``ood_families`` (a behavior family never seen in training)."""
    seen = set().union(*(families_of(p) for p in train_policies))
    return "ood_params" if families_of(name) <= seen else "ood_families"
