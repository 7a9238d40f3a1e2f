"""The HDF5 run file: layout, writing, reading while written (SWMR), recovery and error cases.

Every test writes real HDF5 files through h5py in tmp_path. Readers that must run while a
writer has the file open are separate processes, as they would be for a user.
"""

import json
import math
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from hwctl.backend import Geometry, Identity, Limits
from hwctl.runfile import (
    FORMAT_VERSION,
    LayerRecord,
    ModelInfo,
    PairMapping,
    RunFile,
    RunFileError,
    Stage,
    file_sha256,
    iter_device_batches,
)

G_MAX_US = 25.0
STATUS_CODES = {"CONVERGED": 0, "GAVE_UP": 1, "STUCK": 2}
IDENTITY = Identity("hwctl", "PCM emulator", "SN-7", "1.0")
LIMITS = Limits(
    set_amplitude_min_v=0.5,
    set_amplitude_max_v=1.5,
    reset_amplitude_max_v=4.0,
    width_max_ns=1000.0,
    pulses_per_device_max=100,
    total_time_max_s=86400.0,
    g_max_us=G_MAX_US,
    read_voltage_v=0.2,
)
CONFIG_TOML = '[run]\nout = "run.h5"\nseed = 3\n'
SUBPROCESS_TIMEOUT_S = 60


SMALL_GEOMETRY = Geometry(1, 8, 32)


def build_layout(shapes=((4, 2, 3, 3), (3, 8)), biases=(0, 3), geometry=SMALL_GEOMETRY, seed=0):
    """Build a layer table, a shuffled mapping and targets as the orchestrator would."""
    rng = np.random.default_rng(seed)

    layers, layer_ids, weight_ids, weights = [], [], [], []
    first = 0
    for index, (shape, bias_count) in enumerate(zip(shapes, biases, strict=True)):
        count = math.prod(shape) + bias_count
        values = rng.normal(0.0, 0.1, count).astype(np.float32)
        kind = "conv" if len(shape) == 4 else "linear"
        w_max = float(np.abs(values).max())
        layers.append(
            LayerRecord(
                f"layer{index}", kind, shape, math.prod(shape), bias_count, w_max, first, count
            )
        )
        layer_ids.append(np.full(count, index, dtype=np.int16))
        weight_ids.append(rng.permutation(count))
        weights.append(values)
        first += count

    n_pairs = first
    devices = rng.permutation(geometry.devices)[: 2 * n_pairs]
    mapping = PairMapping(
        layer=np.concatenate(layer_ids),
        weight_index=np.concatenate(weight_ids).astype(np.int64),
        device_plus=devices[:n_pairs].astype(np.int64),
        device_minus=devices[n_pairs:].astype(np.int64),
        target_weight=np.concatenate(weights),
        allocation="test: shuffled devices",
    )

    w_max = np.array([layer.w_max for layer in layers])[mapping.layer]
    g_us = np.abs(mapping.target_weight) / w_max * G_MAX_US
    target = np.zeros(2 * n_pairs)
    target[0::2] = np.where(mapping.target_weight > 0, g_us, 0.0)
    target[1::2] = np.where(mapping.target_weight < 0, g_us, 0.0)
    return layers, mapping, target, geometry


def create_run(path, layout=None, overwrite=False):
    layers, mapping, target, geometry = layout if layout is not None else build_layout()
    return RunFile.create(
        path,
        config_toml=CONFIG_TOML,
        identity=IDENTITY,
        geometry=geometry,
        limits=LIMITS,
        model_info=ModelInfo("/models/net.pt", "0" * 64, "test-net"),
        layers=layers,
        mapping=mapping,
        target_us=target,
        status_codes=STATUS_CODES,
        planned_read_times_s=[25.0, 3600.0],
        description="unit test",
        backend_kind="emulator",
        overwrite=overwrite,
    )


