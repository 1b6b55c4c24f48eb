"""Model vs oracle vs baselines, overall and per stratum, on fresh captures.

Run as ``python -m training.report [--package training/reference] [--captures 6000]
[--seed 20261202]``. Prints markdown tables: the served model (same packing, detection and
calibration as the server), the grid-posterior oracle (:mod:`training.oracle`, the physical
limit) and three power-weighted centroids, on captures of the wide domain from a seed used
nowhere in training; the strata of design §9 (EIRP decade, path-loss exponent third,
shadowing band, receivers present); refusals of noise-only captures; answers to captures that
at least three receivers hear well; and the first reference model's narrow preset.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from training.evaluate import CENTROIDS, LEVELS, Evaluation, evaluate, load_package
from training.oracle import GridOracle
from training.simulate import LAB, WIDE, iter_batches, receiver_positions
from workers.inputs import pack_capture
from workers.spec import ModelSpec

Mask = npt.NDArray[np.bool_]


def strata(ev: Evaluation) -> list[tuple[str, str, Mask]]:
    """(group, label, mask) of every stratum of design §9."""
    eirp, exponent, shadow, present = ev.nuisance.T
    out: list[tuple[str, str, Mask]] = []
    for lo in range(10, 60, 10):
        out.append(("EIRP", f"{lo}–{lo + 10} dBm", (eirp >= lo) & (eirp < lo + 10)))
    for group, values, (lo, hi), unit in (
        ("exponent", exponent, WIDE.path_loss_exponent, ""),
        ("shadowing", shadow, WIDE.shadowing_db, " dB"),
    ):
        edges = np.linspace(lo, hi, 4)
        for a, b in itertools.pairwise(edges):
            out.append((group, f"{a:.2f}–{b:.2f}{unit}", (values >= a) & (values <= b)))
    for k in range(4, 8):
        out.append(("receivers", f"{k} present", present == k))
    return out


def row(label: str, ev: Evaluation, mask: Mask | None = None) -> str:
    """One markdown row: count, medians, ratios and coverages of a subset."""
    m = np.ones(len(ev.model_error_m), bool) if mask is None else mask
    model = float(np.median(ev.model_error_m[m]))
    base = np.median(ev.baseline_error_m[m], axis=0)
    best = int(np.argmin(base))
    cells = [label, str(int(m.sum())), f"{model / 1e3:.2f}"]
    if len(ev.oracle_error_m):
        oracle = float(np.median(ev.oracle_error_m[m]))
        cells += [f"{oracle / 1e3:.2f}", f"{model / oracle:.3f}"]
    cells += [f"{base[best] / 1e3:.2f} ({CENTROIDS[best]})", f"{model / base[best]:.3f}"]
    cells += [f"{ev.coverage(p, m) * 100:.1f}" for p in LEVELS]
    if len(ev.oracle_level):
        cells.append(" / ".join(f"{ev.oracle_coverage(p, m) * 100:.1f}" for p in LEVELS))
    cells.append(f"{np.median(ev.sigma_m[m]) / 1e3:.2f}")
    return "| " + " | ".join(cells) + " |"


def header(oracle: bool) -> str:
    """The table header matching :func:`row`."""
    cols = ["stratum", "n", "model median km"]
    if oracle:
        cols += ["oracle median km", "model / oracle"]
    cols += ["best centroid km", "model / centroid", "cov 50", "cov 90", "cov 95"]
    if oracle:
        cols.append("oracle cov 50 / 90 / 95")
    cols.append("median σ km")
    return "| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols)


def share_answered(
    spec: ModelSpec, n: int, seed: int, pick: Callable[[npt.NDArray[np.float64]], bool], **kw: bool
) -> tuple[int, int]:
    """Of ``n`` captures whose true SNRs satisfy ``pick``, how many the detection answers."""
    rx_lat, rx_lon = receiver_positions()
    if spec.domain is None:
        raise SystemExit("the package has no domain section")
    rule = spec.domain.detection
    chosen = answered = 0
    for batch in iter_batches(n, seed, chunk=500, **kw):  # type: ignore[arg-type]
        for i in range(len(batch)):
            slots = batch.receivers_of(i)
            if not pick(batch.snr_db[i, slots]):
                continue
            p = pack_capture(batch.iq[i, slots], rx_lat[slots], rx_lon[slots], spec)
            chosen += 1
            answered += int(
                np.sum(p.detection.snr_db >= rule.snr_threshold_db) >= rule.min_detected
            )
    return answered, chosen


def main(argv: list[str] | None = None) -> None:
    """Print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=Path("training/reference"))
    parser.add_argument("--captures", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--no-oracle", action="store_true")
    args = parser.parse_args(argv)
    session, spec = load_package(args.package)
    if spec.domain is None:
        raise SystemExit("the package has no domain section")
    started = time.perf_counter()
    oracle = None if args.no_oracle else GridOracle(WIDE)
    ev = evaluate(session, spec, args.captures, args.seed, WIDE, oracle)
    print(f"## Wide domain: {WIDE.describe()}\n")
    print(
        f"{args.captures} captures from seed {args.seed}: {len(ev.model_error_m)} answered, "
        f"{ev.refused} refused as no-signal ({time.perf_counter() - started:.0f} s)\n"
    )
    print(header(oracle is not None))
    print(row("**all**", ev))
    for group, label, mask in strata(ev):
        print(row(f"{group} {label}", ev, mask))
    print()
    noise_ok, noise_n = share_answered(spec, 2000, args.seed + 1, lambda s: True, signal=False)
    print(
        f"- noise-only captures refused as no-signal: {noise_n - noise_ok} of {noise_n} "
        f"({(noise_n - noise_ok) / noise_n:.2%})"
    )
    strong_ok, strong_n = share_answered(
        spec, 3000, args.seed + 2, lambda s: int(np.sum(s >= 10.0)) >= 3
    )
    print(
        f"- captures with at least three receivers at SNR >= 10 dB answered: {strong_ok} of "
        f"{strong_n} ({strong_ok / strong_n:.2%})"
    )
    # The oracle keeps the wide priors here too: it is what a model of the wide world can know.
    lab_oracle = None if args.no_oracle else GridOracle(WIDE)
    lab = evaluate(session, spec, 2000, args.seed + 3, LAB, lab_oracle)
    print(f"\n## Narrow preset: {LAB.describe()}\n")
    print(f"2000 captures, {len(lab.model_error_m)} answered\n")
    print(header(lab_oracle is not None))
    print(row("**lab preset**", lab))
    worst = max(abs(lab.coverage(p) - p) for p in LEVELS)
    print(f"\nworst coverage deviation on the lab preset: {worst * 100:.1f} points")
    print(
        f"\n(report took {time.perf_counter() - started:.0f} s; sigma floor outside the domain "
        f"{spec.domain.out_of_domain_min_sigma_m / 1e3:.1f} km, chi-square k at 90 %: "
        f"{math.sqrt(-2 * math.log(0.1)):.3f})"
    )


if __name__ == "__main__":
    main()
