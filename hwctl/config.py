"""Run configuration: a TOML file validated by pydantic models.

Every section rejects unknown keys, and `load_config` turns validation errors into one
`ConfigError` that names the file, the key path, the bad value and what is accepted.
Relative paths in a file are resolved against the folder of that file, so a configuration
means the same thing from any working directory. Paths given on the command line are
resolved against the working directory.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hwctl.schedule import ScheduleError, parse_schedule

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "data" / "resnet32-noise-aware.pt"
CIFAR10_DIR_ENV = "HWCTL_CIFAR10_DIR"
CIFAR10_TEST_IMAGES = 10_000
CIFAR10_TRAIN_IMAGES = 50_000
COMPENSATIONS = ("none", "gdc", "bn")
# The emulated chip counts time in int64 nanoseconds, which overflows after about 292 years.
# A limit far inside that leaves room for the programming time before the reads.
MAX_READ_TIME_S = 1e9


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem found, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


def _resolve_path(value: Path | None, info: ValidationInfo) -> Path | None:
    """Expand ``~`` and resolve a relative path against the configuration file's folder."""
    if value is None:
        return None
    value = value.expanduser()
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None and not value.is_absolute():
        value = Path(os.path.normpath(Path(base_dir) / value))
    return value


# Paths arrive from TOML as strings, so they are the one place where strict mode is relaxed.
ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_resolve_path)]


class _Section(BaseModel):
    # Strict: TOML has real types, so "3" for an integer or true for a number is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RunSection(_Section):
    out: ConfigPath = Field(description="path of the HDF5 run file to write")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of every random draw of the run")
    description: str | None = Field(None, description="free text stored in the run file")


class ModelSection(_Section):
    checkpoint: ConfigPath | None = Field(
        None, description="checkpoint to program; None means the network shipped with hwctl"
    )
    layers: list[str] | None = Field(
        None,
        min_length=1,
        description="names of the layers to program; None means every conv and linear layer",
    )

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, layers: list[str] | None) -> list[str] | None:
        if layers is not None:
            repeated = sorted({name for name in layers if layers.count(name) > 1})
            if repeated:
                raise ValueError(f"layer names listed more than once: {', '.join(repeated)}")
        return layers

    @property
    def checkpoint_path(self) -> Path:
        """Checkpoint file to load: the configured one, or the network shipped with hwctl."""
        return self.checkpoint if self.checkpoint is not None else DEFAULT_CHECKPOINT


class DataSection(_Section):
    cifar10_dir: ConfigPath | None = Field(
        None, description=f"CIFAR-10 folder; None means the environment variable {CIFAR10_DIR_ENV}"
    )
    test_images: int = Field(
        CIFAR10_TEST_IMAGES, ge=1, le=CIFAR10_TEST_IMAGES, description="test images per evaluation"
    )
    bn_calibration_images: int = Field(
        2600,
        ge=1,
        le=CIFAR10_TRAIN_IMAGES,
        description="training images used to recompute batch-norm statistics",
    )

    def resolve_cifar10_dir(self, environ: Mapping[str, str] | None = None) -> Path:
        """Return the CIFAR-10 folder: ``cifar10_dir``, else the ``HWCTL_CIFAR10_DIR`` variable."""
        if self.cifar10_dir is not None:
            return self.cifar10_dir
        environ = os.environ if environ is None else environ
        value = environ.get(CIFAR10_DIR_ENV, "").strip()
        if not value:
            raise ConfigError(
                "the data section",
                [
                    f"data.cifar10_dir is not set and the environment variable {CIFAR10_DIR_ENV} "
                    "is empty; set one to the CIFAR-10 batches folder "
                    "(cifar-10-batches-bin or cifar-10-batches-py) or to a folder that contains it"
                ],
            )
        return Path(value).expanduser()