def program_values(target_us, start, stop):
    """Results the tests store for devices start:stop: a fixed function of the target."""
    slots = np.arange(start, stop)
    return dict(
        final_g_us=target_us[start:stop] + 0.125,
        pulses=(slots % 7).astype(np.int32) + 1,
        iterations=(slots % 5).astype(np.int32) + 1,
        status=(slots % 3).astype(np.int8),
        t_programmed_s=slots * 1e-3,
    )


def program_all(run, target_us, batch_size):
    for start, stop in iter_device_batches(len(target_us), batch_size):
        run.write_program_batch(start, **program_values(target_us, start, stop))


# ---------------------------------------------------------------------- layout and round trip


def test_round_trip_of_every_group(tmp_path):
    layers, mapping, target, geometry = layout = build_layout()
    path = tmp_path / "run.h5"
    with create_run(path, layout) as run:
        program_all(run, target, batch_size=50)
        index = run.append_read(
            time_s=25.0,
            actual_time_s=25.5,
            chip_clock_s=125.0,
            temperature_c=24.5,
            g_us=target * 0.9,
        )
        run.append_evaluation(
            read_index=index, time_s=25.0, compensation="gdc", correct=930, images=1000
        )
        run.log_event("start", "first", chip_clock_s=1.0, wall_time=1000.0)
        run.mark_complete(chip_clock_s=200.0)

    with RunFile.open(path) as run:
        assert run.config_toml() == CONFIG_TOML
        assert run.identity() == IDENTITY
        assert run.geometry() == geometry
        assert run.limits() == LIMITS
        assert run.model_info() == ModelInfo("/models/net.pt", "0" * 64, "test-net")
        assert run.layers() == layers
        stored = run.mapping()
        for name in ("layer", "weight_index", "device_plus", "device_minus", "target_weight"):
            assert np.array_equal(getattr(stored, name), getattr(mapping, name)), name
        assert stored.allocation == mapping.allocation
        assert np.array_equal(run.target_us(), target)
        results = run.program_results()
        expected = program_values(target, 0, len(target))
        for name, values in expected.items():
            assert np.array_equal(results[name], values), name
        assert np.array_equal(run.read_g_us(0), target * 0.9)
        times = run.read_times()
        assert times["time_s"].tolist() == [25.0]
        assert times["actual_time_s"].tolist() == [25.5]
        assert times["chip_clock_s"].tolist() == [125.0]
        assert times["temperature_c"].tolist() == [24.5]
        evaluation = run.evaluations()[0]
        assert evaluation["compensation"] == b"gdc"
        assert evaluation["accuracy"] == 0.93
        events = run.events()
        assert [event.kind for event in events] == ["start", "complete"]
        assert events[0].wall_time == 1000.0
        assert events[1].chip_clock_s == 200.0
        assert run.is_complete
        assert run.status_codes() == STATUS_CODES


def test_root_attributes_state_format(tmp_path):
    path = tmp_path / "run.h5"
    create_run(path).close()
    with h5py.File(path, "r") as h5:
        assert h5.attrs["hwctl_format"] == "hwctl-run"
        assert h5.attrs["format_version"] == FORMAT_VERSION
        assert h5.attrs["description"] == "unit test"


def test_device_order_interleaves_pairs():
    _, mapping, _, _ = build_layout()
    devices = mapping.device_ids()
    assert np.array_equal(devices[0::2], mapping.device_plus)
    assert np.array_equal(devices[1::2], mapping.device_minus)


def test_large_tables_chunked_and_compressed(tmp_path):
    path = tmp_path / "run.h5"
    create_run(path).close()
    with h5py.File(path, "r") as h5:
        for name in ("mapping/device_plus", "program/final_g_us", "reads/g_us"):
            assert h5[name].chunks is not None, name
            assert h5[name].compression == "gzip", name
        assert h5["reads/g_us"].maxshape == (None, h5["program/target_us"].shape[0])


def test_unwritten_results_are_marked(tmp_path):
    layers, mapping, target, geometry = layout = build_layout()
    path = tmp_path / "run.h5"
    with create_run(path, layout) as run:
        run.write_program_batch(0, **program_values(target, 0, 10))
    with h5py.File(path, "r") as h5:
        assert np.all(np.isnan(h5["program/final_g_us"][10:]))
        assert np.all(h5["program/status"][10:] == -1)
    with RunFile.open(path) as run:
        assert len(run.program_results()["final_g_us"]) == 10
        assert run.progress().stage == Stage.PROGRAMMING


