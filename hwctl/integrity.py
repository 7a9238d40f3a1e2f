"""Check a run file's layout, version, cursors and completeness, and salvage a damaged one.

`check_run_file` reads a file without changing it. A file whose writer died, or that was cut
short, is first copied to a temporary file that HDF5 can open. The copy is padded with zeros
to the length the superblock records, and its open-for-writing flags are cleared, with the
superblock checksum recomputed. Every table is then read chunk by chunk from its start.
Fletcher-32 checksums make a damaged chunk fail to read, so the readable prefix of each table
is what is reported as recoverable. `recover_run_file` writes that prefix to a new run file,
which `hwctl run --resume` can continue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hwctl.backend import Geometry, Identity, Limits
from hwctl.runfile import (
    EVALUATION_DTYPE,
    EVENT_DTYPE,
    FLOAT_ACCURACY_DTYPE,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYER_DTYPE,
    MAPPING_FIELDS,
    NOT_WRITTEN,
    PROGRAM_FIELDS,
    PROGRESS_DTYPE,
    READ_FIELDS,
    REMAP_DTYPE,
    ModelInfo,
    PairMapping,
    RemapRows,
    RunFile,
    RunFileError,
    _check_is_hdf5,
    _decode,
    _is_in_use,
    _plain,
    file_sha256,
    layer_records,
)

log = logging.getLogger(__name__)

SIGNATURE = b"\x89HDF\r\n\x1a\n"
# Superblock versions 2 and 3 (HDF5 1.8 and later) end in a checksum over their other bytes.
CHECKSUMMED_SUPERBLOCKS = (2, 3)

EXIT_COMPLETE = 0
EXIT_INCOMPLETE = 1
EXIT_DAMAGED = 2


# ---------------------------------------------------------------------- superblock


def lookup3(data: bytes, initval: int = 0) -> int:
    """Return Bob Jenkins' lookup3 ``hashlittle`` of ``data``: HDF5's metadata checksum."""
    mask = 0xFFFFFFFF

    def rotate(x: int, k: int) -> int:
        return ((x << k) | (x >> (32 - k))) & mask

    length = len(data)
    a = b = c = (0xDEADBEEF + length + initval) & mask
    offset = 0
    while length > 12:
        a = (a + int.from_bytes(data[offset : offset + 4], "little")) & mask
        b = (b + int.from_bytes(data[offset + 4 : offset + 8], "little")) & mask
        c = (c + int.from_bytes(data[offset + 8 : offset + 12], "little")) & mask
        for shift_a, shift_b, shift_c in ((4, 6, 8), (16, 19, 4)):
            a = ((a - c) & mask) ^ rotate(c, shift_a)
            c = (c + b) & mask
            b = ((b - a) & mask) ^ rotate(a, shift_b)
            a = (a + c) & mask
            c = ((c - b) & mask) ^ rotate(b, shift_c)
            b = (b + a) & mask
        offset += 12
        length -= 12
    if length == 0:
        return c

    # The last block, zero-padded to 12 bytes, then the final mix.
    tail = data[offset:] + bytes(12 - length)
    a = (a + int.from_bytes(tail[0:4], "little")) & mask
    b = (b + int.from_bytes(tail[4:8], "little")) & mask
    c = (c + int.from_bytes(tail[8:12], "little")) & mask
    c = ((c ^ b) - rotate(b, 14)) & mask
    a = ((a ^ c) - rotate(c, 11)) & mask
    b = ((b ^ a) - rotate(a, 25)) & mask
    c = ((c ^ b) - rotate(b, 16)) & mask
    a = ((a ^ c) - rotate(c, 4)) & mask
    b = ((b ^ a) - rotate(a, 14)) & mask
    c = ((c ^ b) - rotate(b, 24)) & mask
    return c


@dataclass(frozen=True)
class Superblock:
    """The fields of a version 2 or 3 HDF5 superblock that a repair needs."""

    version: int
    offset_size: int
    flags: int  # file consistency flags: nonzero while a writer has the file open
    end_of_file: int  # bytes the file should have
    checksum_ok: bool

    @property
    def flags_offset(self) -> int:
        return 11

    @property
    def length(self) -> int:
        return 12 + 4 * self.offset_size + 4


def read_superblock(path: Path) -> Superblock | None:
    """Return the superblock at the start of ``path``, or None if it is not version 2 or 3."""
    with open(path, "rb") as stream:
        head = stream.read(12 + 4 * 8 + 4)
    if len(head) < 12 or head[:8] != SIGNATURE or head[8] not in CHECKSUMMED_SUPERBLOCKS:
        return None
    offset_size = head[9]
    length = 12 + 4 * offset_size + 4
    if offset_size not in (4, 8) or len(head) < length:
        return None
    eof_at = 12 + 2 * offset_size
    end_of_file = int.from_bytes(head[eof_at : eof_at + offset_size], "little")
    stored = int.from_bytes(head[length - 4 : length], "little")
    return Superblock(head[8], offset_size, head[11], end_of_file, stored == lookup3(head[: length - 4]))


def _readable_copy(path: Path, superblock: Superblock, folder: Path) -> Path:
    """Copy ``path`` into ``folder``, padded to its recorded length and marked closed."""
    copy = folder / path.name
    shutil.copyfile(path, copy)
    with open(copy, "r+b") as stream:
        if copy.stat().st_size < superblock.end_of_file:
            stream.truncate(superblock.end_of_file)
        stream.seek(0)
        head = bytearray(stream.read(superblock.length))
        head[superblock.flags_offset] = 0
        head[-4:] = lookup3(bytes(head[:-4])).to_bytes(4, "little")
        stream.seek(0)
        stream.write(head)
    return copy


# ---------------------------------------------------------------------- the report


@dataclass
class CheckReport:
    """Findings of `check_run_file`; ``readable`` maps each table to its readable prefix."""

    path: str
    format_version: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    complete: bool = False
    missing: list[str] = field(default_factory=list)
    cursors: dict[str, int] = field(default_factory=dict)
    readable: dict[str, int] = field(default_factory=dict)
    being_written: bool = False

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        if not self.intact:
            return EXIT_DAMAGED
        return EXIT_COMPLETE if self.complete else EXIT_INCOMPLETE

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format_version": self.format_version,
            "intact": self.intact,
            "complete": self.complete,
            "problems": self.problems,
            "notes": self.notes,
            "missing": self.missing,
            "cursors": self.cursors,
            "readable": self.readable,
            "being_written": self.being_written,
        }


def format_report(report: CheckReport) -> str:
    """Render a `CheckReport` as the lines `hwctl check` prints."""
    lines = [f"run file:   {report.path} (format version {report.format_version})"]
    lines += [f"note:       {note}" for note in report.notes]
    if report.intact:
        lines.append("layout:     intact: every dataset, type, shape and cursor checks out")
    else:
        lines += [f"damage:     {problem}" for problem in report.problems]
        readable = ", ".join(f"{name} {count} of {report.cursors.get(name, '?')}"
                             for name, count in report.readable.items())
        lines.append(f"recoverable from the start: {readable}")
        lines.append(f"salvage with: hwctl check {report.path} --recover NEW.h5")
    if report.complete and report.intact:
        lines.append("run:        complete")
    elif report.complete:
        lines.append("run:        marked complete when written, but the damage above lost data")
    else:
        lines.append(f"run:        not complete: {'; '.join(report.missing) or 'not marked complete'}")
        if report.intact and not report.being_written:
            lines.append(f"continue with: hwctl run --resume {report.path}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- checking


@contextlib.contextmanager
def _open_for_check(path: Path, report: CheckReport) -> Iterator[h5py.File]:
    """Open the file read-only as plainly as its state allows; note what had to be done."""
    superblock = read_superblock(path)
    size = path.stat().st_size
    if superblock is not None and not superblock.checksum_ok:
        raise RunFileError(
            f"{path} has a damaged HDF5 superblock (checksum mismatch), so HDF5 cannot open it "
            "and nothing can be recovered from it with hwctl"
        )
    truncated = superblock is not None and size < superblock.end_of_file
    if superblock is not None and superblock.flags and _is_in_use(path):
        report.being_written = True
        report.notes.append("a process is writing this file now; the check sees its last flush")
        try:
            h5 = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError as error:
            raise RunFileError(f"{path} is being written and cannot be read now ({error}); retry") from None
        with h5:
            yield h5
        return
    if superblock is not None and superblock.flags:
        # A writer that was closing the file during the check has cleared the flags since.
        superblock = read_superblock(path)
    if not truncated and not (superblock is not None and superblock.flags):
        try:
            h5 = h5py.File(path, "r", libver="latest")
        except OSError as error:
            raise RunFileError(f"{path} is an HDF5 file that HDF5 cannot open: {error}") from None
        with h5:
            yield h5
        return

    if truncated:
        report.problems.append(
            f"the file is truncated: {size} of the {superblock.end_of_file} bytes its "
            "superblock records"
        )
    if superblock.flags:
        report.notes.append("the writer stopped without closing the file (killed or crashed)")
    with tempfile.TemporaryDirectory(prefix="hwctl-check-") as folder:
        copy = _readable_copy(path, superblock, Path(folder))
        try:
            h5 = h5py.File(copy, "r", libver="latest")
        except OSError as error:
            raise RunFileError(
                f"{path} cannot be opened even after padding it to its recorded length ({error}); "
                "its root group is damaged, so nothing can be recovered with hwctl"
            ) from None
        with h5:
            yield h5


def _check_identity(h5: h5py.File, path: Path, report: CheckReport) -> None:
    """Raise `RunFileError` for a file that is not a hwctl run file of this version."""
    name = _plain_attr(h5.attrs.get("hwctl_format"))
    if name != FORMAT_NAME:
        raise RunFileError(
            f"{path} is an HDF5 file but not a hwctl run file: its hwctl_format attribute is "
            f"{name!r}, expected {FORMAT_NAME!r}; check the path"
        )
    version = h5.attrs.get("format_version")
    report.format_version = None if version is None else int(version)
    if version != FORMAT_VERSION:
        raise RunFileError(
            f"{path} has run file format version {version}, and this hwctl reads version "
            f"{FORMAT_VERSION}; check it with the hwctl version that wrote it "
            f"({_plain_attr(h5.attrs.get('hwctl_version', 'unknown'))})"
        )


def _plain_attr(value: Any) -> Any:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def _expected_layout(n_devices: int) -> dict[str, tuple[np.dtype, tuple[int | None, ...]]]:
    """Return dtype and shape of every dataset; None in a shape is a growing length."""
    n_pairs = n_devices // 2
    layout: dict[str, tuple[np.dtype, tuple[int | None, ...]]] = {
        "config/run_toml": (None, ()),
        "model/layers": (np.dtype(LAYER_DTYPE), (None,)),
        "mapping/allocated_plus": (np.dtype("i8"), (n_pairs,)),
        "mapping/allocated_minus": (np.dtype("i8"), (n_pairs,)),
        "mapping/remaps": (np.dtype(REMAP_DTYPE), (None,)),
        "program/target_us": (np.dtype("f8"), (n_devices,)),
        "reads/g_us": (np.dtype("f8"), (None, n_devices)),
        "evaluations": (np.dtype(EVALUATION_DTYPE), (None,)),
        "events": (np.dtype(EVENT_DTYPE), (None,)),
        "float_accuracy": (np.dtype(FLOAT_ACCURACY_DTYPE), ()),
        "progress": (np.dtype(PROGRESS_DTYPE), ()),
    }
    layout.update({f"mapping/{name}": (np.dtype(dtype), (n_pairs,)) for name, dtype in MAPPING_FIELDS.items()})
    layout.update({f"program/{name}": (np.dtype(dtype), (n_devices,)) for name, (dtype, _) in PROGRAM_FIELDS.items()})
    layout.update({f"reads/{name}": (np.dtype(dtype), (None,)) for name, dtype in READ_FIELDS.items()})
    return layout


def _check_layout(h5: h5py.File, report: CheckReport) -> int | None:
    """Check every dataset's presence, dtype and shape; return the device count if known."""
    try:
        n_devices = int(h5["program/target_us"].shape[0])
    except (KeyError, OSError, RuntimeError, ValueError) as error:
        report.problems.append(f"program/target_us cannot be read ({error}); the device count is unknown")
        return None
    for name, (dtype, shape) in _expected_layout(n_devices).items():
        try:
            dataset = h5[name]
        except (KeyError, OSError, RuntimeError, ValueError) as error:
            report.problems.append(f"dataset {name} is missing or unreadable ({error})")
            continue
        if not isinstance(dataset, h5py.Dataset):
            report.problems.append(f"{name} is not a dataset")
            continue
        if dtype is not None and dataset.dtype != dtype:
            report.problems.append(f"dataset {name} has type {dataset.dtype}, expected {dtype}")
        wrong_rank = len(dataset.shape) != len(shape)
        if wrong_rank or any(want is not None and have != want for have, want in zip(dataset.shape, shape)):
            report.problems.append(f"dataset {name} has shape {dataset.shape}, expected {shape}")
    return n_devices


