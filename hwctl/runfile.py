"""The HDF5 run file: one file per run, written as the run goes and readable while it is written.

`RunFile.create` makes every group and dataset up front and then switches the file into
single-writer/multiple-reader (SWMR) mode. After that the writer only writes, resizes and
flushes, because SWMR allows nothing else. Readers open the file with ``RunFile.open(path)``
at any time, from any process. The layout, with dtypes, shapes and units, is in
docs/run-file.md.

Every growing table has a cursor in ``/progress``, updated and flushed after the rows it
counts. A reader, or a resumed run, trusts only the rows the cursors cover, so a run killed
between two writes never looks further along than it was, and never looks complete. A program
batch, with the pairs it moved to spare devices, becomes valid in one write of ``/progress``.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import hwctl
from hwctl.backend import Geometry, Identity, Limits

log = logging.getLogger(__name__)

FORMAT_NAME = "hwctl-run"
# Version 2 added per-device failure codes, the allocated mapping, the batch in flight, the
# pause flag, the writer's identity and Fletcher-32 checksums on every chunked dataset.
FORMAT_VERSION = 2

# Devices per chunk of the per-device datasets: 512 KiB of float64, so one read row is a
# dozen chunks for the reference network and a reader can fetch a slice without the rest.
DEVICE_CHUNK = 65536
TABLE_CHUNK = 256
# Fletcher-32 makes HDF5 raise on a damaged chunk instead of returning wrong values.
COMPRESSION = {"compression": "gzip", "compression_opts": 4, "shuffle": True, "fletcher32": True}
TABLE_FILTERS = {"fletcher32": True}

MAX_LAYER_DIMS = 5
LAYER_NAME_BYTES = 128
LAYER_KIND_BYTES = 16
EVENT_KIND_BYTES = 16
EVENT_MESSAGE_BYTES = 512
COMPENSATION_BYTES = 8
HOST_BYTES = 64
EVENT_KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,15}$")

# Fill values mark what has not been written yet: -1 for counts and codes, NaN for values.
NOT_WRITTEN = -1

LAYER_DTYPE = np.dtype(
    [
        ("name", f"S{LAYER_NAME_BYTES}"),
        ("kind", f"S{LAYER_KIND_BYTES}"),
        ("ndim", "i1"),
        ("shape", "i8", (MAX_LAYER_DIMS,)),
        ("weight_count", "i8"),
        ("bias_count", "i8"),
        ("w_max", "f8"),
        ("first_pair", "i8"),
        ("pair_count", "i8"),
    ]
)
EVALUATION_DTYPE = np.dtype(
    [
        ("read_index", "i4"),
        ("time_s", "f8"),
        ("compensation", f"S{COMPENSATION_BYTES}"),
        ("accuracy", "f8"),
        ("images", "i4"),
        ("correct", "i4"),
    ]
)
FLOAT_ACCURACY_DTYPE = np.dtype([("accuracy", "f8"), ("images", "i4"), ("correct", "i4")])
EVENT_DTYPE = np.dtype(
    [
        ("wall_time", "f8"),
        ("chip_clock_s", "f8"),
        ("kind", f"S{EVENT_KIND_BYTES}"),
        ("message", f"S{EVENT_MESSAGE_BYTES}"),
    ]
)
# One row per pair moved to spare devices before it was stored.
REMAP_DTYPE = np.dtype(
    [
        ("pair", "i8"),
        ("old_plus", "i8"),
        ("old_minus", "i8"),
        ("new_plus", "i8"),
        ("new_minus", "i8"),
        ("chip_clock_s", "f8"),
        ("failure_plus", "i1"),  # failure code of old_plus, -1 when not given
        ("failure_minus", "i1"),
    ]
)
PROGRESS_DTYPE = np.dtype(
    [
        ("stage", "i1"),
        ("devices_programmed", "i8"),
        ("batches_done", "i8"),
        ("remaps", "i8"),
        ("reads_done", "i4"),
        ("evaluations_done", "i4"),
        ("events", "i4"),
        ("complete", "u1"),
        ("inflight_start", "i8"),
        ("inflight_stop", "i8"),
        ("inflight_clock_s", "f8"),
        ("staged_clock_s", "f8"),
        ("staged_remaps", "i8"),
        ("staged_read_clock_s", "f8"),
        ("staged_read", "u1"),
        ("paused", "u1"),
        ("failure_budget", "f8"),
        ("sessions", "i4"),
        ("writer_pid", "i8"),
        ("writer_host", f"S{HOST_BYTES}"),
        ("updated_wall_time", "f8"),
    ]
)

# Per-device programming results: name -> (dtype, fill value).
PROGRAM_FIELDS: dict[str, tuple[str, float | int]] = {
    "final_g_us": ("f8", math.nan),
    "pulses": ("i4", NOT_WRITTEN),
    "iterations": ("i4", NOT_WRITTEN),
    "status": ("i1", NOT_WRITTEN),
    "t_programmed_s": ("f8", math.nan),
    "failure": ("i1", NOT_WRITTEN),
}
# Scalars stored with every read: name -> dtype.
READ_FIELDS = {
    "time_s": "f8",
    "actual_time_s": "f8",
    "chip_clock_s": "f8",
    "temperature_c": "f8",
    "wall_time": "f8",
}
MAPPING_FIELDS = {
    "layer": "i2",
    "weight_index": "i8",
    "device_plus": "i8",
    "device_minus": "i8",
    "target_weight": "f4",
}
# Every dataset a readable run file of this version has; a file without one is damaged.
REQUIRED_DATASETS = (
    "config/run_toml",
    "model/layers",
    *(f"mapping/{name}" for name in MAPPING_FIELDS),
    "mapping/allocated_plus",
    "mapping/allocated_minus",
    "mapping/remaps",
    "program/target_us",
    *(f"program/{name}" for name in PROGRAM_FIELDS),
    *(f"reads/{name}" for name in READ_FIELDS),
    "reads/g_us",
    "evaluations",
    "float_accuracy",
    "events",
    "progress",
)


class RunFileError(Exception):
    """A run file that cannot be created, opened or written as requested."""


class Stage(IntEnum):
    """Stage of a run, as stored in ``/progress``."""

    CREATED = 0
    PROGRAMMING = 1
    PROGRAMMED = 2
    MEASURING = 3
    COMPLETE = 4


@dataclass(frozen=True)
class LayerRecord:
    """One programmed layer: its weights (then biases) occupy pairs ``first_pair`` onwards."""

    name: str
    kind: str  # "conv" or "linear"
    shape: tuple[int, ...]  # shape of the weight tensor
    weight_count: int
    bias_count: int
    w_max: float  # largest |weight| of the layer, mapped to G_max
    first_pair: int
    pair_count: int


@dataclass(frozen=True)
class ModelInfo:
    """The source of the programmed weights."""

    checkpoint_path: str
    checkpoint_sha256: str
    architecture: str


@dataclass(frozen=True)
class PairMapping:
    """Weight-to-device mapping, one entry per differential pair, in programming order.

    ``weight_index`` indexes the layer's flattened weight tensor, with biases numbered after
    the weights. ``allocation`` describes, in words, the rule that produced the mapping.
    """

    layer: np.ndarray  # int16 index into the layer table
    weight_index: np.ndarray  # int64
    device_plus: np.ndarray  # int64 flat device index of G+
    device_minus: np.ndarray  # int64 flat device index of G-
    target_weight: np.ndarray  # float32 weight value to store
    allocation: str

    @property
    def n_pairs(self) -> int:
        return len(self.layer)

    def device_ids(self) -> np.ndarray:
        """Return devices in file order: pair p is slots 2p (G+) and 2p + 1 (G-)."""
        return np.column_stack([self.device_plus, self.device_minus]).reshape(-1)


@dataclass(frozen=True)
class _Setup:
    """Everything a run file records before the first pulse (the arguments of `RunFile.create`)."""

    config_toml: str
    identity: Identity
    geometry: Geometry
    limits: Limits
    model_info: ModelInfo
    layers: Sequence[LayerRecord]
    mapping: PairMapping
    target_us: np.ndarray
    status_codes: Mapping[str, int]
    planned_read_times_s: Sequence[float] = ()
    description: str = ""
    backend_kind: str = ""
    failure_codes: Mapping[str, int] | None = None
    clock_mode: str = ""
    failure_budget: float = math.nan


@dataclass(frozen=True)
class Progress:
    """Cursors of a run (the finished devices or rows of each table) and the writer's state."""

    stage: Stage
    devices_programmed: int
    batches_done: int
    remaps: int
    reads_done: int
    evaluations_done: int
    events: int
    complete: bool
    inflight_start: int = NOT_WRITTEN  # first slot of a program batch begun but not stored
    inflight_stop: int = NOT_WRITTEN
    inflight_clock_s: float = math.nan  # chip clock when that batch began
    staged_clock_s: float = math.nan  # chip clock after the in-flight batch, once staged
    staged_remaps: int = NOT_WRITTEN  # remap rows staged with that batch; -1: nothing staged
    staged_read_clock_s: float = math.nan  # chip clock after a read staged past the cursor
    staged_read: bool = False  # a read is staged past the cursor
    paused: bool = False
    failure_budget: float = math.nan  # fraction of all pairs; NaN: not set
    sessions: int = 0  # processes that have written the file: 1 after creation, +1 per resume
    writer_pid: int = 0
    writer_host: str = ""
    updated_wall_time: float = math.nan  # Unix time of the last write of /progress


