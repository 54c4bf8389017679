"""An Optuna sweep's settings: the search space (each ``sweep.parameters`` entry read, checked
and turned into ``trial.suggest_*`` calls), the sampler and the pruner.

    optim.lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
    model.hidden_dim: {type: int, low: 16, high: 128, step: 16}
    model.dropout: {type: categorical, choices: [0.0, 0.1, 0.3]}
    model.num_layers: [1, 2, 3]          # a list is a categorical

``min``/``max`` are read as ``low``/``high``, so a random-search range works unchanged. Any
problem (an unknown key, low > high, a categorical with one choice, a log range from 0) is
a one-line ConfigError naming the key, raised before anything starts. So are bad
``sampler_args``/``pruner_args``: the sampler and pruner are built once while checking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from src.config import ConfigError

SPACE_KEYS = ("type", "low", "high", "min", "max", "log", "step", "choices")
KINDS = ("float", "int", "categorical")


@dataclass(frozen=True)
class ParamSpace:
    name: str  # the config key, e.g. optim.lr
    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)


def parse_space(parameters: dict[str, Any], method: str) -> list[ParamSpace]:
    """Every entry of ``sweep.parameters`` as a ParamSpace; ConfigError on the first bad one."""
    space = [_parse_one(key, value) for key, value in parameters.items()]
    if method == "grid":
        ranges = [param.name for param in space if param.kind != "categorical"]
        if ranges:
            raise ConfigError(
                f"sweep.parameters.{ranges[0]}: grid search needs a list of values, not a range"
            )
    return space


def _parse_one(name: str, value: Any) -> ParamSpace:
    where = f"sweep.parameters.{name}"
    if isinstance(value, list):
        value = {"type": "categorical", "choices": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: use a list of choices or {{type, low, high, log, step}}")
    unknown = [key for key in value if key not in SPACE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(SPACE_KEYS)})")
    kind = value.get("type") or ("categorical" if "choices" in value else "float")
    if kind not in KINDS:
        raise ConfigError(f"{where}: type is {kind!r}, expected float, int or categorical")
    if kind == "categorical":
        choices = value.get("choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise ConfigError(f"{where}: a categorical needs at least two choices, got {choices}")
        if any(not isinstance(c, bool | int | float | str) and c is not None for c in choices):
            raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null")
        return ParamSpace(name, kind, choices=tuple(choices))
    low, high = value.get("low", value.get("min")), value.get("high", value.get("max"))
    if low is None or high is None:
        raise ConfigError(f"{where}: a {kind} range needs low and high")
    try:
        low, high = float(low), float(high)
        step = float(value["step"]) if value.get("step") is not None else None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: low, high and step must be numbers") from None
    if low > high:
        raise ConfigError(f"{where}: low {low:g} > high {high:g}")
    log = bool(value.get("log", False))
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low:g}")
    if log and step is not None:
        raise ConfigError(f"{where}: choose log or step, not both")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: an int range needs whole low and high")
    return ParamSpace(name, kind, low, high, log, step)


def grid_search_space(space: list[ParamSpace]) -> dict[str, list[Any]]:
    return {param.name: list(param.choices) for param in space}


def make_sampler(
    method: str, space: list[ParamSpace], seed: int, args: dict[str, Any]
) -> optuna.samplers.BaseSampler:
    """The seeded Optuna sampler for ``method`` (tpe, random, grid, cmaes)."""
    try:
        if method == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **args)
        if method == "random":
            return optuna.samplers.RandomSampler(seed=seed, **args)
        if method == "grid":
            return optuna.samplers.GridSampler(grid_search_space(space), seed=seed, **args)
        if method == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, **args)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"sweep.sampler_args for {method}: {error}") from None
    raise ConfigError(f"sweep.method is {method!r}, expected tpe, random, grid or cmaes")


def make_pruner(name: str, args: dict[str, Any]) -> optuna.pruners.BasePruner:
    """median (MedianPruner), hyperband (HyperbandPruner) or none; ``args`` go to it."""
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**args)
        if name == "hyperband":
            return optuna.pruners.HyperbandPruner(**args)
        if name == "none" and not args:
            return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as error:
        raise ConfigError(f"sweep.pruner_args for {name}: {error}") from None
    if name == "none":
        raise ConfigError("sweep.pruner_args: pruner none takes no arguments")
    raise ConfigError(f"sweep.pruner is {name!r}, expected median, hyperband or none")
