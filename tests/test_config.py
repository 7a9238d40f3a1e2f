"""Run configuration: loading TOML files, error messages, overrides and the TOML round trip."""

import logging
import textwrap
from pathlib import Path

import pytest

from hwctl.config import (
    CIFAR10_DIR_ENV,
    DEFAULT_CHECKPOINT,
    ConfigError,
    Overrides,
    RunConfig,
    apply_overrides,
    load_config,
    parse_config_text,
)

REPOSITORY = Path(__file__).resolve().parents[1]
EXAMPLE = REPOSITORY / "examples" / "resnet32-emulator.toml"


def write_config(folder: Path, text: str, name: str = "run.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_error(folder: Path, text: str, overrides: Overrides | None = None) -> str:
    path = write_config(folder, text)
    with pytest.raises(ConfigError) as error:
        load_config(path, overrides)
    return str(error.value)


def test_minimal_file_gets_defaults(tmp_path):
    config = load_config(write_config(tmp_path, '[run]\nout = "run.h5"\n'))
    assert config.run.out == tmp_path / "run.h5"
    assert config.run.seed == 0
    assert config.model.checkpoint_path == DEFAULT_CHECKPOINT
    assert config.data.test_images == 10000
    assert config.data.bn_calibration_images == 2600
    assert config.backend.kind == "emulator"
    assert config.program.g_max_us == 25.0
    assert config.program.batch_size == 262144
    assert config.program.tolerance_us is None
    assert config.schedule.times_s == [25.0, 3600.0, 86400.0]
    assert config.evaluate.compensations == ["none", "gdc", "bn"]
    assert config.limits.expected() == {}


def test_example_file_loads():
    config = load_config(EXAMPLE)
    assert config.backend.kind == "emulator"
    assert config.run.out == REPOSITORY / "runs" / "resnet32-emulator.h5"
    assert config.schedule.times_s == [25.0, 3600.0, 86400.0]


def test_relative_paths_follow_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    path = write_config(
        folder,
        """
        [run]
        out = "../runs/a.h5"
        [model]
        checkpoint = "nets/net.pt"
        [backend]
        state_file = "/abs/state.npz"
        """,
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    assert config.run.out == tmp_path / "runs" / "a.h5"
    assert config.model.checkpoint_path == folder / "nets" / "net.pt"
    assert config.backend.state_file == Path("/abs/state.npz")


def test_unknown_key_lists_valid_keys_and_suggestion(tmp_path):
    message = config_error(
        tmp_path,
        """
        [run]
        out = "run.h5"
        [program]
        tolernce_us = 0.5
        """,
    )
    assert str(tmp_path / "run.toml") in message
    assert "program.tolernce_us: unknown key" in message
    assert "batch_size, failure_budget, g_max_us, max_iterations, max_pulses_per_device, spare_attempts, tolerance_us" in message
    assert "did you mean 'tolerance_us'?" in message


def test_unknown_section_lists_sections(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n[shedule]\ntimes = ["1h"]\n')
    assert "shedule: unknown key" in message
    assert "did you mean 'schedule'?" in message


def test_out_of_range_value_named(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n[data]\ntest_images = 20000\n')
    assert "data.test_images = 20000" in message
    assert "less than or equal to 10000" in message


def test_wrong_type_rejected_not_converted(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\nseed = "3"\n')
    assert "run.seed = '3'" in message
    assert "valid integer" in message


def test_bool_is_not_a_number(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n[program]\ng_max_us = true\n')
    assert "program.g_max_us = True" in message


def test_negative_seed_rejected(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\nseed = -1\n')
    assert "run.seed = -1" in message


def test_backend_kind_suggestion(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n[backend]\nkind = "emulater"\n')
    assert "backend.kind = 'emulater'" in message
    assert "'emulator', 'visa' or 'serial'" in message
    assert "did you mean 'emulator'?" in message


def test_unknown_compensation_named_by_position(tmp_path):
    message = config_error(
        tmp_path, '[run]\nout = "r.h5"\n[evaluate]\ncompensations = ["none", "gcd"]\n'
    )
    assert "evaluate.compensations[1] = 'gcd'" in message
    assert "did you mean 'gdc'?" in message


def test_repeated_compensation_rejected(tmp_path):
    message = config_error(
        tmp_path, '[run]\nout = "r.h5"\n[evaluate]\ncompensations = ["bn", "bn"]\n'
    )
    assert "more than once" in message


def test_missing_out_is_reported(tmp_path):
    message = config_error(tmp_path, "[run]\nseed = 1\n")
    assert "run.out: missing" in message


def test_missing_run_section_is_reported(tmp_path):
    message = config_error(tmp_path, "[data]\ntest_images = 5\n")
    assert "run: missing" in message


def test_every_problem_listed_at_once(tmp_path):
    message = config_error(
        tmp_path,
        """
        [run]
        out = "r.h5"
        seed = -1
        [data]
        test_images = 0
        [program]
        batch_size = 0
        """,
    )
    assert "run.seed" in message
    assert "data.test_images" in message
    assert "program.batch_size" in message


def test_visa_needs_resource(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n[backend]\nkind = "visa"\n')
    assert "backend: kind = 'visa' needs backend.resource" in message


def test_serial_needs_port(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n[backend]\nkind = "serial"\n')
    assert "kind = 'serial' needs backend.port" in message


def test_visa_with_resource_loads(tmp_path):
    path = write_config(
        tmp_path,
        """
        [run]
        out = "r.h5"
        [backend]
        kind = "visa"
        resource = "TCPIP0::127.0.0.1::5025::SOCKET"
        timeout_s = 2.5
        """,
    )
    config = load_config(path)
    assert config.backend.resource == "TCPIP0::127.0.0.1::5025::SOCKET"
    assert config.backend.timeout_s == 2.5


def test_unused_backend_settings_logged(tmp_path, caplog):
    path = write_config(
        tmp_path,
        """
        [run]
        out = "r.h5"
        [backend]
        kind = "serial"
        port = "/dev/ttyUSB0"
        state_file = "chip.npz"
        """,
    )
    with caplog.at_level(logging.WARNING, logger="hwctl.config"):
        load_config(path)
    assert "state_file" in caplog.text


def test_schedule_entries_sorted_and_parsed(tmp_path):
    path = write_config(tmp_path, '[run]\nout = "r.h5"\n[schedule]\ntimes = ["1d", 30, "1h"]\n')
    config = load_config(path)
    assert config.schedule.times == [30, "1h", "1d"]
    assert config.schedule.times_s == [30.0, 3600.0, 86400.0]


def test_schedule_unknown_unit_reported(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n[schedule]\ntimes = ["25s", "2x"]\n')
    assert "schedule.times" in message
    assert "unknown unit 'x'" in message
    assert "ms, s, min, h, d, w" in message


def test_tolerance_must_be_below_g_max(tmp_path):
    message = config_error(
        tmp_path, '[run]\nout = "r.h5"\n[program]\ng_max_us = 10.0\ntolerance_us = 12.0\n'
    )
    assert "tolerance_us = 12.0 is not below g_max_us = 10.0" in message


def test_pulse_budget_within_limit(tmp_path):
    message = config_error(
        tmp_path,
        """
        [run]
        out = "r.h5"
        [program]
        max_pulses_per_device = 200
        [limits]
        pulses_per_device_max = 100
        """,
    )
    assert "program.max_pulses_per_device = 200 exceeds limits.pulses_per_device_max = 100" in (
        message
    )


def test_limits_expected_lists_set_values(tmp_path):
    path = write_config(
        tmp_path, '[run]\nout = "r.h5"\n[limits]\nset_amplitude_max_v = 1.5\nwidth_max_ns = 500\n'
    )
    assert load_config(path).limits.expected() == {"set_amplitude_max_v": 1.5, "width_max_ns": 500}


def test_repeated_layer_names_rejected(tmp_path):
    message = config_error(
        tmp_path, '[run]\nout = "r.h5"\n[model]\nlayers = ["conv1", "linear", "conv1"]\n'
    )
    assert "layer names listed more than once: conv1" in message


def test_invalid_toml_reports_line(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\nseed = \n')
    assert "invalid TOML" in message
    assert "line 3" in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")


def test_cifar10_dir_from_environment(tmp_path):
    config = load_config(write_config(tmp_path, '[run]\nout = "r.h5"\n'))
    folder = tmp_path / "cifar"
    assert config.data.resolve_cifar10_dir({CIFAR10_DIR_ENV: str(folder)}) == folder


def test_cifar10_dir_configured_wins(tmp_path):
    path = write_config(tmp_path, '[run]\nout = "r.h5"\n[data]\ncifar10_dir = "data"\n')
    config = load_config(path)
    assert config.data.resolve_cifar10_dir({CIFAR10_DIR_ENV: "/elsewhere"}) == tmp_path / "data"


def test_cifar10_dir_missing_everywhere(tmp_path):
    config = load_config(write_config(tmp_path, '[run]\nout = "r.h5"\n'))
    with pytest.raises(ConfigError, match=CIFAR10_DIR_ENV):
        config.data.resolve_cifar10_dir({})


def test_overrides_replace_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, '[run]\nout = "r.h5"\n')
    overrides = Overrides(
        out="other/x.h5",
        seed=7,
        images=100,
        schedule="2h, 30s",
        backend="serial",
        port="/dev/pts/5",
    )
    config = load_config(path, overrides)
    assert config.run.out == tmp_path / "other" / "x.h5"
    assert config.run.seed == 7
    assert config.data.test_images == 100
    assert config.schedule.times_s == [30.0, 7200.0]
    assert config.backend.kind == "serial"
    assert config.backend.port == "/dev/pts/5"


def test_override_supplies_missing_out(tmp_path):
    path = write_config(tmp_path, "[run]\nseed = 2\n")
    config = load_config(path, Overrides(out=tmp_path / "cli.h5"))
    assert config.run.out == tmp_path / "cli.h5"


def test_bad_override_names_option(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n', Overrides(images=0))
    assert "data.test_images = 0" in message
    assert "(set by --images)" in message


def test_visa_override_without_resource(tmp_path):
    message = config_error(tmp_path, '[run]\nout = "r.h5"\n', Overrides(backend="visa"))
    assert "needs backend.resource" in message


def test_apply_overrides_to_loaded_config(tmp_path):
    config = load_config(write_config(tmp_path, '[run]\nout = "r.h5"\nseed = 1\n'))
    changed = apply_overrides(config, Overrides(resource="ASRL/dev/pts/3::INSTR", backend="visa"))
    assert changed.backend.kind == "visa"
    assert changed.backend.resource == "ASRL/dev/pts/3::INSTR"
    assert changed.run.seed == 1
    assert config.backend.kind == "emulator"


def test_toml_round_trip(tmp_path):
    path = write_config(
        tmp_path,
        """
        [run]
        out = "r.h5"
        seed = 11
        description = "round trip"
        [model]
        layers = ["conv1", "linear"]
        [backend]
        kind = "visa"
        resource = "TCPIP0::127.0.0.1::5025::SOCKET"
        [program]
        tolerance_us = 0.3
        [limits]
        set_amplitude_max_v = 1.2
        [schedule]
        times = ["1h", 25, "250ms"]
        [evaluate]
        compensations = ["gdc"]
        """,
    )
    config = load_config(path)
    text = config.model_dump_toml()
    again = parse_config_text(text)
    assert again == config
    assert "tolerance_us = 0.3" in text
    assert "max_iterations" not in text


def test_default_config_round_trip():
    config = RunConfig.model_validate({"run": {"out": "/tmp/x.h5"}})
    assert parse_config_text(config.model_dump_toml()) == config


def test_sections_are_frozen(tmp_path):
    config = load_config(write_config(tmp_path, '[run]\nout = "r.h5"\n'))
    with pytest.raises(ValueError):
        config.run.seed = 3