def _read_progress(h5: h5py.File, report: CheckReport) -> dict[str, Any] | None:
    try:
        record = h5["progress"][()]
    except (KeyError, OSError, RuntimeError, ValueError) as error:
        report.problems.append(f"the progress record cannot be read ({error})")
        return None
    return {name: record[name].item() for name in record.dtype.names}


def _readable_rows(h5: h5py.File, name: str, count: int, valid=None) -> int:
    """Return how many leading rows (up to ``count``) of dataset ``name`` read back, by chunk.

    ``valid`` may reject rows that read back but hold fill values (never written). A missing
    dataset has no readable rows.
    """
    try:
        dataset = h5[name]
    except (KeyError, OSError, RuntimeError, ValueError):
        return 0
    step = dataset.chunks[0] if dataset.chunks else max(count, 1)
    done = 0
    while done < count:
        stop = min(done + step, count)
        try:
            rows = dataset[done:stop]
        except (OSError, RuntimeError, ValueError):
            return done
        if valid is not None:
            good = np.asarray(valid(rows), dtype=bool)
            if not good.all():
                return done + int(np.argmin(good))
        done = stop
    return done


def _scan_tables(h5: h5py.File, progress: dict[str, Any], report: CheckReport) -> None:
    """Find the readable prefix of every table, up to its cursor, and note where it falls short."""
    devices = int(progress["devices_programmed"])
    report.cursors = {
        "devices": devices,
        "remaps": int(progress["remaps"]),
        "reads": int(progress["reads_done"]),
        "evaluations": int(progress["evaluations_done"]),
        "events": int(progress["events"]),
    }

    def stored(name: str):
        if name in ("status", "pulses", "iterations"):
            return lambda rows: rows != NOT_WRITTEN
        return None

    program = [_readable_rows(h5, f"program/{name}", devices, stored(name)) for name in PROGRAM_FIELDS]
    report.readable["devices"] = min(program) // 2 * 2

    # A chunk of zeros passes its Fletcher-32 check, because the checksum of zeros is zero.
    # So rows of the uncompressed tables must also look written. A move changes the devices,
    # a read has a wall time, an evaluation has images and an event has a kind.
    report.readable["remaps"] = _readable_rows(
        h5, "mapping/remaps", report.cursors["remaps"], lambda rows: rows["new_plus"] != rows["old_plus"]
    )
    reads = min(
        _readable_rows(h5, "reads/wall_time", report.cursors["reads"], lambda rows: rows > 0),
        *(
            _readable_rows(h5, f"reads/{name}", report.cursors["reads"], np.isfinite)
            for name in ("time_s", "actual_time_s", "chip_clock_s")
        ),
    )
    report.readable["reads"] = _readable_rows(h5, "reads/g_us", reads)
    report.readable["evaluations"] = _readable_rows(
        h5, "evaluations", report.cursors["evaluations"], lambda rows: rows["images"] > 0
    )
    report.readable["events"] = _readable_rows(
        h5, "events", report.cursors["events"], lambda rows: rows["kind"] != b""
    )

    for name, count in report.readable.items():
        if count < report.cursors[name]:
            report.problems.append(
                f"{name}: only {count} of the {report.cursors[name]} stored are readable; "
                "the rest are damaged or were never written"
            )