def test_progress_follows_stages(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        assert run.progress().stage == Stage.CREATED
        run.write_program_batch(0, **program_values(target, 0, 20))
        assert run.progress().stage == Stage.PROGRAMMING
        run.write_program_batch(20, **program_values(target, 20, len(target)))
        progress = run.progress()
        assert progress.stage == Stage.PROGRAMMED
        assert progress.batches_done == 2
        assert progress.devices_programmed == len(target)
        run.append_read(time_s=25, actual_time_s=25, chip_clock_s=30, temperature_c=25, g_us=target)
        assert run.progress().stage == Stage.MEASURING
        assert not run.is_complete
        run.mark_complete()
        assert run.progress().stage == Stage.COMPLETE
        assert run.is_complete


def test_summary_counts_statuses(tmp_path):
    _, _, target, _ = layout = build_layout()
    path = tmp_path / "run.h5"
    with create_run(path, layout) as run:
        program_all(run, target, batch_size=64)
    with RunFile.open(path) as run:
        summary = run.summary()
    status = program_values(target, 0, len(target))["status"]
    assert summary["status_counts"] == {
        name: int(np.sum(status == code)) for name, code in STATUS_CODES.items()
    }
    assert summary["devices"] == len(target)
    assert summary["reads_planned"] == 2
    assert summary["complete"] is False
    assert summary["idn"] == IDENTITY.as_idn()


def test_long_event_message_cut_in_file(tmp_path):
    path = tmp_path / "run.h5"
    with create_run(path) as run:
        run.log_event("fault", "é" * 400)
    with RunFile.open(path) as run:
        message = run.events()[0].message
    assert message.endswith("...")
    assert len(message.encode("utf-8")) <= 512
    assert message.startswith("é" * 200)


def test_file_sha256_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_batches_cover_devices_once():
    batches = list(iter_device_batches(10, 4, start=2))
    assert batches == [(2, 6), (6, 10)]


# ---------------------------------------------------------------------- writing rules


def test_batch_gap_rejected(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        run.write_program_batch(0, **program_values(target, 0, 10))
        with pytest.raises(RunFileError, match="next device to store is 10"):
            run.write_program_batch(20, **program_values(target, 20, 30))
        with pytest.raises(RunFileError, match="next device to store is 10"):
            run.write_program_batch(0, **program_values(target, 0, 10))


def test_batch_past_end_rejected(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        values = program_values(np.concatenate([target, target]), 0, len(target) + 1)
        with pytest.raises(RunFileError, match="does not fit"):
            run.write_program_batch(0, **values)


def test_batch_arrays_of_different_lengths_rejected(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        values = program_values(target, 0, 10)
        values["pulses"] = values["pulses"][:9]
        with pytest.raises(RunFileError, match="pulses has shape"):
            run.write_program_batch(0, **values)


def test_unknown_status_code_rejected(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        values = program_values(target, 0, 10)
        values["status"][3] = 9
        with pytest.raises(RunFileError, match=r"status codes \[9\]"):
            run.write_program_batch(0, **values)


def test_read_before_programming_rejected(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        with pytest.raises(RunFileError, match="before programming is finished"):
            run.append_read(
                time_s=25, actual_time_s=25, chip_clock_s=0, temperature_c=25, g_us=target
            )


def test_read_of_wrong_length_rejected(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        program_all(run, target, 1000)
        with pytest.raises(RunFileError, match="read has shape"):
            run.append_read(
                time_s=25, actual_time_s=25, chip_clock_s=0, temperature_c=25, g_us=target[:-1]
            )


def test_evaluation_rules(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        program_all(run, target, 1000)
        with pytest.raises(RunFileError, match="refers to read 0"):
            run.append_evaluation(read_index=0, time_s=25, compensation="none", correct=1, images=2)
        run.append_read(time_s=25, actual_time_s=25, chip_clock_s=0, temperature_c=25, g_us=target)
        run.append_evaluation(read_index=0, time_s=25, compensation="none", correct=1, images=2)
        with pytest.raises(RunFileError, match="already has an evaluation"):
            run.append_evaluation(read_index=0, time_s=25, compensation="none", correct=1, images=2)
        with pytest.raises(RunFileError, match="correct"):
            run.append_evaluation(read_index=0, time_s=25, compensation="bn", correct=3, images=2)
        with pytest.raises(RunFileError, match="at most 8 fit"):
            run.append_evaluation(
                read_index=0, time_s=25, compensation="too-long-name", correct=1, images=2
            )


@pytest.mark.parametrize("kind", ["Start", "", "a kind", "x" * 17])
def test_bad_event_kind_rejected(tmp_path, kind):
    with create_run(tmp_path / "run.h5") as run:
        with pytest.raises(RunFileError, match="invalid event kind"):
            run.log_event(kind, "message")


def test_incomplete_run_cannot_be_marked_complete(tmp_path):
    with create_run(tmp_path / "run.h5") as run:
        with pytest.raises(RunFileError, match="cannot mark the run complete"):
            run.mark_complete()
        assert not run.is_complete


def test_reader_cannot_write(tmp_path):
    path = tmp_path / "run.h5"
    create_run(path).close()
    with RunFile.open(path) as run:
        with pytest.raises(RunFileError, match="open for reading"):
            run.log_event("note", "x")


def test_read_after_completion_kept(tmp_path):
    _, _, target, _ = layout = build_layout()
    with create_run(tmp_path / "run.h5", layout) as run:
        program_all(run, target, 1000)
        run.append_read(time_s=25, actual_time_s=25, chip_clock_s=0, temperature_c=25, g_us=target)
        run.mark_complete()
        run.append_read(time_s=60, actual_time_s=60, chip_clock_s=0, temperature_c=25, g_us=target)
        progress = run.progress()
    assert progress.reads_done == 2
    assert progress.complete
    assert progress.stage == Stage.COMPLETE


def test_float_accuracy_stored(tmp_path):
    path = tmp_path / "run.h5"
    with create_run(path) as run:
        assert run.float_accuracy() is None
        run.set_float_accuracy(correct=9387, images=10000)
        with pytest.raises(RunFileError, match="float accuracy has 5 correct of 4 images"):
            run.set_float_accuracy(correct=5, images=4)
    with RunFile.open(path) as run:
        assert run.float_accuracy() == 0.9387
        assert run.summary()["float_accuracy"] == 0.9387


# ---------------------------------------------------------------------- creation checks


def test_existing_file_kept_without_overwrite(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"precious data")
    with pytest.raises(RunFileError, match="already exists"):
        create_run(path)
    assert path.read_bytes() == b"precious data"


def test_overwrite_replaces_file(tmp_path):
    path = tmp_path / "run.h5"
    path.write_bytes(b"old")
    create_run(path, overwrite=True).close()
    with RunFile.open(path) as run:
        assert run.progress().stage == Stage.CREATED


def test_shared_device_rejected(tmp_path):
    layers, mapping, target, geometry = build_layout()
    plus = mapping.device_plus.copy()
    plus[5] = mapping.device_minus[7]
    bad = PairMapping(
        mapping.layer, mapping.weight_index, plus, mapping.device_minus, mapping.target_weight, "x"
    )
    with pytest.raises(RunFileError, match="more than one weight"):
        create_run(tmp_path / "run.h5", (layers, bad, target, geometry))
    assert not (tmp_path / "run.h5").exists()


def test_device_outside_chip_rejected(tmp_path):
    layers, mapping, target, geometry = build_layout()
    plus = mapping.device_plus.copy()
    plus[0] = geometry.devices
    bad = PairMapping(
        mapping.layer, mapping.weight_index, plus, mapping.device_minus, mapping.target_weight, "x"
    )
    with pytest.raises(RunFileError, match="outside 0 to 255"):
        create_run(tmp_path / "run.h5", (layers, bad, target, geometry))


def test_repeated_weight_index_rejected(tmp_path):
    layers, mapping, target, geometry = build_layout()
    index = mapping.weight_index.copy()
    index[1] = index[0]
    bad = PairMapping(
        mapping.layer, index, mapping.device_plus, mapping.device_minus, mapping.target_weight, "x"
    )
    with pytest.raises(RunFileError, match="more than once"):
        create_run(tmp_path / "run.h5", (layers, bad, target, geometry))


def test_layer_table_must_match_mapping(tmp_path):
    layers, mapping, target, geometry = build_layout()
    shifted = [
        layers[0],
        LayerRecord(**{**layers[1].__dict__, "first_pair": layers[1].first_pair + 1}),
    ]
    with pytest.raises(RunFileError, match="expected first_pair 72"):
        create_run(tmp_path / "run.h5", (shifted, mapping, target, geometry))


def test_weight_count_must_match_shape(tmp_path):
    layers, mapping, target, geometry = build_layout()
    wrong = [LayerRecord(**{**layers[0].__dict__, "shape": (4, 2, 3, 2)}), layers[1]]
    with pytest.raises(RunFileError, match="biases are counted apart"):
        create_run(tmp_path / "run.h5", (wrong, mapping, target, geometry))


def test_target_above_g_max_rejected(tmp_path):
    layers, mapping, target, geometry = build_layout()
    high = target.copy()
    high[3] = G_MAX_US + 0.5
    with pytest.raises(RunFileError, match="target_us must lie in 0 to 25.0"):
        create_run(tmp_path / "run.h5", (layers, mapping, high, geometry))


def test_target_of_wrong_length_rejected(tmp_path):
    layers, mapping, target, geometry = build_layout()
    with pytest.raises(RunFileError, match="two devices per pair"):
        create_run(tmp_path / "run.h5", (layers, mapping, target[:-2], geometry))


def test_long_layer_name_rejected_before_writing(tmp_path):
    layers, mapping, target, geometry = build_layout()
    renamed = [LayerRecord(**{**layers[0].__dict__, "name": "n" * 200}), layers[1]]
    with pytest.raises(RunFileError, match="at most 128 fit"):
        create_run(tmp_path / "run.h5", (renamed, mapping, target, geometry))
    assert not (tmp_path / "run.h5").exists()


# ---------------------------------------------------------------------- opening errors


def test_missing_file_named(tmp_path):
    with pytest.raises(RunFileError, match="not found"):
        RunFile.open(tmp_path / "absent.h5")


def test_text_file_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not a run\n")
    with pytest.raises(RunFileError, match="is not an HDF5 file"):
        RunFile.open(path)


def test_other_hdf5_file_rejected(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5["x"] = [1, 2, 3]
    with pytest.raises(RunFileError, match="not a hwctl run file"):
        RunFile.open(path)


def test_other_format_version_rejected(tmp_path):
    path = tmp_path / "run.h5"
    create_run(path).close()
    with h5py.File(path, "a") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(RunFileError, match=f"format version {FORMAT_VERSION + 1}"):
        RunFile.open(path)
    with pytest.raises(RunFileError, match="open it with the hwctl version that wrote it"):
        RunFile.open(path, "a")


def test_missing_dataset_reported_as_damaged(tmp_path):
    path = tmp_path / "run.h5"
    create_run(path).close()
    with h5py.File(path, "a") as h5:
        del h5["events"]
    with pytest.raises(RunFileError, match="damaged hwctl run file: datasets events are missing"):
        RunFile.open(path)


def test_truncated_file_reported_as_damaged(tmp_path):
    _, _, target, _ = layout = build_layout()
    path = tmp_path / "run.h5"
    with create_run(path, layout) as run:
        program_all(run, target, 1000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(RunFileError, match="truncated or damaged"):
        RunFile.open(path)


def test_invalid_mode_rejected(tmp_path):
    path = tmp_path / "run.h5"
    create_run(path).close()
    with pytest.raises(ValueError, match="invalid mode 'w'"):
        RunFile.open(path, "w")


def test_second_writer_rejected(tmp_path):
    path = tmp_path / "run.h5"
    with create_run(path):
        with pytest.raises(RunFileError, match="another process has it open"):
            RunFile.open(path, "a")


def test_reopen_after_clean_close(tmp_path):
    _, _, target, _ = layout = build_layout()
    path = tmp_path / "run.h5"
    with create_run(path, layout) as run:
        run.write_program_batch(0, **program_values(target, 0, 30))
    with RunFile.open(path, "a") as run:
        assert run.progress().devices_programmed == 30
        run.log_event("resume", "after a clean stop")
        run.write_program_batch(30, **program_values(target, 30, len(target)))
    with RunFile.open(path) as run:
        assert np.array_equal(
            run.program_results()["final_g_us"],
            program_values(target, 0, len(target))["final_g_us"],
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


# ---------------------------------------------------------------------- other processes

# A reader in its own process: on each line "check" it refreshes the file and prints what it
# finds, checking every stored value against the function the writer used.
READER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from hwctl.runfile import RunFile

    run = RunFile.open(sys.argv[1])
    target = run.target_us()
    for line in sys.stdin:
        run.refresh()
        progress = run.progress()
        done = progress.devices_programmed
        results = run.program_results()
        slots = np.arange(done)
        values_ok = bool(
            len(results["final_g_us"]) == done
            and np.array_equal(results["final_g_us"], target[:done] + 0.125)
            and np.array_equal(results["pulses"], slots % 7 + 1)
        )
        reads_ok = all(
            np.array_equal(run.read_g_us(index), target * (0.9 - 0.1 * index))
            for index in range(progress.reads_done)
        )
        print(json.dumps({
            "devices_programmed": done,
            "reads_done": progress.reads_done,
            "complete": progress.complete,
            "values_ok": values_ok,
            "reads_ok": reads_ok,
            "events": [event.kind for event in run.events()],
        }), flush=True)
    run.close()
    """
)


def ask_reader(process):
    process.stdin.write("check\n")
    process.stdin.flush()
    ready, _, _ = select.select([process.stdout], [], [], SUBPROCESS_TIMEOUT_S)
    assert ready, "the reader process did not answer in time"
    line = process.stdout.readline()
    assert line, f"the reader process exited: {process.stderr.read()}"
    return json.loads(line)


def test_reader_process_sees_each_flush(tmp_path):
    _, _, target, _ = layout = build_layout()
    path = tmp_path / "run.h5"
    script = tmp_path / "reader.py"
    script.write_text(READER_SCRIPT)

    run = create_run(path, layout)
    process = subprocess.Popen(
        [sys.executable, str(script), str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = [ask_reader(process)]
        run.log_event("start", "programming")
        for start, stop in iter_device_batches(len(target), 64):
            run.write_program_batch(start, **program_values(target, start, stop))
            seen.append(ask_reader(process))
        for index, time_s in enumerate((25.0, 3600.0)):
            run.append_read(
                time_s=time_s,
                actual_time_s=time_s,
                chip_clock_s=time_s + 10,
                temperature_c=25.0,
                g_us=target * (0.9 - 0.1 * index),
            )
            seen.append(ask_reader(process))
        run.mark_complete()
        seen.append(ask_reader(process))
    finally:
        run.close()
        process.stdin.close()
        process.wait(timeout=SUBPROCESS_TIMEOUT_S)

    assert process.returncode == 0, process.stderr.read()
    expected_devices = [0] + [stop for _, stop in iter_device_batches(len(target), 64)]
    assert [state["devices_programmed"] for state in seen[: len(expected_devices)]] == (
        expected_devices
    )
    assert [state["reads_done"] for state in seen[-3:]] == [1, 2, 2]
    assert all(state["values_ok"] for state in seen)
    assert all(state["reads_ok"] for state in seen)
    assert [state["complete"] for state in seen] == [False] * (len(seen) - 1) + [True]
    assert seen[-1]["events"] == ["start", "complete"]


# A writer killed with SIGKILL after two batches and one event, without closing the file.
KILLED_WRITER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    from test_runfile import build_layout, create_run, program_values

    layout = build_layout()
    target = layout[2]
    run = create_run(sys.argv[1], layout)
    run.log_event("start", "before the kill")
    run.write_program_batch(0, **program_values(target, 0, 40))
    run.write_program_batch(40, **program_values(target, 40, 80))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def run_killed_writer(tmp_path):
    path = tmp_path / "run.h5"
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == -9, result.stderr
    return path


def test_killed_run_readable_and_not_complete(tmp_path):
    path = run_killed_writer(tmp_path)
    with RunFile.open(path) as run:
        progress = run.progress()
        target = run.target_us()
        results = run.program_results()
        events = run.events()
    assert progress.devices_programmed == 80
    assert progress.stage == Stage.PROGRAMMING
    assert not progress.complete
    assert np.array_equal(results["final_g_us"], target[:80] + 0.125)
    assert [event.kind for event in events] == ["start"]


def test_killed_run_resumes_from_cursor(tmp_path):
    path = run_killed_writer(tmp_path)
    with RunFile.open(path, "a") as run:
        target = run.target_us()
        assert run.progress().devices_programmed == 80
        run.log_event("resume", "after the kill")
        for start, stop in iter_device_batches(len(target), 40, start=80):
            run.write_program_batch(start, **program_values(target, start, stop))
        run.append_read(time_s=25, actual_time_s=25, chip_clock_s=1, temperature_c=25, g_us=target)
        run.mark_complete()

    backups = sorted(tmp_path.glob("run.crashed-*.h5"))
    assert len(backups) == 1
    with RunFile.open(backups[0]) as original:
        assert original.progress().devices_programmed == 80
    with RunFile.open(path) as run:
        results = run.program_results()
        assert run.is_complete
        assert [event.kind for event in run.events()] == ["start", "resume", "complete"]
        assert run.progress().batches_done == 2 + math.ceil((len(target) - 80) / 40)
    expected = program_values(target, 0, len(target))
    for name, values in expected.items():
        assert np.array_equal(results[name], values), name
    assert not list(tmp_path.glob("*.recovering"))


# ---------------------------------------------------------------------- reference size


@pytest.mark.slow
def test_reference_network_size(tmp_path):
    """361,722 pairs as in ResNet-32: every chunk boundary of the per-device tables."""
    stage_shapes = [(16, 3, 3, 3)]
    stage_shapes += [(16, 16, 3, 3)] * 10
    stage_shapes += [(28, 16, 3, 3), (28, 28, 3, 3), (28, 16, 1, 1)] + [(28, 28, 3, 3)] * 8
    stage_shapes += [(56, 28, 3, 3), (56, 56, 3, 3), (56, 28, 1, 1)] + [(56, 56, 3, 3)] * 8
    shapes = stage_shapes + [(10, 56)]
    biases = [0] * (len(shapes) - 1) + [10]
    layout = build_layout(shapes, biases, geometry=Geometry(1, 512, 2048))
    layers, mapping, target, _ = layout
    assert mapping.n_pairs == 361_722

    path = tmp_path / "run.h5"
    rng = np.random.default_rng(1)
    reads = [target * 0.95 + rng.normal(0, 0.3, len(target)) for _ in range(3)]
    with create_run(path, layout) as run:
        program_all(run, target, batch_size=65536)
        for index, g_us in enumerate(reads):
            run.append_read(
                time_s=25.0 * 10**index,
                actual_time_s=0,
                chip_clock_s=0,
                temperature_c=25,
                g_us=g_us,
            )
        run.mark_complete()

    with RunFile.open(path) as run:
        assert run.layers() == layers
        assert np.array_equal(run.mapping().device_minus, mapping.device_minus)
        results = run.program_results()
        assert np.array_equal(results["final_g_us"], target + 0.125)
        for index, g_us in enumerate(reads):
            assert np.array_equal(run.read_g_us(index), g_us)
        assert run.read_g_us(2, 65530, 65540).tolist() == reads[2][65530:65540].tolist()
        assert run.is_complete
