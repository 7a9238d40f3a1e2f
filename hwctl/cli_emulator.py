"""``hwctl emulator serve``: run the emulated chip as an instrument on a TCP port or a pty.

The first line printed on standard output is what a client connects to: the VISA resource
string for ``--tcp`` (pass it to ``hwctl run --backend visa --resource``) or the
pseudo-terminal path for ``--pty`` (pass it to ``hwctl run --backend serial --port``).
Logs go to standard error. The server stops on SIGINT or SIGTERM, or at ``--deadline-s``, and
saves the chip state file on the way out.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from hwctl.backend import Geometry

logger = logging.getLogger(__name__)


def _parse_geometry(_ctx, _param, value: str | None) -> Geometry | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) != 3 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise click.BadParameter(
            f"{value!r} is not ARRAYSxROWSxCOLS with positive integers, e.g. 1x512x2048"
        )
    return Geometry(*(int(part) for part in parts))


def _parse_tcp(_ctx, _param, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, separator, port_text = value.rpartition(":")
    if not separator or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise click.BadParameter(
            f"{value!r} is not HOST:PORT, e.g. 127.0.0.1:5025 (port 0 picks a free port)"
        )
    return host.strip("[]"), int(port_text)


@click.group("emulator")
def emulator() -> None:
    """Serve the emulated PCM chip as an instrument."""


@emulator.command("serve")
@click.option(
    "--tcp",
    "tcp_address",
    callback=_parse_tcp,
    metavar="HOST:PORT",
    help="Listen on this TCP address (loopback only unless --allow-remote; port 0 picks one).",
)
@click.option("--pty", "use_pty", is_flag=True, help="Serve on a new pseudo-terminal.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the emulated chip.")
@click.option("--state", "state_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Chip state file: loaded if it exists, written when the server stops.")
@click.option("--calibration", "calibration_file",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Device parameter file (default: the shipped calibration).")
@click.option("--stuck-fraction", type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of stuck devices (overrides the calibration file).")
@click.option("--geometry", callback=_parse_geometry, metavar="ARRAYSxROWSxCOLS",
              help="Chip geometry (default: one array of 512 x 2048).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a TCP address that is not loopback; this exposes the emulator.")
@click.option("--fault", "faults", multiple=True, metavar="KIND@N[:VALUE]",
              help="Inject a fault on the Nth batch request: delay@N:SECONDS, drop@N, "
                   "drop-after@N, garbage@N, error@N[:CODE]. Repeatable; for tests.")
@click.option("--idle-timeout-s", type=click.FloatRange(0, min_open=True), default=3600.0,
              show_default=True, help="Disconnect a TCP client silent for this many seconds.")
@click.option("--deadline-s", type=click.FloatRange(0, min_open=True),
              help="Stop the server after this many seconds.")
@click.option("--wall-clock", is_flag=True,
              help="Run the chip clock on wall time, as a real chip's (default: virtual time).")
def serve(
    tcp_address: tuple[str, int] | None,
    use_pty: bool,
    seed: int,
    state_file: Path | None,
    calibration_file: Path | None,
    stuck_fraction: float | None,
    geometry: Geometry | None,
    allow_remote: bool,
    faults: tuple[str, ...],
    idle_timeout_s: float,
    deadline_s: float | None,
    wall_clock: bool,
) -> None:
    """Serve the emulated chip over TCP (--tcp) or a pseudo-terminal (--pty)."""
    from calibration.params import load_params
    from sim_backend.chip import EmulatedChip
    from sim_backend.faults import FaultPlan
    from sim_backend.server import InstrumentProtocol, PtyInstrumentServer, TcpInstrumentServer

    if (tcp_address is None) == (not use_pty):
        raise click.UsageError("give exactly one of --tcp HOST:PORT or --pty")
    try:
        fault_plan = FaultPlan.parse(faults, seed=seed)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--fault") from None

    chip = EmulatedChip(
        seed=seed,
        params=load_params(calibration_file),
        geometry=geometry,
        state_path=state_file,
        stuck_fraction=stuck_fraction,
        clock="wall" if wall_clock else "virtual",
    )
    try:
        protocol = InstrumentProtocol(chip, fault_plan, virtual_clock=chip.clock_is_virtual)
        if tcp_address is not None:
            host, port = tcp_address
            try:
                server = TcpInstrumentServer(
                    protocol, host, port, allow_remote=allow_remote,
                    idle_timeout_s=idle_timeout_s, deadline_s=deadline_s,
                )
            except ValueError as error:
                raise click.BadParameter(str(error), param_hint="--tcp") from None
            except OSError as error:
                raise click.ClickException(
                    f"cannot listen on {host}:{port}: {error}; choose another port, or 0 for a free one"
                ) from None
            address = server.resource_name
        else:
            server = PtyInstrumentServer(protocol, deadline_s=deadline_s)
            address = server.path

        for signal_number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signal_number, lambda *_: server.stop())
        click.echo(address)
        sys.stdout.flush()
        if fault_plan:
            logger.warning("fault injection on: %s", ", ".join(faults))
        server.serve()
    finally:
        chip.close()
        if state_file is not None:
            logger.info("chip state saved to %s", state_file)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    emulator()