def _check_consistency(h5: h5py.File, progress: dict[str, Any], report: CheckReport) -> None:
    """Check that cursors fit the tables and that stored pairs sit where the moves put them."""
    n_devices = int(h5["program/target_us"].shape[0])
    devices = int(progress["devices_programmed"])
    if devices % 2 or not 0 <= devices <= n_devices:
        report.problems.append(f"devices_programmed {devices} is not an even count of 0 to {n_devices}")
        return
    for cursor, name in (("remaps", "mapping/remaps"), ("reads_done", "reads/g_us"),
                         ("evaluations_done", "evaluations"), ("events", "events")):
        if int(progress[cursor]) > h5[name].shape[0]:
            report.problems.append(
                f"cursor {cursor} is {progress[cursor]}, but {name} has {h5[name].shape[0]} rows"
            )
    if report.problems:
        return

    stored_pairs = devices // 2
    try:
        plus = h5["mapping/allocated_plus"][:stored_pairs]
        minus = h5["mapping/allocated_minus"][:stored_pairs]
        rows = h5["mapping/remaps"][: int(progress["remaps"])]
        mapped_plus = h5["mapping/device_plus"][:stored_pairs]
        mapped_minus = h5["mapping/device_minus"][:stored_pairs]
        reads = int(progress["reads_done"])
        evaluations = h5["evaluations"][: int(progress["evaluations_done"])]
    except (OSError, RuntimeError, ValueError) as error:
        report.problems.append(f"the mapping or the evaluations cannot be read ({error})")
        return
    rows = rows[rows["pair"] < stored_pairs]
    plus[rows["pair"]] = rows["new_plus"]
    minus[rows["pair"]] = rows["new_minus"]
    wrong = np.flatnonzero((plus != mapped_plus) | (minus != mapped_minus))
    if wrong.size:
        report.problems.append(
            f"{wrong.size} stored pairs (first: pair {int(wrong[0])}) are not on the devices that "
            "the allocation and the recorded moves give"
        )
    if evaluations.size and int(evaluations["read_index"].max()) >= reads:
        report.problems.append("an evaluation refers to a read that is not stored")