class BackendSection(_Section):
    kind: Literal["emulator", "visa", "serial"] = Field(
        "emulator", description="which chip backend runs"
    )
    resource: str | None = Field(
        None,
        min_length=1,
        description="VISA resource string, such as TCPIP0::127.0.0.1::5025::SOCKET",
    )
    port: str | None = Field(
        None, min_length=1, description="serial device path, such as /dev/ttyUSB0"
    )
    baud_rate: int = Field(115200, gt=0, description="serial line speed in bit/s")
    timeout_s: float = Field(
        10.0, gt=0, le=3600, description="timeout of one exchange with the controller, in s"
    )
    state_file: ConfigPath | None = Field(
        None, description="emulator chip state file, kept between runs"
    )
    calibration_file: ConfigPath | None = Field(None, description="emulator device parameter file")
    stuck_fraction: float | None = Field(
        None, ge=0, lt=1, description="fraction of emulated devices that are stuck"
    )
    geometry: tuple[int, int, int] | None = Field(
        None,
        description="emulator only: [arrays, word lines, bit lines]; None means one array of 512 x 2048",
    )
    clock: Literal["virtual", "wall"] = Field(
        "virtual",
        description="emulator only: 'virtual' time (waits cost nothing) or 'wall' time, as on a chip",
    )

    @field_validator("geometry", mode="before")
    @classmethod
    def _geometry_from_list(cls, value: Any) -> Any:
        # TOML has arrays, not tuples.
        if isinstance(value, list):
            if len(value) != 3:
                raise ValueError(
                    f"geometry {value} must list three integers: arrays, word lines, bit lines"
                )
            return tuple(value)
        return value

    @field_validator("geometry")
    @classmethod
    def _geometry_positive(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and min(value) < 1:
            raise ValueError(f"geometry {list(value)} must be three positive integers: arrays, word lines, bit lines")
        return value

    @model_validator(mode="after")
    def _check_kind_settings(self) -> BackendSection:
        if self.kind == "visa" and self.resource is None:
            raise ValueError(
                "kind = 'visa' needs backend.resource, a VISA resource string such as "
                "'TCPIP0::127.0.0.1::5025::SOCKET' (or --resource on the command line)"
            )
        if self.kind == "serial" and self.port is None:
            raise ValueError(
                "kind = 'serial' needs backend.port, a serial device path such as "
                "'/dev/ttyUSB0' (or --port on the command line)"
            )

        # Settings of another kind are unused but harmless. Logging them instead of failing
        # lets --backend switch one configuration between the emulator and a chip.
        emulator_only = ("state_file", "calibration_file", "stuck_fraction", "geometry")
        unused = []
        if self.kind != "emulator":
            unused += [name for name in emulator_only if getattr(self, name) is not None]
            if self.clock != "virtual":
                unused.append("clock")
        if self.kind != "visa" and self.resource is not None:
            unused.append("resource")
        if self.kind != "serial" and self.port is not None:
            unused.append("port")
        if unused:
            log.warning(
                "backend.kind is %r, so these backend settings are not used: %s",
                self.kind,
                ", ".join(unused),
            )
        return self


class ProgramSection(_Section):
    g_max_us: float = Field(25.0, gt=0, description="conductance of the largest weight, in µS")
    batch_size: int = Field(
        262144,
        ge=2,
        le=262144,
        description="devices programmed per batch and per file flush; larger batches shorten "
        "the modelled programming time, so devices drift less before the first read",
    )
    tolerance_us: float | None = Field(
        None, gt=0, description="verify tolerance in µS; None means the program-and-verify default"
    )
    max_iterations: int | None = Field(
        None,
        ge=1,
        description="verify iterations per device; None means the program-and-verify default",
    )
    max_pulses_per_device: int | None = Field(
        None, ge=1, description="pulses per device; None means the program-and-verify default"
    )
    spare_attempts: int = Field(
        2, ge=0, le=10, description="times a pair with a failed device moves to spare devices"
    )
    # The reference chip left 0.9 % of its devices unconverged, and spares catch most of those,
    # so 5 % of pairs failing points to a fault in the chip or the setup.
    failure_budget: float = Field(
        0.05,
        gt=0,
        le=1,
        description="fraction of all pairs that may fail (after spares) before the run pauses",
    )

    @model_validator(mode="after")
    def _check_tolerance(self) -> ProgramSection:
        if self.tolerance_us is not None and self.tolerance_us >= self.g_max_us:
            raise ValueError(
                f"tolerance_us = {self.tolerance_us} is not below g_max_us = {self.g_max_us}; "
                "a tolerance must be a small fraction of the conductance range"
            )
        return self


class LimitsSection(_Section):
    """Safety limits the user expects the controller to enforce; None means not checked."""

    set_amplitude_max_v: float | None = Field(
        None, gt=0, description="maximum SET pulse amplitude, in V"
    )
    reset_amplitude_max_v: float | None = Field(
        None, gt=0, description="maximum RESET pulse amplitude, in V"
    )
    width_max_ns: float | None = Field(None, gt=0, description="maximum pulse width, in ns")
    pulses_per_device_max: int | None = Field(None, ge=1, description="maximum pulses per device")
    total_time_max_s: float | None = Field(
        None, gt=0, description="maximum total pulse time of a run, in s"
    )

    def expected(self) -> dict[str, float | int]:
        """Return the limits that are set, by `hwctl.backend.Limits` field name."""
        return {name: value for name, value in self.model_dump().items() if value is not None}


class ScheduleSection(_Section):
    times: list[str | int | float] = Field(
        default_factory=lambda: ["25s", "1h", "1d"],
        description="read times after programming: text such as '25s', '1h', '1d', or seconds",
    )

    @field_validator("times")
    @classmethod
    def _sort_times(cls, times: list[str | int | float]) -> list[str | int | float]:
        try:
            parse_schedule(times)
        except ScheduleError as error:
            raise ValueError(str(error)) from None
        # parse_schedule accepted the entries, so each one parses on its own.
        return sorted(times, key=lambda item: parse_schedule([item])[0])

    @field_validator("times")
    @classmethod
    def _check_horizon(cls, times: list[str | int | float]) -> list[str | int | float]:
        latest = max(parse_schedule(times))
        if latest > MAX_READ_TIME_S:
            raise ValueError(
                f"read time {latest:.3g} s is beyond the {MAX_READ_TIME_S:.0e} s (about 30 "
                "years) a chip clock can count here; choose an earlier time"
            )
        return times

    @property
    def times_s(self) -> list[float]:
        """Read times after programming, in seconds, in increasing order."""
        return parse_schedule(self.times)


class EvaluateSection(_Section):
    compensations: list[Literal["none", "gdc", "bn"]] = Field(
        default_factory=lambda: list(COMPENSATIONS),
        min_length=1,
        description="drift compensations evaluated at every read: none, gdc, bn",
    )
    batch_size: int = Field(1000, ge=1, description="images per inference batch")

    @field_validator("compensations")
    @classmethod
    def _compensations_unique(cls, compensations: list[str]) -> list[str]:
        if len(set(compensations)) != len(compensations):
            raise ValueError(f"compensations listed more than once in {compensations}")
        return compensations


class RunConfig(_Section):
    """The whole run, one TOML file with these sections; only ``run.out`` is required."""

    run: RunSection = Field(description="the [run] section, with at least run.out")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    backend: BackendSection = Field(default_factory=BackendSection)
    program: ProgramSection = Field(default_factory=ProgramSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)

    @model_validator(mode="after")
    def _check_pulse_budget(self) -> RunConfig:
        requested = self.program.max_pulses_per_device
        allowed = self.limits.pulses_per_device_max
        if requested is not None and allowed is not None and requested > allowed:
            raise ValueError(
                f"program.max_pulses_per_device = {requested} exceeds "
                f"limits.pulses_per_device_max = {allowed}; lower the first or raise the second"
            )
        return self

    def model_dump_toml(self) -> str:
        """Return the configuration as TOML text; keys whose value is None are left out.

        Parsing the text back with `parse_config_text` gives an equal configuration.
        """
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


@dataclass(frozen=True)
class Overrides:
    """Command-line options that replace configuration values; None leaves a value alone."""

    out: str | Path | None = None
    seed: int | None = None
    images: int | None = None
    schedule: str | None = None
    backend: str | None = None
    resource: str | None = None
    port: str | None = None


# Configuration key that each command-line option sets.
_OVERRIDE_KEYS: dict[str, tuple[str, str]] = {
    "out": ("run", "out"),
    "seed": ("run", "seed"),
    "images": ("data", "test_images"),
    "schedule": ("schedule", "times"),
    "backend": ("backend", "kind"),
    "resource": ("backend", "resource"),
    "port": ("backend", "port"),
}


def _override_values(overrides: Overrides) -> dict[tuple[str, str], Any]:
    values: dict[tuple[str, str], Any] = {}
    for option in fields(overrides):
        value = getattr(overrides, option.name)
        if value is None:
            continue
        if option.name == "out":
            # A path typed on the command line is relative to the working directory.
            value = str(Path(value).expanduser().absolute())
        elif option.name == "schedule":
            value = [item.strip() for item in str(value).split(",")]
        values[_OVERRIDE_KEYS[option.name]] = value
    return values


def _merge(data: dict[str, Any], values: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
    merged = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for (section, key), value in values.items():
        target = merged.setdefault(section, {})
        if isinstance(target, dict):
            target[key] = value
    return merged


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Return the model class that validates the mapping at ``loc``, if ``loc`` names a section."""
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return None
        model = field.annotation
    return model


def _suggestion(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _key_path(loc: tuple[Any, ...]) -> str:
    """Format a pydantic location as the key path a user types: ``evaluate.compensations[1]``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = str(part)
    return text or "(top level)"


def _describe_error(error: Mapping[str, Any], overridden: Mapping[tuple[str, str], Any]) -> str:
    loc = tuple(error["loc"])
    key_path = _key_path(loc)
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    kind = error["type"]
    value = error.get("input")

    if kind == "extra_forbidden":
        parent = _section_model(loc[:-1])
        valid = sorted(parent.model_fields) if parent is not None else []
        where = f"[{'.'.join(str(part) for part in loc[:-1])}]" if loc[:-1] else "the top level"
        text = f"{key_path}: unknown key; valid keys in {where}: {', '.join(valid)}"
        return text + _suggestion(str(loc[-1]), valid)

    if kind == "missing":
        field_model = _section_model(loc[:-1])
        field = field_model.model_fields.get(str(loc[-1])) if field_model is not None else None
        meaning = f" ({field.description})" if field is not None and field.description else ""
        return f"{key_path}: missing; this key is required{meaning}"

    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        message = message[0].lower() + message[1:] + _suggestion(str(value), choices)
    elif message:
        message = message[0].lower() + message[1:]

    if loc[:2] in overridden:
        option = next(name for name, key in _OVERRIDE_KEYS.items() if key == loc[:2])
        message += f" (set by --{option})"
    # A cross-field check receives the whole section, which would only repeat the file.
    if isinstance(value, (dict, BaseModel)):
        return f"{key_path}: {message}"
    return f"{key_path} = {value!r}: {message}"


def _validate(
    data: dict[str, Any], source: str, base_dir: Path | None, overrides: Overrides | None
) -> RunConfig:
    overridden = _override_values(overrides) if overrides is not None else {}
    merged = _merge(data, overridden)
    try:
        return RunConfig.model_validate(merged, context={"base_dir": base_dir})
    except ValidationError as error:
        problems = [_describe_error(item, overridden) for item in error.errors()]
        raise ConfigError(source, problems) from None


def parse_config_text(
    text: str,
    *,
    source: str = "<text>",
    base_dir: str | Path | None = None,
    overrides: Overrides | None = None,
) -> RunConfig:
    """Parse configuration TOML text; relative paths in it are resolved against ``base_dir``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, [f"invalid TOML: {error}"]) from None
    return _validate(data, source, Path(base_dir) if base_dir is not None else None, overrides)


def load_config(path: str | Path, overrides: Overrides | None = None) -> RunConfig:
    """Load and validate a configuration file, with command-line ``overrides`` applied first.

    Raises `ConfigError` naming the file, the key path, the bad value and what is accepted.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found; check the path"]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), [f"cannot read the file: {error}"]) from None
    return parse_config_text(
        text, source=str(path), base_dir=path.resolve().parent, overrides=overrides
    )


def apply_overrides(config: RunConfig, overrides: Overrides) -> RunConfig:
    """Return a copy of ``config`` with command-line ``overrides`` applied and validated again."""
    data = config.model_dump(mode="json", exclude_none=True)
    return _validate(data, "the command-line options", None, overrides)