@dataclass(frozen=True)
class InFlightBatch:
    """A program batch that was begun but not stored: device slots ``start`` to ``stop``.

    ``staged`` is True when its results were staged (`stage_program_batch`) but not
    committed; ``staged_clock_s`` is then the chip clock when the results were taken.
    """

    start: int
    stop: int
    chip_clock_s: float  # chip clock when the batch began, s
    staged: bool = False
    staged_clock_s: float = math.nan


@dataclass(frozen=True)
class RemapRows:
    """Moves of pairs onto spare devices, in the order they happened, to store with a batch.

    A pair may move more than once; each row starts from where the previous move left it.
    ``failure_plus`` and ``failure_minus`` are the failure codes of the devices left behind.
    """

    pairs: np.ndarray
    new_plus: np.ndarray
    new_minus: np.ndarray
    chip_clock_s: np.ndarray
    failure_plus: np.ndarray
    failure_minus: np.ndarray

    def __len__(self) -> int:
        return len(self.pairs)


@dataclass(frozen=True)
class Event:
    """One entry of the event log."""

    wall_time: float  # Unix time, s
    chip_clock_s: float  # NaN when the chip clock was not known
    kind: str
    message: str


def layer_records(table: np.ndarray) -> list[LayerRecord]:
    """Return the `LayerRecord` of each row of a ``/model/layers`` table."""
    return [
        LayerRecord(
            name=_decode(row["name"]),
            kind=_decode(row["kind"]),
            shape=tuple(int(size) for size in row["shape"][: row["ndim"]]),
            weight_count=int(row["weight_count"]),
            bias_count=int(row["bias_count"]),
            w_max=float(row["w_max"]),
            first_pair=int(row["first_pair"]),
            pair_count=int(row["pair_count"]),
        )
        for row in table
    ]


