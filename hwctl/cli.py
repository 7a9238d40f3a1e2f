"""The ``hwctl`` command: train, program, read, evaluate, summarise and plot runs.

Exit status: 0 on success, 2 for an error the user can fix (the message tells how), 3 when a
run paused on its failure budget, and 130 when a run stopped on Ctrl-C or SIGTERM. `hwctl
check` returns 1 for an intact run that is not complete.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

log = logging.getLogger("hwctl")

SCHEDULE_HELP = "read times after programming, comma-separated, e.g. 25s,1h,1d (units ms, s, min, h, d)"
EXIT_PAUSED = 3
EXIT_INTERRUPTED = 130


def _setup_logging(verbose: int) -> None:
    # hwctl's own progress messages show by default; -v adds other libraries' INFO messages.
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        logging.getLogger("hwctl").setLevel(logging.INFO)


def _expected_errors() -> tuple[type[Exception], ...]:
    from calibration.params import ParamsError
    from hwctl.allocation import AllocationError
    from hwctl.backend import LimitError
    from hwctl.checkpoint import CheckpointError
    from hwctl.cifar import DatasetError
    from hwctl.config import ConfigError
    from hwctl.clock import ClockError
    from hwctl.runfile import RunFileError
    from hwctl.schedule import ScheduleError
    from drivers.errors import InstrumentError, RecoveryFailed
    from sim_backend.chip import ChipStateError

    return (ConfigError, CheckpointError, DatasetError, AllocationError, LimitError,
            RunFileError, ScheduleError, ParamsError, InstrumentError, RecoveryFailed,
            ClockError, ChipStateError)


class HwctlGroup(click.Group):
    """Turn the errors a user can fix into one clear message and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except _expected_errors() as error:
            click.echo(f"hwctl: error: {error}", err=True)
            sys.exit(2)


@click.group(cls=HwctlGroup)
@click.option("-v", "--verbose", count=True, help="more log output (-v info, -vv debug)")
def main(verbose: int) -> None:
    """Program neural networks onto PCM chips (or their emulator) and track their drift."""
    _setup_logging(verbose)


def _load_config(config_path: str, **overrides):
    from hwctl.config import Overrides, load_config

    return load_config(config_path, Overrides(**overrides))