def _note_completeness(h5: h5py.File, progress: dict[str, Any], report: CheckReport) -> None:
    n_devices = int(h5["program/target_us"].shape[0])
    report.complete = bool(progress["complete"])
    if report.complete:
        return
    planned = len(h5["reads"].attrs.get("planned_time_s", []))
    devices, reads = int(progress["devices_programmed"]), int(progress["reads_done"])
    if devices < n_devices:
        report.missing.append(f"{n_devices - devices} of {n_devices} devices not programmed")
    if reads < planned:
        report.missing.append(f"{planned - reads} of {planned} planned reads not taken")
    report.missing.append(f"{int(progress['evaluations_done'])} evaluations stored")
    if progress["paused"]:
        report.notes.append("the run is paused: its failure budget was used up")


def check_run_file(path: str | Path, checkpoint: str | Path | None = None) -> CheckReport:
    """Check ``path`` without changing it; see the module docstring.

    Raises `RunFileError` for a file that is missing, not HDF5, not a hwctl run file, of
    another format version, or not openable at all. With ``checkpoint``, a run programmed
    from another checkpoint is reported as a problem.
    """
    path = Path(path)
    _check_is_hdf5(path)
    report = CheckReport(str(path))
    with _open_for_check(path, report) as h5:
        _check_identity(h5, path, report)
        _check_layout(h5, report)
        progress = _read_progress(h5, report)
        if progress is None:
            return report
        _scan_tables(h5, progress, report)
        if not report.problems:
            _check_consistency(h5, progress, report)
        _note_completeness(h5, progress, report)
        if checkpoint is not None:
            stored = _plain_attr(h5["model"].attrs.get("checkpoint_sha256", ""))
            digest = file_sha256(checkpoint)
            if digest != stored:
                report.problems.append(
                    f"the run was programmed from a checkpoint with sha256 {stored[:12]}…, and "
                    f"{checkpoint} has {digest[:12]}…: this is another model's run"
                )
    return report