def file_sha256(path: str | Path) -> str:
    """Return the SHA-256 digest of a file as hexadecimal text, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _encode(text: str, size: int, field_name: str) -> bytes:
    """Encode text as UTF-8 for a fixed-size field; raise if it does not fit."""
    data = text.encode("utf-8")
    if len(data) > size:
        raise RunFileError(
            f"{field_name} {text!r} is {len(data)} bytes in UTF-8; "
            f"at most {size} fit in the run file"
        )
    return data


def _encode_truncated(text: str, size: int) -> bytes:
    """Encode text as UTF-8, cut at a character boundary to at most ``size`` bytes."""
    data = text.encode("utf-8")
    if len(data) <= size:
        return data
    return data[: size - 3].decode("utf-8", errors="ignore").encode("utf-8") + b"..."


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class _WriterLock:
    """An advisory shared flock on the run file, held by the process that writes it.

    HDF5 drops its own file lock when SWMR writing starts, so without this lock a second
    writer could not tell a live run from a crashed one. SWMR readers hold a shared HDF5
    lock too, so a shared lock here does not keep them out, while an exclusive attempt by
    another would-be writer fails as long as this one lives.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _is_in_use(path: Path) -> bool:
    """Return True if another process has the file open through HDF5 or as a writer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        # A process that is only checking or opening the file locks it for a moment, so
        # retry for half a second before reporting the file as in use.
        for _ in range(10):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


class RunFile:
    """An open run file; create one with `RunFile.create`, open one with `RunFile.open`."""

    def __init__(self, h5: h5py.File, path: Path, mode: str, lock: _WriterLock | None) -> None:
        self._h5 = h5
        self.path = path
        self.mode = mode
        self._lock = lock
        self.n_devices = int(h5["program/target_us"].shape[0])
        self.n_pairs = self.n_devices // 2
        self._status_names: dict[str, int] = json.loads(h5["program/status"].attrs["status_codes"])
        self._failure_names: dict[str, int] = json.loads(h5["program/failure"].attrs["failure_codes"])
        # Where `open` kept the original of a file whose writer died; None otherwise.
        self.recovered_from: Path | None = None
        # The progress record as the previous writer left it, for a file opened with "a".
        self.previous_session: Progress | None = None

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        config_toml: str,
        identity: Identity,
        geometry: Geometry,
        limits: Limits,
        model_info: ModelInfo,
        layers: Sequence[LayerRecord],
        mapping: PairMapping,
        target_us: np.ndarray,
        status_codes: Mapping[str, int],
        planned_read_times_s: Sequence[float] = (),
        description: str = "",
        backend_kind: str = "",
        failure_codes: Mapping[str, int] | None = None,
        clock_mode: str = "",
        failure_budget: float = math.nan,
        overwrite: bool = False,
    ) -> RunFile:
        """Create a run file with every group and dataset, switch on SWMR and return it open.

        ``target_us`` contains the target conductance of every device in file order (pair p:
        slots 2p and 2p + 1), in µS. ``status_codes`` maps the names of program-and-verify
        outcomes to the int8 codes later passed to `write_program_batch`, and
        ``failure_codes`` does the same for its per-device failure codes. ``clock_mode`` is
        ``"virtual"`` or ``"real"`` (the backend's clock), and ``failure_budget`` the fraction of
        pairs that may fail before the run pauses. Everything is checked for consistency before
        the file is touched. An existing file is replaced only with ``overwrite=True``.
        """
        path = Path(path)
        setup = _Setup(
            config_toml=config_toml,
            identity=identity,
            geometry=geometry,
            limits=limits,
            model_info=model_info,
            layers=layers,
            mapping=mapping,
            target_us=np.asarray(target_us, dtype=np.float64),
            status_codes=status_codes,
            planned_read_times_s=planned_read_times_s,
            description=description,
            backend_kind=backend_kind,
            failure_codes=failure_codes,
            clock_mode=clock_mode,
            failure_budget=failure_budget,
        )
        _check_setup(setup)
        if path.exists() and not overwrite:
            raise RunFileError(
                f"{path} already exists; choose another output path, resume the run in it, "
                "or replace it on purpose with overwrite=True (hwctl run --force)"
            )
        if path.exists() and _is_in_use(path):
            raise RunFileError(
                f"cannot replace {path}: another process has it open; stop that process first"
            )
        path.parent.mkdir(parents=True, exist_ok=True)

        started = time.perf_counter()
        h5 = h5py.File(path, "w", libver="latest")
        try:
            _write_layout(h5, setup)
            h5.swmr_mode = True
            lock = _WriterLock(path)
        except BaseException:
            # The file has no run data yet, so a half-built one is removed, not left behind.
            h5.close()
            path.unlink(missing_ok=True)
            raise
        log.info(
            "created run file %s: %d pairs, %d devices, in %.2f s",
            path,
            setup.mapping.n_pairs,
            2 * setup.mapping.n_pairs,
            time.perf_counter() - started,
        )
        run = cls(h5, path, "a", lock)
        run._start_session()
        return run

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> RunFile:
        """Open a run file to read it (``"r"``) or to resume writing it (``"a"``).

        Reading works while another process writes the file. HDF5 cannot open a file for
        writing after its writer was killed. In that case ``"a"`` copies the finished contents
        into a fresh file, which takes the original name. The original is kept beside it as
        ``NAME.crashed-TIMESTAMP.h5`` (`recovered_from`). Opening with ``"a"`` also counts a
        new writing session and puts pairs that are not stored yet back on the devices the
        allocation and the stored moves give them, undoing moves of a batch that was never
        stored.
        """
        path = Path(path)
        if mode not in ("r", "a"):
            raise ValueError(f"invalid mode {mode!r}: use 'r' to read or 'a' to resume writing")
        _check_is_hdf5(path)

        if mode == "r":
            h5 = _open_for_reading(path)
            try:
                _check_format(h5, path)
            except BaseException:
                h5.close()
                raise
            return cls(h5, path, "r", None)

        if _is_in_use(path):
            raise RunFileError(
                f"cannot open {path} for writing: another process has it open (a run still "
                "writing it, or a reader); stop that process and retry"
            )
        backup = None
        try:
            h5 = _open_for_writing(path)
        except OSError as error:
            if "already open for write" not in str(error):
                raise _damaged(path, error) from None
            # No live process has the file open, so its writer died without closing it.
            backup = _recover_crashed(path)
            try:
                h5 = _open_for_writing(path)
            except OSError as error:
                raise _damaged(path, error) from None
        try:
            _check_format(h5, path)
            h5.swmr_mode = True
            lock = _WriterLock(path)
        except BaseException:
            h5.close()
            raise
        run = cls(h5, path, "a", lock)
        run.recovered_from = backup
        run.previous_session = run.progress()
        run._restore_unstored_mapping()
        run._start_session()
        return run

    def close(self) -> None:
        """Flush and close the file; further calls do nothing."""
        if self._h5.id.valid:
            if self.mode == "a":
                self._h5.flush()
            self._h5.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def begin_program_batch(self, start: int, stop: int, chip_clock_s: float) -> None:
        """Record that device slots ``start`` to ``stop`` are about to be programmed.

        A run that stops before the batch is committed leaves this record, so the next
        session can tell which devices may have pulses the file does not describe.
        ``chip_clock_s`` is the chip clock before the first pulse of the batch.
        """
        self._check_writable()
        progress = self.progress()
        if start != progress.devices_programmed or not start < stop <= self.n_devices:
            raise RunFileError(
                f"{self.path}: cannot begin a program batch of slots {start} to {stop}; the next "
                f"slot to store is {progress.devices_programmed} of {self.n_devices}"
            )
        self._set_progress(
            progress,
            inflight_start=start,
            inflight_stop=stop,
            inflight_clock_s=chip_clock_s,
            staged_clock_s=math.nan,
            staged_remaps=NOT_WRITTEN,
        )

    def in_flight(self) -> InFlightBatch | None:
        """Return the program batch that was begun but not committed, or None."""
        progress = self.progress()
        if progress.inflight_start < 0 or progress.inflight_start != progress.devices_programmed:
            return None
        return InFlightBatch(
            progress.inflight_start,
            progress.inflight_stop,
            progress.inflight_clock_s,
            progress.staged_remaps >= 0,
            progress.staged_clock_s,
        )

    def write_program_batch(self, start: int, **batch: Any) -> None:
        """Store programming results for devices ``start`` to ``start + len(final_g_us)``.

        Slots are in file order (pair p: 2p is G+, 2p + 1 is G-). Batches must follow each
        other without gaps or overlap, starting at ``progress().devices_programmed``, so a
        resumed run can never store a device twice. This is `stage_program_batch`, which
        takes the same arguments, followed by `commit_program_batch`.
        """
        self.stage_program_batch(start, **batch)
        self.commit_program_batch()

    def stage_program_batch(
        self,
        start: int,
        *,
        final_g_us: np.ndarray,
        pulses: np.ndarray,
        iterations: np.ndarray,
        status: np.ndarray,
        t_programmed_s: np.ndarray,
        failure: np.ndarray | None = None,
        remaps: RemapRows | None = None,
        chip_clock_s: float = math.nan,
    ) -> None:
        """Write a batch's results past the cursor, where `commit_program_batch` makes them valid.

        ``failure`` holds per-device failure codes (the ``failure_codes`` given at creation);
        without it they are stored as -1. ``remaps`` lists the pairs of this batch that moved
        to spare devices before the results were taken. ``chip_clock_s`` is the chip clock when
        the results were taken. A run that stops before the commit can commit the staged batch
        later if the chip is provably still in that state (see `InFlightBatch`).
        """
        self._check_writable()
        progress = self.progress()
        count = len(final_g_us)
        if start != progress.devices_programmed:
            raise RunFileError(
                f"{self.path}: program batch starts at device {start}, but the next device to "
                f"store is {progress.devices_programmed}; resume from that device"
            )
        if count == 0 or start + count > self.n_devices:
            raise RunFileError(
                f"{self.path}: program batch of {count} devices at {start} does not fit the "
                f"{self.n_devices} devices of the run"
            )
        if failure is None:
            failure = np.full(count, NOT_WRITTEN, dtype=np.int8)
        values = {
            "final_g_us": final_g_us,
            "pulses": pulses,
            "iterations": iterations,
            "status": status,
            "t_programmed_s": t_programmed_s,
            "failure": failure,
        }
        for name, array in values.items():
            if np.shape(array) != (count,):
                raise RunFileError(
                    f"{self.path}: program batch array {name} has shape {np.shape(array)}, "
                    f"expected ({count},)"
                )
        _check_codes(self.path, "status", status, self._status_names)
        _check_codes(self.path, "failure", failure, self._failure_names, NOT_WRITTEN)
        rows = self._remap_rows(remaps, start, start + count) if remaps else None

        if rows is not None:
            # This checks the spares and fills in the devices each move left.
            self._batch_mapping(start // 2, (start + count) // 2, rows)
            table = self._h5["mapping/remaps"]
            _grow(table, progress.remaps + len(rows))
            table[progress.remaps : progress.remaps + len(rows)] = rows
        group = self._h5["program"]
        for name, array in values.items():
            group[name][start : start + count] = np.asarray(array, dtype=PROGRAM_FIELDS[name][0])
        self._h5.flush()

        self._set_progress(
            progress,
            inflight_start=start,
            inflight_stop=start + count,
            inflight_clock_s=(
                progress.inflight_clock_s if progress.inflight_start == start else math.nan
            ),
            staged_clock_s=chip_clock_s,
            staged_remaps=0 if rows is None else len(rows),
        )

    def commit_program_batch(self) -> None:
        """Make the staged batch, with its moves to spare devices, part of the run.

        The moved pairs' devices are written to ``/mapping`` first; the batch then becomes
        valid in one write of ``/progress``. Committing again after a stop in between gives
        the same mapping.
        """
        self._check_writable()
        progress = self.progress()
        batch = self.in_flight()
        if batch is None or not batch.staged:
            raise RunFileError(f"{self.path}: no staged program batch to commit")
        first_pair, stop_pair = batch.start // 2, batch.stop // 2
        rows = self._h5["mapping/remaps"][progress.remaps : progress.remaps + progress.staged_remaps]
        if len(rows):
            plus, minus = self._batch_mapping(first_pair, stop_pair, rows)
            moved = np.unique(rows["pair"])
            mapping = self._h5["mapping"]
            mapping["device_plus"][moved] = plus[moved - first_pair]
            mapping["device_minus"][moved] = minus[moved - first_pair]
            self._h5.flush()

        stage = Stage.PROGRAMMED if batch.stop == self.n_devices else Stage.PROGRAMMING
        self._set_progress(
            progress,
            stage=stage,
            devices_programmed=batch.stop,
            batches_done=progress.batches_done + 1,
            remaps=progress.remaps + len(rows),
            inflight_start=NOT_WRITTEN,
            inflight_stop=NOT_WRITTEN,
            inflight_clock_s=math.nan,
            staged_clock_s=math.nan,
            staged_remaps=NOT_WRITTEN,
        )

    def _remap_rows(self, remaps: RemapRows, start: int, stop: int) -> np.ndarray:
        """Check the moves of the batch of slots ``start`` to ``stop``; return remap rows."""
        pairs = np.asarray(remaps.pairs, dtype=np.int64)
        columns = {
            "new_plus": np.asarray(remaps.new_plus, dtype=np.int64),
            "new_minus": np.asarray(remaps.new_minus, dtype=np.int64),
            "chip_clock_s": np.asarray(remaps.chip_clock_s, dtype=np.float64),
            "failure_plus": np.asarray(remaps.failure_plus, dtype=np.int8),
            "failure_minus": np.asarray(remaps.failure_minus, dtype=np.int8),
        }
        if any(array.shape != pairs.shape for array in columns.values()) or pairs.ndim != 1:
            raise RunFileError(f"{self.path}: remap arrays differ in length")
        if pairs.min() < start // 2 or pairs.max() >= stop // 2:
            raise RunFileError(
                f"{self.path}: remapped pairs must belong to the batch, pairs {start // 2} to "
                f"{stop // 2 - 1}"
            )
        for name in ("failure_plus", "failure_minus"):
            _check_codes(self.path, name, columns[name], self._failure_names, NOT_WRITTEN)
        rows = np.zeros(pairs.size, dtype=REMAP_DTYPE)
        rows["pair"] = pairs
        for name, array in columns.items():
            rows[name] = array
        return rows

    def _batch_mapping(
        self, first_pair: int, stop_pair: int, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the devices of pairs ``first_pair`` to ``stop_pair`` after the moves ``rows``.

        The moves start from the pairs' devices before the batch, and each row's old devices
        are filled in from where the previous move left the pair. Raises if a spare device
        lies outside the chip or is already used by another pair.
        """
        plus, minus = self._unstored_mapping(first_pair)
        plus, minus = plus[: stop_pair - first_pair], minus[: stop_pair - first_pair]
        # Moves happen in order: a pair's second move starts from the spare of its first.
        positions = rows["pair"] - first_pair
        order = np.argsort(positions, kind="stable")
        ordered = positions[order]
        first_move = np.r_[True, ordered[1:] != ordered[:-1]]
        last_move = np.r_[ordered[1:] != ordered[:-1], True]
        for side, devices in (("plus", plus), ("minus", minus)):
            new = rows[f"new_{side}"][order]
            rows[f"old_{side}"][order] = np.where(first_move, devices[ordered], np.roll(new, 1))
            devices[ordered[last_move]] = new[last_move]

        mapping = self._h5["mapping"]
        others = np.concatenate([
            mapping["device_plus"][:first_pair], mapping["device_plus"][stop_pair:],
            mapping["device_minus"][:first_pair], mapping["device_minus"][stop_pair:],
        ])
        spares = np.concatenate([rows["new_plus"], rows["new_minus"]])
        if spares.min() < 0 or spares.max() >= self.geometry().devices:
            raise RunFileError(f"{self.path}: spare devices must be devices of the chip")
        batch_devices = np.concatenate([plus, minus])
        if np.isin(batch_devices, others).any() or len(np.unique(batch_devices)) != batch_devices.size:
            raise RunFileError(
                f"{self.path}: a spare device already holds a pair of the run; hand out each "
                "spare once"
            )
        return plus, minus

    def remap_pairs(
        self,
        pairs: np.ndarray,
        new_plus: np.ndarray,
        new_minus: np.ndarray,
        chip_clock_s: float = math.nan,
    ) -> None:
        """Move ``pairs`` onto spare devices ``new_plus`` and ``new_minus``.

        Only pairs whose devices are not stored yet can move, and a spare must not hold any
        other pair, so a stored result always belongs to the devices the mapping names. Each
        move is logged in ``/mapping/remaps`` with the devices it left.
        """
        self._check_writable()
        progress = self.progress()
        pairs = np.asarray(pairs, dtype=np.int64)
        new_plus = np.asarray(new_plus, dtype=np.int64)
        new_minus = np.asarray(new_minus, dtype=np.int64)
        if not pairs.size:
            return
        if pairs.shape != new_plus.shape or pairs.shape != new_minus.shape:
            raise RunFileError(f"{self.path}: remap arrays differ in length")
        if pairs.min() < 0 or pairs.max() >= self.n_pairs or len(np.unique(pairs)) != pairs.size:
            raise RunFileError(f"{self.path}: remap pairs must be distinct pairs of the run")
        if 2 * int(pairs.min()) < progress.devices_programmed:
            raise RunFileError(
                f"{self.path}: pair {int(pairs.min())} is already stored; only pairs not yet "
                "stored can move to spare devices"
            )
        group = self._h5["mapping"]
        plus = group["device_plus"][:]
        minus = group["device_minus"][:]
        spares = np.concatenate([new_plus, new_minus])
        geometry = self.geometry()
        if spares.min() < 0 or spares.max() >= geometry.devices or len(np.unique(spares)) != spares.size:
            raise RunFileError(f"{self.path}: spare devices must be distinct devices of the chip")
        if np.isin(spares, np.concatenate([plus, minus])).any():
            raise RunFileError(f"{self.path}: a spare device already holds a pair of the run")

        rows = np.zeros(pairs.size, dtype=REMAP_DTYPE)
        rows["pair"] = pairs
        rows["old_plus"] = plus[pairs]
        rows["old_minus"] = minus[pairs]
        rows["new_plus"] = new_plus
        rows["new_minus"] = new_minus
        rows["chip_clock_s"] = chip_clock_s
        rows["failure_plus"] = NOT_WRITTEN
        rows["failure_minus"] = NOT_WRITTEN
        table = group["remaps"]
        _grow(table, progress.remaps + pairs.size)
        table[progress.remaps : progress.remaps + pairs.size] = rows
        plus[pairs] = new_plus
        minus[pairs] = new_minus
        group["device_plus"][:] = plus
        group["device_minus"][:] = minus
        self._h5.flush()

        self._set_progress(progress, remaps=progress.remaps + pairs.size)

    def remaps(self) -> np.ndarray:
        """Return the ``/mapping/remaps`` rows written so far."""
        count = self.progress().remaps
        return self._dataset("mapping/remaps")[:count]

    def append_read(self, **read: Any) -> int:
        """Store one read-back of every device and return its read index.

        This is `stage_read`, which takes the same arguments, followed by `commit_read`.
        """
        self.stage_read(**read)
        return self.commit_read()

    def stage_read(
        self,
        *,
        time_s: float,
        actual_time_s: float,
        chip_clock_s: float,
        temperature_c: float,
        g_us: np.ndarray,
        wall_time: float | None = None,
        end_clock_s: float = math.nan,
    ) -> None:
        """Write a read past the cursor, where `commit_read` makes it valid.

        ``time_s`` is the scheduled time after programming and ``actual_time_s`` the time the
        read began, both in s of chip time. ``g_us`` contains all devices in file order, in µS.
        ``end_clock_s`` is the chip clock after the read. A run that stops before the commit
        can commit the staged read later if the chip is provably still in that state.
        """
        self._check_writable()
        progress = self.progress()
        if progress.devices_programmed != self.n_devices:
            raise RunFileError(
                f"{self.path}: cannot store a read before programming is finished "
                f"({progress.devices_programmed} of {self.n_devices} devices stored)"
            )
        g_us = np.asarray(g_us, dtype=np.float64)
        if g_us.shape != (self.n_devices,):
            raise RunFileError(
                f"{self.path}: read has shape {g_us.shape}, expected ({self.n_devices},)"
            )

        index = progress.reads_done
        group = self._h5["reads"]
        scalars = {
            "time_s": time_s,
            "actual_time_s": actual_time_s,
            "chip_clock_s": chip_clock_s,
            "temperature_c": temperature_c,
            "wall_time": time.time() if wall_time is None else wall_time,
        }
        _grow(group["g_us"], index + 1)
        group["g_us"][index, :] = g_us
        for name, value in scalars.items():
            _grow(group[name], index + 1)
            group[name][index] = value
        self._h5.flush()
        self._set_progress(progress, staged_read_clock_s=end_clock_s, staged_read=True)

    def staged_read_clock_s(self) -> float | None:
        """Return the chip clock after a staged read that is not committed, or None."""
        progress = self.progress()
        return progress.staged_read_clock_s if progress.staged_read else None

    def commit_read(self) -> int:
        """Make the staged read part of the run and return its read index."""
        self._check_writable()
        progress = self.progress()
        if not progress.staged_read:
            raise RunFileError(f"{self.path}: no staged read to commit")
        # A read added after completion, such as a later drift point, keeps the run complete.
        stage = Stage.COMPLETE if progress.complete else Stage.MEASURING
        self._set_progress(
            progress,
            stage=stage,
            reads_done=progress.reads_done + 1,
            staged_read=False,
            staged_read_clock_s=math.nan,
        )
        return progress.reads_done

    def append_evaluation(
        self, *, read_index: int, time_s: float, compensation: str, correct: int, images: int
    ) -> int:
        """Store one accuracy measurement and return its row; accuracy is ``correct / images``."""
        self._check_writable()
        progress = self.progress()
        if not 0 <= read_index < progress.reads_done:
            raise RunFileError(
                f"{self.path}: evaluation refers to read {read_index}, but reads 0 to "
                f"{progress.reads_done - 1} are stored"
            )
        if images < 1 or not 0 <= correct <= images:
            raise RunFileError(
                f"{self.path}: evaluation has {correct} correct of {images} images; "
                "expected 0 <= correct <= images and images >= 1"
            )
        code = _encode(compensation, COMPENSATION_BYTES, "compensation name")
        table = self.evaluations()
        repeated = (table["read_index"] == read_index) & (table["compensation"] == code)
        if repeated.any():
            raise RunFileError(
                f"{self.path}: read {read_index} already has an evaluation with compensation "
                f"{compensation!r}"
            )

        row = np.zeros((), dtype=EVALUATION_DTYPE)
        row["read_index"] = read_index
        row["time_s"] = time_s
        row["compensation"] = code
        row["accuracy"] = correct / images
        row["images"] = images
        row["correct"] = correct
        index = progress.evaluations_done
        dataset = self._h5["evaluations"]
        _grow(dataset, index + 1)
        dataset[index] = row
        self._h5.flush()

        self._set_progress(progress, evaluations_done=index + 1)
        return index

    def set_float_accuracy(self, *, correct: int, images: int) -> None:
        """Store the accuracy of the network with its floating-point weights, as a baseline."""
        self._check_writable()
        if images < 1 or not 0 <= correct <= images:
            raise RunFileError(
                f"{self.path}: float accuracy has {correct} correct of {images} images; "
                "expected 0 <= correct <= images and images >= 1"
            )
        record = np.zeros((), dtype=FLOAT_ACCURACY_DTYPE)
        record["accuracy"] = correct / images
        record["images"] = images
        record["correct"] = correct
        self._h5["float_accuracy"][()] = record
        self._h5.flush()

    def log_event(
        self,
        kind: str,
        message: str = "",
        chip_clock_s: float = math.nan,
        wall_time: float | None = None,
    ) -> None:
        """Append an event (start, stop, resume, pause, fault, complete, ...) to ``/events``.

        ``kind`` is a lowercase word of at most 16 characters. A message longer than 512
        UTF-8 bytes is cut in the file; the full text goes to the log.
        """
        stamp = time.time() if wall_time is None else wall_time
        self.log_events([Event(stamp, chip_clock_s, kind, message)])

    def log_events(self, events: Sequence[Event]) -> None:
        """Append several events that become valid together, in one write of ``/progress``."""
        self._check_writable()
        for event in events:
            if not EVENT_KIND_PATTERN.match(event.kind):
                raise RunFileError(
                    f"invalid event kind {event.kind!r}: expected a lowercase word of letters, "
                    "digits and underscores, at most 16 characters, such as 'start' or 'fault'"
                )
        progress = self.progress()
        rows = np.zeros(len(events), dtype=EVENT_DTYPE)
        for index, event in enumerate(events):
            log.info("run event %s: %s", event.kind, event.message)
            rows["wall_time"][index] = event.wall_time
            rows["chip_clock_s"][index] = event.chip_clock_s
            rows["kind"][index] = event.kind.encode("ascii")
            rows["message"][index] = _encode_truncated(event.message, EVENT_MESSAGE_BYTES)
        first = progress.events
        dataset = self._h5["events"]
        _grow(dataset, first + len(rows))
        dataset[first : first + len(rows)] = rows
        self._h5.flush()

        self._set_progress(progress, events=first + len(rows))

    def mark_complete(self, chip_clock_s: float = math.nan) -> None:
        """Log a ``complete`` event and set the complete flag; every device must be stored."""
        progress = self.progress()
        if progress.devices_programmed != self.n_devices:
            raise RunFileError(
                f"{self.path}: cannot mark the run complete with {progress.devices_programmed} of "
                f"{self.n_devices} devices stored"
            )
        self.log_event(
            "complete",
            f"{progress.reads_done} reads, {progress.evaluations_done} evaluations",
            chip_clock_s,
        )
        self._set_progress(self.progress(), stage=Stage.COMPLETE, complete=True)

    def _check_writable(self) -> None:
        if self.mode != "a":
            raise RunFileError(f"{self.path} is open for reading; open it with mode='a' to write")
        if not self._h5.id.valid:
            raise RunFileError(f"{self.path} is closed")

    def set_paused(self, paused: bool) -> None:
        """Set or clear the pause flag; the caller logs why in the event log."""
        self._check_writable()
        self._set_progress(self.progress(), paused=paused)

    def set_failure_budget(self, fraction: float) -> None:
        """Store the fraction of all pairs that may fail before the run pauses."""
        self._check_writable()
        if not 0 < fraction <= 1:
            raise RunFileError(f"failure budget {fraction!r} must lie in (0, 1], a fraction of pairs")
        self._set_progress(self.progress(), failure_budget=fraction)

    def heartbeat(self) -> None:
        """Rewrite ``/progress`` unchanged but for its time, to show readers the writer is alive."""
        self._check_writable()
        self._set_progress(self.progress())

    def _start_session(self) -> None:
        """Count a new writing session and record this process as the writer."""
        progress = self.progress()
        self._set_progress(
            progress,
            sessions=progress.sessions + 1,
            writer_pid=os.getpid(),
            writer_host=socket.gethostname(),
        )

    def _unstored_mapping(self, first_pair: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the devices of pairs ``first_pair`` onwards: allocated, plus counted moves."""
        progress = self.progress()
        mapping = self._h5["mapping"]
        plus = mapping["allocated_plus"][first_pair:]
        minus = mapping["allocated_minus"][first_pair:]
        rows = mapping["remaps"][: progress.remaps]
        rows = rows[rows["pair"] >= first_pair]
        # Counted moves of unstored pairs come only from `remap_pairs`; the last move counts.
        plus[rows["pair"] - first_pair] = rows["new_plus"]
        minus[rows["pair"] - first_pair] = rows["new_minus"]
        return plus, minus

    def _restore_unstored_mapping(self) -> None:
        """Put pairs not stored yet on their allocated devices plus the counted moves.

        A batch that stopped after writing its moves to ``/mapping`` but before its commit
        leaves them there. They are undone here, and a commit of the staged batch writes
        them again.
        """
        first_pair = self.progress().devices_programmed // 2
        if first_pair >= self.n_pairs:
            return
        plus, minus = self._unstored_mapping(first_pair)
        mapping = self._h5["mapping"]
        current_plus = mapping["device_plus"][first_pair:]
        current_minus = mapping["device_minus"][first_pair:]
        changed = np.flatnonzero((current_plus != plus) | (current_minus != minus))
        if not changed.size:
            return
        log.warning(
            "%s: %d pairs not stored yet were moved by a batch that was never stored; "
            "putting them back on their allocated devices",
            self.path,
            changed.size,
        )
        mapping["device_plus"][first_pair + changed] = plus[changed]
        mapping["device_minus"][first_pair + changed] = minus[changed]
        self._h5.flush()

    def _set_progress(self, current: Progress, **changes: Any) -> None:
        values = {field.name: getattr(current, field.name) for field in dataclasses.fields(Progress)}
        unknown = set(changes) - set(values)
        if unknown:
            raise TypeError(f"unknown progress fields {sorted(unknown)}")
        values.update(changes)
        values["stage"] = int(values["stage"])
        values["complete"] = int(values["complete"])
        values["paused"] = int(values["paused"])
        values["staged_read"] = int(values["staged_read"])
        values["writer_host"] = _encode_truncated(str(values["writer_host"]), HOST_BYTES)
        values["updated_wall_time"] = time.time()
        record = np.zeros((), dtype=PROGRESS_DTYPE)
        for name, value in values.items():
            record[name] = value
        self._h5["progress"][()] = record
        self._h5.flush()

    # ------------------------------------------------------------------ reading

    def refresh(self) -> None:
        """Make a reader see what the writer has flushed since the last refresh."""
        if self._h5.swmr_mode and self.mode == "r":
            self._h5.visititems(
                lambda _, item: item.refresh() if isinstance(item, h5py.Dataset) else None
            )

    def _dataset(self, name: str) -> h5py.Dataset:
        dataset = self._h5[name]
        if self._h5.swmr_mode and self.mode == "r":
            dataset.refresh()
        return dataset

    def progress(self) -> Progress:
        record = self._dataset("progress")[()]
        return Progress(
            stage=Stage(int(record["stage"])),
            devices_programmed=int(record["devices_programmed"]),
            batches_done=int(record["batches_done"]),
            remaps=int(record["remaps"]),
            reads_done=int(record["reads_done"]),
            evaluations_done=int(record["evaluations_done"]),
            events=int(record["events"]),
            complete=bool(record["complete"]),
            inflight_start=int(record["inflight_start"]),
            inflight_stop=int(record["inflight_stop"]),
            inflight_clock_s=float(record["inflight_clock_s"]),
            staged_clock_s=float(record["staged_clock_s"]),
            staged_remaps=int(record["staged_remaps"]),
            staged_read_clock_s=float(record["staged_read_clock_s"]),
            staged_read=bool(record["staged_read"]),
            paused=bool(record["paused"]),
            failure_budget=float(record["failure_budget"]),
            sessions=int(record["sessions"]),
            writer_pid=int(record["writer_pid"]),
            writer_host=_decode(bytes(record["writer_host"])),
            updated_wall_time=float(record["updated_wall_time"]),
        )

    @property
    def is_complete(self) -> bool:
        return self.progress().complete

    @property
    def writer_open(self) -> bool:
        """True if a writer has the file open, or died without closing it (SWMR reading)."""
        return self.mode == "a" or bool(self._h5.swmr_mode)

    def config_toml(self) -> str:
        """Return the resolved configuration stored at creation, as TOML text."""
        value = self._h5["config/run_toml"][()]
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes: format, version, hwctl version, creation time, description."""
        return {key: _plain(value) for key, value in self._h5.attrs.items()}

    def identity(self) -> Identity:
        attrs = self._h5["config"].attrs
        return Identity(
            *(str(attrs[name]) for name in ("manufacturer", "model", "serial", "firmware"))
        )

    def geometry(self) -> Geometry:
        attrs = self._h5["config/geometry"].attrs
        return Geometry(int(attrs["arrays"]), int(attrs["rows"]), int(attrs["cols"]))

    def limits(self) -> Limits:
        attrs = self._h5["config/limits"].attrs
        values = {name: _plain(attrs[name]) for name in Limits.__dataclass_fields__}
        return Limits(**values)

    def model_info(self) -> ModelInfo:
        attrs = self._h5["model"].attrs
        return ModelInfo(
            checkpoint_path=str(attrs["checkpoint_path"]),
            checkpoint_sha256=str(attrs["checkpoint_sha256"]),
            architecture=str(attrs["architecture"]),
        )

    def layers(self) -> list[LayerRecord]:
        return layer_records(self._h5["model/layers"][()])

    def mapping(self) -> PairMapping:
        group = self._h5["mapping"]
        arrays = {name: group[name][()] for name in MAPPING_FIELDS}
        return PairMapping(**arrays, allocation=str(group.attrs["allocation"]))

    def status_codes(self) -> dict[str, int]:
        """Names of program-and-verify outcomes and their codes in ``/program/status``."""
        return dict(self._status_names)

    def failure_codes(self) -> dict[str, int]:
        """Names of per-device failure codes and their codes in ``/program/failure``."""
        return dict(self._failure_names)

    def allocated_mapping(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the (G+, G-) devices of every pair as allocated, before any move to spares."""
        group = self._h5["mapping"]
        return group["allocated_plus"][()], group["allocated_minus"][()]

    @property
    def clock_mode(self) -> str:
        """``"virtual"`` or ``"real"``: the clock of the backend at creation; empty if unknown."""
        return str(self._h5["config"].attrs.get("clock_mode", ""))

    def target_us(self) -> np.ndarray:
        return self._h5["program/target_us"][()]

    def program_results(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Return the programming results of slots ``start:stop``, cut at the stored devices."""
        done = self.progress().devices_programmed
        stop = done if stop is None else min(stop, done)
        start = min(start, stop)
        return {name: self._dataset(f"program/{name}")[start:stop] for name in PROGRAM_FIELDS}

    def planned_read_times_s(self) -> np.ndarray:
        """Return the read schedule stored at creation, in s after programming."""
        return np.asarray(self._h5["reads"].attrs["planned_time_s"], dtype=np.float64)

    def read_times(self) -> dict[str, np.ndarray]:
        """Return the scalars of every finished read: time_s, actual_time_s, chip_clock_s, ..."""
        count = self.progress().reads_done
        return {name: self._dataset(f"reads/{name}")[:count] for name in READ_FIELDS}

    def read_g_us(self, index: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Return conductances in µS of read ``index`` for device slots ``start:stop``."""
        count = self.progress().reads_done
        if not 0 <= index < count:
            raise IndexError(
                f"read {index} is not stored in {self.path}; it has {count} finished reads"
            )
        return self._dataset("reads/g_us")[index, start:stop]

    def evaluations(self) -> np.ndarray:
        """Return the finished evaluations as a structured array (see `EVALUATION_DTYPE`)."""
        count = self.progress().evaluations_done
        return self._dataset("evaluations")[:count]

    def float_accuracy(self) -> float | None:
        """Return the floating-point network's accuracy, or None if it is not stored yet."""
        record = self._dataset("float_accuracy")[()]
        return float(record["accuracy"]) if record["images"] > 0 else None

    def events(self) -> list[Event]:
        count = self.progress().events
        return [
            Event(
                float(row["wall_time"]),
                float(row["chip_clock_s"]),
                _decode(row["kind"]),
                _decode(row["message"]),
            )
            for row in self._dataset("events")[:count]
        ]

    def summary(self) -> dict[str, Any]:
        """Return a small overview for reports and status displays."""
        progress = self.progress()
        status = self.program_results()["status"]
        counts = {
            name: int(np.count_nonzero(status == code)) for name, code in self._status_names.items()
        }
        return {
            "path": str(self.path),
            "format_version": int(self._h5.attrs["format_version"]),
            "hwctl_version": str(self._h5.attrs["hwctl_version"]),
            "created": str(self._h5.attrs["created"]),
            "description": str(self._h5.attrs["description"]),
            "idn": str(self._h5["config"].attrs["idn"]),
            "architecture": str(self._h5["model"].attrs["architecture"]),
            "pairs": self.n_pairs,
            "devices": self.n_devices,
            "stage": progress.stage.name.lower(),
            "devices_programmed": progress.devices_programmed,
            "status_counts": counts,
            "reads_done": progress.reads_done,
            "reads_planned": len(self._h5["reads"].attrs["planned_time_s"]),
            "evaluations_done": progress.evaluations_done,
            "float_accuracy": self.float_accuracy(),
            "complete": progress.complete,
        }


# ---------------------------------------------------------------------- layout


def _check_setup(setup: _Setup) -> None:
    """Reject a layer table, mapping or target vector that does not describe one consistent run."""
    layers, mapping, geometry = setup.layers, setup.mapping, setup.geometry
    target_us = np.asarray(setup.target_us, dtype=np.float64)
    n_pairs = mapping.n_pairs
    for name in MAPPING_FIELDS:
        if np.shape(getattr(mapping, name)) != (n_pairs,):
            raise RunFileError(
                f"mapping array {name} has shape {np.shape(getattr(mapping, name))}, "
                f"expected ({n_pairs},)"
            )
    if n_pairs == 0 or not layers:
        raise RunFileError("a run needs at least one layer and one weight")
    if target_us.shape != (2 * n_pairs,):
        raise RunFileError(
            f"target_us has shape {target_us.shape}, expected ({2 * n_pairs},), "
            "two devices per pair"
        )

    # Layers take consecutive ranges of pairs, weights first, then biases.
    first = 0
    for index, layer in enumerate(layers):
        _encode(layer.name, LAYER_NAME_BYTES, "layer name")
        _encode(layer.kind, LAYER_KIND_BYTES, "layer kind")
        if len(layer.shape) > MAX_LAYER_DIMS:
            raise RunFileError(
                f"layer {layer.name!r} has {len(layer.shape)} dimensions; "
                f"at most {MAX_LAYER_DIMS} are stored"
            )
        if layer.first_pair != first or layer.pair_count != layer.weight_count + layer.bias_count:
            raise RunFileError(
                f"layer {index} ({layer.name!r}) has first_pair {layer.first_pair} and pair_count "
                f"{layer.pair_count}; expected first_pair {first} and pair_count "
                f"{layer.weight_count + layer.bias_count} (weights plus biases)"
            )
        if layer.weight_count != math.prod(layer.shape):
            raise RunFileError(
                f"layer {layer.name!r} has weight_count {layer.weight_count}, but its shape "
                f"{layer.shape} holds {math.prod(layer.shape)} weights (biases are counted apart)"
            )
        if not (math.isfinite(layer.w_max) and layer.w_max > 0):
            raise RunFileError(
                f"layer {layer.name!r} has w_max {layer.w_max}; it must be positive and finite"
            )
        first += layer.pair_count
    if first != n_pairs:
        raise RunFileError(f"the layers hold {first} pairs, but the mapping has {n_pairs}")

    pair_counts = np.array([layer.pair_count for layer in layers], dtype=np.int64)
    first_pairs = np.array([layer.first_pair for layer in layers], dtype=np.int64)
    expected_layer = np.repeat(np.arange(len(layers)), pair_counts)
    if not np.array_equal(mapping.layer, expected_layer):
        wrong = int(np.flatnonzero(mapping.layer != expected_layer)[0])
        raise RunFileError(
            f"mapping.layer[{wrong}] is {mapping.layer[wrong]}, but the layer table puts pair "
            f"{wrong} in layer {expected_layer[wrong]}"
        )
    weight_index = np.asarray(mapping.weight_index, dtype=np.int64)
    if weight_index.min() < 0 or np.any(weight_index >= pair_counts[expected_layer]):
        raise RunFileError(
            "mapping.weight_index has entries outside their layer's weights and biases"
        )
    slots = np.bincount(first_pairs[expected_layer] + weight_index, minlength=n_pairs)
    if np.any(slots != 1):
        raise RunFileError("mapping.weight_index names a weight of a layer more than once")

    devices = np.concatenate([mapping.device_plus, mapping.device_minus]).astype(np.int64)
    if devices.min() < 0 or devices.max() >= geometry.devices:
        raise RunFileError(
            f"mapping names devices outside 0 to {geometry.devices - 1}, the devices of the chip"
        )
    ordered = np.sort(devices)
    if np.any(ordered[1:] == ordered[:-1]):
        raise RunFileError(
            "mapping uses a device for more than one weight or for both sides of a pair"
        )

    if setup.clock_mode not in ("", "virtual", "real"):
        raise RunFileError(f"clock_mode {setup.clock_mode!r} must be 'virtual', 'real' or empty")
    budget = setup.failure_budget
    if not (math.isnan(budget) or 0 < budget <= 1):
        raise RunFileError(f"failure budget {budget!r} must lie in (0, 1], a fraction of pairs")
    for names, what in ((setup.status_codes, "status"), (setup.failure_codes or {}, "failure")):
        if any(not -128 <= int(code) < 128 for code in names.values()):
            raise RunFileError(f"{what} codes {dict(names)} must fit in int8")

    if not np.all(np.isfinite(mapping.target_weight)):
        raise RunFileError("mapping.target_weight has values that are not finite")
    if (
        not np.all(np.isfinite(target_us))
        or target_us.min() < 0
        or target_us.max() > setup.limits.g_max_us
    ):
        raise RunFileError(
            f"target_us must lie in 0 to {setup.limits.g_max_us} µS (the controller's g_max_us); "
            f"it spans {np.nanmin(target_us)} to {np.nanmax(target_us)} µS"
        )


def _write_layout(h5: h5py.File, setup: _Setup) -> None:
    """Create every group, dataset and attribute, because SWMR mode allows no new ones later."""
    identity, geometry, limits = setup.identity, setup.geometry, setup.limits
    mapping, status_codes = setup.mapping, setup.status_codes
    target_us = np.asarray(setup.target_us, dtype=np.float64)
    n_pairs = mapping.n_pairs
    n_devices = 2 * n_pairs
    device_chunk = min(DEVICE_CHUNK, n_devices)
    pair_chunk = min(DEVICE_CHUNK, n_pairs)

    h5.attrs["hwctl_format"] = FORMAT_NAME
    h5.attrs["format_version"] = FORMAT_VERSION
    h5.attrs["hwctl_version"] = hwctl.__version__
    h5.attrs["created"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    h5.attrs["description"] = setup.description

    config = h5.create_group("config")
    config.create_dataset("run_toml", data=setup.config_toml, dtype=h5py.string_dtype("utf-8"))
    config.attrs["idn"] = identity.as_idn()
    for name in ("manufacturer", "model", "serial", "firmware"):
        config.attrs[name] = getattr(identity, name)
    config.attrs["backend_kind"] = setup.backend_kind
    config.attrs["clock_mode"] = setup.clock_mode
    geometry_group = config.create_group("geometry")
    geometry_group.attrs["arrays"] = geometry.arrays
    geometry_group.attrs["rows"] = geometry.rows
    geometry_group.attrs["cols"] = geometry.cols
    geometry_group.attrs["devices"] = geometry.devices
    limits_group = config.create_group("limits")
    for name in Limits.__dataclass_fields__:
        limits_group.attrs[name] = getattr(limits, name)

    model = h5.create_group("model")
    model.attrs["checkpoint_path"] = setup.model_info.checkpoint_path
    model.attrs["checkpoint_sha256"] = setup.model_info.checkpoint_sha256
    model.attrs["architecture"] = setup.model_info.architecture
    table = np.zeros(len(setup.layers), dtype=LAYER_DTYPE)
    for index, layer in enumerate(setup.layers):
        table[index]["name"] = _encode(layer.name, LAYER_NAME_BYTES, "layer name")
        table[index]["kind"] = _encode(layer.kind, LAYER_KIND_BYTES, "layer kind")
        table[index]["ndim"] = len(layer.shape)
        table[index]["shape"][: len(layer.shape)] = layer.shape
        for field in ("weight_count", "bias_count", "w_max", "first_pair", "pair_count"):
            table[index][field] = getattr(layer, field)
    model.create_dataset("layers", data=table)

    mapping_group = h5.create_group("mapping")
    mapping_group.attrs["allocation"] = mapping.allocation
    for name, dtype in MAPPING_FIELDS.items():
        mapping_group.create_dataset(
            name,
            data=np.asarray(getattr(mapping, name), dtype=dtype),
            chunks=(pair_chunk,),
            **COMPRESSION,
        )

    for side in ("plus", "minus"):
        mapping_group.create_dataset(
            f"allocated_{side}",
            data=np.asarray(getattr(mapping, f"device_{side}"), dtype="i8"),
            chunks=(pair_chunk,),
            **COMPRESSION,
        )
    mapping_group.create_dataset(
        "remaps",
        shape=(0,),
        maxshape=(None,),
        dtype=REMAP_DTYPE,
        chunks=(TABLE_CHUNK,),
        **TABLE_FILTERS,
    )

    program = h5.create_group("program")
    program.attrs["device_order"] = "pair p is stored in slots 2p (G+) and 2p + 1 (G-)"
    program.create_dataset("target_us", data=target_us, chunks=(device_chunk,), **COMPRESSION)
    for name, (dtype, fill) in PROGRAM_FIELDS.items():
        program.create_dataset(
            name,
            shape=(n_devices,),
            dtype=dtype,
            chunks=(device_chunk,),
            fillvalue=fill,
            **COMPRESSION,
        )
    program["status"].attrs["status_codes"] = json.dumps(
        {str(k): int(v) for k, v in status_codes.items()}
    )
    program["failure"].attrs["failure_codes"] = json.dumps(
        {str(k): int(v) for k, v in (setup.failure_codes or {}).items()}
    )

    reads = h5.create_group("reads")
    reads.attrs["planned_time_s"] = np.asarray(setup.planned_read_times_s, dtype=np.float64)
    for name, dtype in READ_FIELDS.items():
        reads.create_dataset(
            name,
            shape=(0,),
            maxshape=(None,),
            dtype=dtype,
            chunks=(TABLE_CHUNK,),
            fillvalue=math.nan,
            **TABLE_FILTERS,
        )
    reads.create_dataset(
        "g_us",
        shape=(0, n_devices),
        maxshape=(None, n_devices),
        dtype="f8",
        chunks=(1, device_chunk),
        fillvalue=math.nan,
        **COMPRESSION,
    )

    for name, dtype in (("evaluations", EVALUATION_DTYPE), ("events", EVENT_DTYPE)):
        h5.create_dataset(
            name,
            shape=(0,),
            maxshape=(None,),
            dtype=dtype,
            chunks=(TABLE_CHUNK,),
            **TABLE_FILTERS,
        )

    float_accuracy = np.zeros((), dtype=FLOAT_ACCURACY_DTYPE)
    float_accuracy["accuracy"] = math.nan
    h5.create_dataset("float_accuracy", data=float_accuracy)

    progress = np.zeros((), dtype=PROGRESS_DTYPE)
    progress["stage"] = Stage.CREATED
    progress["inflight_start"] = NOT_WRITTEN
    progress["inflight_stop"] = NOT_WRITTEN
    progress["inflight_clock_s"] = math.nan
    progress["staged_clock_s"] = math.nan
    progress["staged_remaps"] = NOT_WRITTEN
    progress["staged_read_clock_s"] = math.nan
    progress["failure_budget"] = setup.failure_budget
    progress["updated_wall_time"] = time.time()
    h5.create_dataset("progress", data=progress)
    h5.flush()


def _check_codes(
    path: Path, name: str, values: np.ndarray, known: Mapping[str, int], allowed: int | None = None
) -> None:
    """Raise if ``values`` contains a code that is not among ``known`` (or ``allowed``)."""
    codes = set(known.values()) | ({allowed} if allowed is not None else set())
    unknown = np.setdiff1d(np.unique(values), np.array(sorted(codes)))
    if unknown.size:
        raise RunFileError(
            f"{path}: {name} codes {unknown.tolist()} are not among the codes given at "
            f"creation ({dict(known)})"
        )


def _grow(dataset: h5py.Dataset, length: int) -> None:
    """Extend a growing dataset to ``length`` rows; rows past a cursor are simply overwritten."""
    if dataset.shape[0] < length:
        dataset.resize(length, axis=0)


def _plain(value: Any) -> Any:
    """Convert a numpy scalar or bytes attribute to the matching Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ---------------------------------------------------------------------- checks and recovery


def _check_is_hdf5(path: Path) -> None:
    if not path.exists():
        raise RunFileError(f"run file {path} not found; check the path")
    if not path.is_file():
        raise RunFileError(f"{path} is not a file; expected an HDF5 run file written by hwctl")
    if not h5py.is_hdf5(path):
        raise RunFileError(
            f"{path} is not an HDF5 file; expected a run file written by hwctl "
            f"(HDF5 with hwctl_format = {FORMAT_NAME!r}); check the path"
        )


def _damaged(path: Path, error: BaseException) -> RunFileError:
    return RunFileError(
        f"{path} is an HDF5 file but cannot be read ({error}); it may be truncated or damaged. "
        "If a run was killed while creating it, start the run again with a new output path"
    )


def _open_for_writing(path: Path) -> h5py.File:
    """Open with HDF5 for writing, waiting up to about 5 s for readers that hold it briefly.

    ``hwctl status`` and other readers open the file for a moment at a time, and HDF5 cannot
    take its write lock while one of them has it.
    """
    for _ in range(50):
        try:
            return h5py.File(path, "a", libver="latest")
        except OSError as error:
            if "unable to lock file" not in str(error):
                raise
            time.sleep(0.1)
    raise RunFileError(
        f"cannot open {path} for writing: another process keeps it open (a reader such as "
        "hwctl status, or a run); stop that process and retry"
    )


def _open_for_reading(path: Path) -> h5py.File:
    """Open for reading: plainly if no writer has the file, as a SWMR reader if one has or had.

    The plain open comes first because it checks the file size against the superblock, so a
    truncated file fails at once.
    """
    try:
        return h5py.File(path, "r", libver="latest")
    except OSError as error:
        if "unable to lock file" in str(error):
            raise RunFileError(
                f"{path} is being created or resumed by another process; retry in a moment"
            ) from None
        if "already open for write" not in str(error):
            raise _damaged(path, error) from None
    # NOTE: a SWMR reader retries metadata whose checksum fails, because the writer may be
    # midway through an update. On a file that is also truncated, reading went on retrying
    # for more than ten minutes in a trial (h5py 3.16, HDF5 2.0.0).
    try:
        return h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as error:
        raise _damaged(path, error) from None


def _check_format(h5: h5py.File, path: Path) -> None:
    """Check the format name, the version and that every dataset of this version is there."""
    name = h5.attrs.get("hwctl_format")
    if isinstance(name, bytes):
        name = name.decode("utf-8", errors="replace")
    if name != FORMAT_NAME:
        raise RunFileError(
            f"{path} is an HDF5 file but not a hwctl run file: its hwctl_format attribute is "
            f"{name!r}, expected {FORMAT_NAME!r}; check the path"
        )
    version = h5.attrs.get("format_version")
    if version != FORMAT_VERSION:
        writer = h5.attrs.get("hwctl_version", "an unknown version")
        raise RunFileError(
            f"{path} has run file format version {version}, and this hwctl ({hwctl.__version__}) "
            f"reads version {FORMAT_VERSION}; open it with the hwctl version that wrote it "
            f"({writer})"
        )
    missing = [name for name in REQUIRED_DATASETS if not isinstance(h5.get(name), h5py.Dataset)]
    if missing:
        raise RunFileError(
            f"{path} is a damaged hwctl run file: datasets {', '.join(missing)} are missing; "
            "it cannot be read or resumed, so start the run again with a new output path"
        )


def _recover_crashed(path: Path) -> Path:
    """Copy a file whose writer died into a fresh file under the same name; return the original's new path.

    HDF5 keeps a file that was open for SWMR writing marked as open, and refuses to open it
    for writing again. A SWMR reader can still open it and read everything that was flushed,
    so the finished contents are copied object by object through the public h5py API.
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.stem}.crashed-{stamp}{path.suffix}")
    for number in range(1, 1000):
        if not backup.exists():
            break
        backup = path.with_name(f"{path.stem}.crashed-{stamp}-{number}{path.suffix}")
    scratch = path.with_name(f"{path.name}.recovering")
    log.warning(
        "run file %s was not closed by its writer; recovering it (the original is kept as %s)",
        path,
        backup,
    )

    try:
        source = h5py.File(path, "r", libver="latest", swmr=True)
    except OSError as error:
        raise _damaged(path, error) from None
    try:
        _check_format(source, path)
        with h5py.File(scratch, "w", libver="latest") as target:
            for key, value in source.attrs.items():
                target.attrs[key] = value
            for name in source:
                source.copy(source[name], target, name=name)
            target.flush()
        # Make the copy durable before the rename makes it the run file.
        descriptor = os.open(scratch, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    finally:
        source.close()

    os.replace(path, backup)
    os.replace(scratch, path)
    return backup


def iter_device_batches(
    n_devices: int, batch_size: int, start: int = 0
) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` slot ranges of at most ``batch_size`` devices, from ``start`` on."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for first in range(start, n_devices, batch_size):
        yield first, min(first + batch_size, n_devices)