def _run_options(function):
    options = [
        click.option("--out", type=click.Path(dir_okay=False), help="run file to write (HDF5)"),
        click.option("--seed", type=click.IntRange(min=0), help="seed of every random draw"),
        click.option("--images", type=click.IntRange(1, 10_000), help="evaluate on the first N test images"),
        click.option("--schedule", help=SCHEDULE_HELP),
        click.option("--backend", type=click.Choice(["emulator", "visa", "serial"]), help="chip backend"),
        click.option("--resource", help="VISA resource string, e.g. TCPIP0::127.0.0.1::5025::SOCKET"),
        click.option("--port", help="serial port of the controller, e.g. /dev/ttyUSB0"),
        click.option("--force", is_flag=True, help="replace an existing run file"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command()
@click.argument("config_path", required=False, type=click.Path(exists=True, dir_okay=False))
@_run_options
@click.option("--resume", "resume_path", type=click.Path(exists=True, dir_okay=False),
              help="continue the stopped run in this run file, with its stored configuration")
@click.option("--failure-budget", type=click.FloatRange(0, 1, min_open=True),
              help="fraction of all pairs that may fail before the run pauses "
                   "(default: program.failure_budget, 0.05)")
def run(config_path: str | None, force: bool, resume_path: str | None,
        failure_budget: float | None, **overrides) -> None:
    """Program the network, read it back on the schedule and evaluate every read.

    The first Ctrl-C finishes the current batch, read or evaluation and stops with a run file
    that `hwctl run --resume RUN.h5` continues; a second Ctrl-C stops at once.
    """
    from hwctl.interrupts import RunInterrupted, StopRequest
    from hwctl.orchestrator import resume_job, run_job
    from hwctl.programming import RunPaused

    if resume_path is not None:
        _check_resume_options(config_path, force, overrides)
        path = Path(resume_path)
    elif config_path is None:
        raise click.UsageError("give a configuration file, or --resume RUN.h5 to continue a run")
    else:
        config = _load_config(config_path, **overrides)
        if failure_budget is not None:
            program = config.program.model_copy(update={"failure_budget": failure_budget})
            config = config.model_copy(update={"program": program})
        path = Path(config.run.out)

    resume_hint = f"continue with: hwctl run --resume {path}"
    with StopRequest() as stop:
        try:
            if resume_path is not None:
                resume_job(path, failure_budget=failure_budget, resource=overrides["resource"],
                           port=overrides["port"], stop=stop)
            else:
                run_job(config, overwrite=force, stop=stop)
        except RunInterrupted as error:
            click.echo(f"hwctl: {error}; the run file {path} is flushed and consistent; "
                       f"{resume_hint}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            click.echo(f"hwctl: stopped at once; the run file {path} is consistent up to its last "
                       f"flush; {resume_hint}", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except RunPaused as error:
            click.echo(f"hwctl: run paused: {error}. Check the chip and the setup (hwctl status "
                       f"{path}), then {resume_hint}, adding --failure-budget FRACTION to accept "
                       "more failures", err=True)
            sys.exit(EXIT_PAUSED)
        except _expected_errors() as error:
            if _stopped_midway(path):
                click.echo(f"hwctl: error: {error}\nThe run file {path} is consistent; once the "
                           f"cause is fixed, {resume_hint}", err=True)
                sys.exit(2)
            raise
    click.echo(f"run complete: {path}")


def _check_resume_options(config_path: str | None, force: bool, overrides: dict) -> None:
    """Reject options that would change a run being resumed; only its address may change."""
    if config_path is not None:
        raise click.UsageError(
            "--resume continues a run with the configuration stored in its file; leave out "
            f"the configuration file {config_path}"
        )
    fixed = [name for name in ("out", "seed", "images", "schedule", "backend") if overrides[name] is not None]
    if force:
        fixed.append("force")
    if fixed:
        options = ", ".join(f"--{name}" for name in fixed)
        raise click.UsageError(
            f"{options} cannot change a run being resumed, which keeps its stored configuration; "
            "only --resource, --port and --failure-budget may change"
        )


def _stopped_midway(path: Path) -> bool:
    """Return True if ``path`` is a run file whose last event is a ``stop``."""
    from hwctl.runfile import RunFile, RunFileError

    try:
        with RunFile.open(path) as run:
            events = run.events()
    except (RunFileError, OSError):
        return False
    return bool(events) and events[-1].kind == "stop"


@main.command()
@click.argument("config_path", type=click.Path(exists=True, dir_okay=False))
@_run_options
def program(config_path: str, force: bool, **overrides) -> None:
    """Create the run file and program the network, without reads or evaluations."""
    from hwctl.orchestrator import program_job

    config = _load_config(config_path, **overrides)
    click.echo(f"programmed: {program_job(config, overwrite=force)}")


@main.command()
@click.argument("run_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--schedule", help=SCHEDULE_HELP + "; default: the run's schedule")
def read(run_path: str, schedule: str | None) -> None:
    """Take the scheduled reads of a programmed run that are not in its file yet."""
    from hwctl.orchestrator import read_job

    read_job(Path(run_path), schedule)


@main.command()
@click.argument("run_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="CIFAR-10 folder (default: the run's configuration, then $HWCTL_CIFAR10_DIR)")
def evaluate(run_path: str, data_dir: str | None) -> None:
    """Evaluate every read of a run with each configured drift compensation."""
    from hwctl.orchestrator import evaluate_job

    evaluate_job(Path(run_path), data_dir)


@main.command()
@click.argument("run_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def summary(run_path: str, as_json: bool) -> None:
    """Print a run's sizes, programming statistics and accuracies."""
    from hwctl.runfile import RunFile
    from hwctl.summary import run_summary

    with RunFile.open(run_path) as run:
        result = run_summary(run)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(_format_summary(result))


@main.command()
@click.argument("run_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--follow", is_flag=True, help="print the status again every --interval-s until the run stops")
@click.option("--interval-s", default=2.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="seconds between looks with --follow")
@click.option("--events", default=5, show_default=True, type=click.IntRange(0, 1000),
              help="how many of the last events to show")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per look")
def status(run_path: str, follow: bool, interval_s: float, events: int, as_json: bool) -> None:
    """Show a run's progress, converged fraction, next read and last events.

    Works while another process writes the run file. With --follow it repeats until the run
    is complete, paused or stopped (or a week has passed).
    """
    from hwctl.status import follow_status, format_status, run_status

    def show(result: dict) -> None:
        if as_json:
            click.echo(json.dumps(result))
        else:
            click.echo(format_status(result) + ("\n" if follow else ""))

    if follow:
        follow_status(run_path, show, interval_s=interval_s, events=events)
    else:
        show(run_status(run_path, events))


@main.command()
@click.argument("run_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--recover", "recover_path", type=click.Path(dir_okay=False),
              help="write what can be read of a damaged run file into this new run file")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="also check that the run was programmed from this checkpoint")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def check(run_path: str, recover_path: str | None, checkpoint: str | None, as_json: bool) -> None:
    """Check a run file's layout, version and cursors, and whether the run is complete.

    Exit status 0: intact and complete; 1: intact, not complete; 2: damaged or not a run
    file. On a damaged or truncated file it reports what is readable from the start, and
    --recover writes that into a new run file.
    """
    from hwctl.integrity import check_run_file, format_report, recover_run_file

    if recover_path is not None:
        report = recover_run_file(run_path, recover_path)
    else:
        report = check_run_file(run_path, checkpoint)
    click.echo(json.dumps(report.as_dict()) if as_json else format_report(report))
    if recover_path is not None:
        click.echo(f"recovered into {recover_path}")
    sys.exit(report.exit_code)


def _format_summary(result: dict) -> str:
    from hwctl.schedule import format_duration

    def percent(value):
        return "n/a" if value is None else f"{100 * value:.2f} %"

    def micro(value):
        return "n/a" if value is None else f"{value:.3f} µS"

    lines = [
        f"run file:              {result['path']} ({result['stage']})",
        f"weights / devices:     {result['weights']} / {result['devices']}",
        f"converged (non-zero):  {percent(result['converged_fraction'])}",
        f"programming error σ:   {micro(result['programming_error_us'])}",
        f"float accuracy:        {percent(result['float_accuracy'])}",
        "time after programming   none      gdc       bn",
    ]
    by_time: dict[float, dict[str, float]] = {}
    for row in result["accuracy"]:
        by_time.setdefault(row["time_s"], {})[row["compensation"]] = row["accuracy"]
    for time_s, values in sorted(by_time.items()):
        cells = "".join(f"{percent(values.get(c)):>10}" for c in ("none", "gdc", "bn"))
        lines.append(f"{format_duration(time_s):>22} {cells}")
    return "\n".join(lines)


@main.command()
@click.argument("run_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="folder for the PNG files (default: RUN-report beside the run file)")
def report(run_path: str, out_dir: str | None) -> None:
    """Write PNG plots: programming error, conductance histograms, accuracy against time."""
    from hwctl.report import write_report

    folder = Path(out_dir) if out_dir else Path(run_path).with_name(Path(run_path).stem + "-report")
    for path in write_report(Path(run_path), folder):
        click.echo(path)


@main.command()
@click.option("--data", "data_dir", type=click.Path(file_okay=False),
              help="CIFAR-10 folder (default: $HWCTL_CIFAR10_DIR)")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="checkpoint to write")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=2))
@click.option("--lr", "learning_rate", default=0.1, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="peak learning rate of the warm-up and cosine schedule")
@click.option("--weight-decay", default=5e-4, show_default=True, type=click.FloatRange(min=0))
@click.option("--noise", "weight_noise", default=0.038, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="weight noise std as a fraction of each layer's max |W|")
@click.option("--clip-sigma", default=2.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="clip weights to this many standard deviations of their layer")
@click.option("--init-from", type=click.Path(exists=True, dir_okay=False),
              help="start from the strongest channels of this trained (wider) CIFAR ResNet")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--train-images", type=click.IntRange(min=2), help="use only the first N training images")
@click.option("--test-images", type=click.IntRange(min=1), help="measure accuracy on the first N test images")
@click.option("--resume", is_flag=True, help="continue from the last epoch checkpoint of --out")
def train(resume: bool, **options) -> None:
    """Noise-aware training of the reference ResNet-32, checkpointing every epoch."""
    from hwctl.train import TrainSettings, train as run_training

    settings = TrainSettings(**options)
    progress = run_training(settings, resume=resume)
    click.echo(json.dumps(progress["history"][-1]))


from hwctl.cli_emulator import emulator  # noqa: E402

main.add_command(emulator)