# ---------------------------------------------------------------------- salvage


def recover_run_file(path: str | Path, out: str | Path) -> CheckReport:
    """Write the readable prefix of every table of ``path`` into a new run file ``out``.

    The new file contains the stored programming results of the readable devices (with their
    moves to spare devices), the readable reads and events, and the evaluations of those
    reads. It is marked complete only if nothing was lost from a complete run. An emulated
    chip's default state file (``RUN.h5.chip.npz``) is copied beside ``out`` under the
    matching name, so that a resumed run finds the same chip.
    """
    path, out = Path(path), Path(out)
    if out.exists():
        raise RunFileError(f"{out} already exists; choose a new path for the recovered run")
    report = check_run_file(path)
    if "devices" not in report.readable:
        raise RunFileError(f"{path}: the run's tables cannot be read, so there is nothing to recover")
    with _open_for_check(path, CheckReport(str(path))) as h5:
        try:
            run = _create_like(h5, out)
        except (KeyError, OSError, RuntimeError, ValueError) as error:
            raise RunFileError(
                f"{path}: the run's setup (configuration, model, mapping or targets) is damaged "
                f"({error}), so a new run file cannot be built from it"
            ) from None
        with run:
            _copy_prefix(h5, run, report)
            lost = {name: report.cursors[name] - count for name, count in report.readable.items()
                    if count < report.cursors[name]}
            run.log_event("recovered", f"recovered by hwctl check from {path.name}; "
                          f"lost from the end: {lost or 'nothing'}")
            if bool(h5["progress"][()]["complete"]) and not lost:
                run.mark_complete()
    chip_state = path.with_name(path.name + ".chip.npz")
    if chip_state.is_file():
        shutil.copyfile(chip_state, out.with_name(out.name + ".chip.npz"))
        report.notes.append(f"copied the emulated chip's state file {chip_state.name} for {out.name}")
    return report


