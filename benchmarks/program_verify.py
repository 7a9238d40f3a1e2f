"""Benchmark: program-and-verify of a ResNet-32's 723,444 devices on the in-process emulator.

Two runs on fresh emulated chips with the default parameters and settings:

1. ResNet-32-like targets. Each layer's weights are drawn standard-normal and clipped to 2.5
   standard deviations, as after the noise-aware training of the reference work, and mapped to
   device pairs with ``calibration.conductance`` (so half of the devices have a 0 µS target).
   Devices are programmed one batch per `program_verify` call, as the orchestrator does, and
   each batch is read 25 s after its devices' last pulses before the next one starts.
   ``program_verify_s`` is the wall time of the `program_verify` calls only.
2. The same number of devices spread evenly over the 11 published levels 0, 2.5, ..., 25 µS:
   the standard deviation of (first read 25 s after programming - target) per level, over
   converged devices, against sigma_prog(g).

Prints a few readable lines and, last, one JSON line with every number. Run from the repository
root: ``python benchmarks/program_verify.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from calibration import published
from calibration.conductance import layer_w_max, weights_to_conductances
from calibration.fit import emulate_levels
from protocols.program_verify import DeviceStatus, ProgramVerifySettings, program_verify
from protocols.readback import read_at_age
from sim_backend.chip import EmulatedChip

CLIP_SIGMAS = 2.5
READ_AGE_S = 25.0


def resnet32_layer_sizes() -> list[int]:
    """Return the number of device pairs per analog layer of the reference ResNet-32."""
    from hwctl.model import analog_layers, resnet32

    sizes = []
    for _, module in analog_layers(resnet32()):
        size = module.weight.numel()
        if module.bias is not None:
            size += module.bias.numel()
        sizes.append(size)
    return sizes


def resnet_targets_us(seed: int) -> np.ndarray:
    """Return every device's target: pair p occupies devices 2p (G+) and 2p + 1 (G−)."""
    generator = np.random.default_rng(seed)
    weights, scales = [], []
    for size in resnet32_layer_sizes():
        layer = np.clip(generator.standard_normal(size), -CLIP_SIGMAS, CLIP_SIGMAS)
        weights.append(layer)
        scales.append(np.full(size, layer_w_max(layer)))
    g_plus, g_minus = weights_to_conductances(np.concatenate(weights), np.concatenate(scales), published.G_MAX_US)
    return np.column_stack([g_plus, g_minus]).reshape(-1)


def run_resnet(seed: int, settings: ProgramVerifySettings) -> dict[str, float]:
    targets = resnet_targets_us(seed)
    ids = np.arange(targets.size, dtype=np.int64)
    chip = EmulatedChip(seed=seed)

    program_s = 0.0
    chip_program_s = 0.0
    iterations = np.empty(ids.size, dtype=np.int64)
    pulses = np.empty(ids.size, dtype=np.int64)
    status = np.empty(ids.size, dtype=np.uint8)
    first_read = np.empty(ids.size)
    for first in range(0, ids.size, settings.batch_size):
        chosen = slice(first, first + settings.batch_size)
        started = time.perf_counter()
        result = program_verify(chip, ids[chosen], targets[chosen], settings)
        program_s += time.perf_counter() - started
        chip_program_s += result.chip_time_s
        iterations[chosen] = result.iterations
        pulses[chosen] = result.pulses
        status[chosen] = result.status
        first_read[chosen] = read_at_age(chip, ids[chosen], result.t_programmed_s, READ_AGE_S)

    nonzero = targets > 0
    converged = status == DeviceStatus.CONVERGED
    error = np.abs(first_read - targets)
    pair_error = np.abs(first_read[0::2] - first_read[1::2] - (targets[0::2] - targets[1::2]))
    pair_converged = converged[0::2] & converged[1::2]
    return {
        "devices": int(ids.size),
        "program_verify_s": round(program_s, 3),
        "chip_program_s": round(chip_program_s, 1),
        "mean_iterations": round(float(iterations.mean()), 3),
        "mean_iterations_nonzero": round(float(iterations[nonzero].mean()), 3),
        "mean_pulses": round(float(pulses.mean()), 3),
        "converged_nonzero": round(float(converged[nonzero].mean()), 5),
        "stuck": int(np.sum(status == DeviceStatus.STUCK)),
        "gave_up": int(np.sum(status == DeviceStatus.GAVE_UP)),
        "median_abs_error_us_all": round(float(np.median(error[converged])), 4),
        "median_abs_error_us_nonzero": round(float(np.median(error[converged & nonzero])), 4),
        "median_abs_pair_error_us": round(float(np.median(pair_error[pair_converged])), 4),
    }


def run_levels(devices: int, seed: int, settings: ProgramVerifySettings) -> dict[str, object]:
    levels = published.LEVELS_US
    per_level = devices // levels.size
    from calibration.params import load_params

    started = time.perf_counter()
    errors = emulate_levels(load_params(), levels, per_level, seed=seed, settings=settings, read_age_s=READ_AGE_S)
    ratio = errors.sigma_us / published.sigma_prog_us(levels)
    return {
        "level_devices": int(per_level * levels.size),
        "level_seconds": round(time.perf_counter() - started, 2),
        "levels_us": [float(level) for level in levels],
        "sigma_us": [round(float(value), 4) for value in errors.sigma_us],
        "sigma_over_published": [round(float(value), 4) for value in ratio],
        "max_abs_deviation": round(float(np.max(np.abs(ratio - 1))), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="chip and weight seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=ProgramVerifySettings().batch_size,
                        help="devices per program-and-verify batch")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = ProgramVerifySettings(batch_size=arguments.batch_size)

    resnet = run_resnet(arguments.seed, settings)
    levels = run_levels(resnet["devices"], arguments.seed + 1, settings)
    print(f"ResNet-32: {resnet['devices']} devices programmed in {resnet['program_verify_s']} s "
          f"({resnet['chip_program_s']} s chip time), {resnet['mean_iterations_nonzero']} iterations per "
          f"non-zero target, {100 * resnet['converged_nonzero']:.2f} % of non-zero targets converged")
    print(f"levels: sigma / sigma_prog = {levels['sigma_over_published']}")
    print(json.dumps({"benchmark": "program_verify", "batch_size": arguments.batch_size, **resnet, **levels}))


if __name__ == "__main__":
    main()