def _create_like(h5: h5py.File, out: Path) -> RunFile:
    config = h5["config"]
    toml = config["run_toml"][()]
    layers = layer_records(h5["model/layers"][()])
    mapping = h5["mapping"]
    model = h5["model"].attrs
    progress = h5["progress"][()]
    return RunFile.create(
        out,
        config_toml=toml.decode("utf-8") if isinstance(toml, bytes) else str(toml),
        identity=Identity(*(str(_plain_attr(config.attrs[name]))
                            for name in ("manufacturer", "model", "serial", "firmware"))),
        geometry=Geometry(*(int(config["geometry"].attrs[name]) for name in ("arrays", "rows", "cols"))),
        limits=Limits(**{name: _plain(config["limits"].attrs[name]) for name in Limits.__dataclass_fields__}),
        model_info=ModelInfo(*(str(_plain_attr(model[name]))
                               for name in ("checkpoint_path", "checkpoint_sha256", "architecture"))),
        layers=layers,
        mapping=PairMapping(
            layer=mapping["layer"][()],
            weight_index=mapping["weight_index"][()],
            device_plus=mapping["allocated_plus"][()],
            device_minus=mapping["allocated_minus"][()],
            target_weight=mapping["target_weight"][()],
            allocation=str(_plain_attr(mapping.attrs["allocation"])),
        ),
        target_us=h5["program/target_us"][()],
        status_codes=json.loads(h5["program/status"].attrs["status_codes"]),
        failure_codes=json.loads(h5["program/failure"].attrs["failure_codes"]),
        planned_read_times_s=h5["reads"].attrs["planned_time_s"],
        description=str(_plain_attr(h5.attrs.get("description", ""))),
        backend_kind=str(_plain_attr(config.attrs.get("backend_kind", ""))),
        clock_mode=str(_plain_attr(config.attrs.get("clock_mode", ""))),
        failure_budget=float(progress["failure_budget"]),
    )


def _copy_prefix(h5: h5py.File, run: RunFile, report: CheckReport) -> None:
    devices = report.readable["devices"]
    if devices:
        values = {name: h5[f"program/{name}"][:devices] for name in PROGRAM_FIELDS}
        rows = h5["mapping/remaps"][: report.readable["remaps"]]
        rows = rows[rows["pair"] < devices // 2]
        moves = RemapRows(rows["pair"], rows["new_plus"], rows["new_minus"], rows["chip_clock_s"],
                          rows["failure_plus"], rows["failure_minus"]) if len(rows) else None
        run.write_program_batch(0, **values, remaps=moves)

    accuracy = h5["float_accuracy"][()]
    if accuracy["images"] > 0:
        run.set_float_accuracy(correct=int(accuracy["correct"]), images=int(accuracy["images"]))

    reads = report.readable["reads"] if devices == run.n_devices else 0
    for index in range(reads):
        scalars = {name: float(h5[f"reads/{name}"][index]) for name in READ_FIELDS}
        run.append_read(g_us=h5["reads/g_us"][index], **scalars)

    for row in h5["evaluations"][: report.readable["evaluations"]]:
        if row["read_index"] < reads:
            run.append_evaluation(read_index=int(row["read_index"]), time_s=float(row["time_s"]),
                                  compensation=_decode(row["compensation"]),
                                  correct=int(row["correct"]), images=int(row["images"]))
    for row in h5["events"][: report.readable["events"]]:
        run.log_event(_decode(row["kind"]), _decode(row["message"]), float(row["chip_clock_s"]),
                      wall_time=float(row["wall_time"]))
