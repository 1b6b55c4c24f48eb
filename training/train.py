"""Train the reference localisation model and write its package (``model.onnx`` + spec).

Run as ``python -m training.train [--out training/reference] [--train N] [--seed S]``.

The network is permutation invariant over receivers: a shared per-receiver encoder, masked
pooling to a network context, a second per-receiver stage conditioned on that context, and
an attention-weighted average of the receiver positions plus a learned offset for the mean.
It predicts a bivariate Gaussian (mean, sigma, rho) in the local east/north frame and is
trained with its negative log-likelihood; sigmas are then calibrated on validation data.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from training import simulate
from training.dataset import (
    PackedSet,
    build_sharded,
    build_spec,
    detection_spec,
    feature_spec,
    load_dataset,
    norm_constants,
    save_dataset,
)
from workers.spec import ModelSpec, encode_spec

RUNS = Path(__file__).resolve().parent / "runs"
LEVELS = (0.5, 0.9, 0.95)
NEG = -1.0e4
DISTANCE_WEIGHT = 2.0


class Localizer(nn.Module):
    """Permutation-invariant receiver-set network predicting a bivariate Gaussian.

    Args:
        n_frames: feature frames per receiver.
        n_bands: feature bands per frame.
        norm_std_db: feature normalisation std (to turn features back into dB steps).
        hidden: width of the per-receiver encoder.
        emb: embedding width.
    """

    def __init__(
        self, n_frames: int, n_bands: int, norm_std_db: float, hidden: int = 256, emb: int = 128
    ) -> None:
        super().__init__()
        # Natural-log units per normalised feature unit: x * std dB → nepers of power.
        self.register_buffer("to_neper", torch.tensor(norm_std_db * math.log(10.0) / 10.0))
        self.n_in = n_frames * n_bands
        self.encoder = nn.Sequential(
            nn.Linear(2 * n_bands + 2 + 2, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, emb),
        )
        self.stage2 = nn.Sequential(
            nn.Linear(emb * 3 + 2 + 2, hidden),
            nn.GELU(),
            nn.Linear(hidden, emb),
            nn.GELU(),
        )
        self.attention = nn.Linear(emb, 1)
        self.head = nn.Sequential(nn.Linear(emb * 2, emb), nn.GELU(), nn.Linear(emb, 5))

    def forward(
        self, features: torch.Tensor, receivers: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predict the transmitter's Gaussian.

        Args:
            features: ``[B, K, F, N]`` normalised band powers (padding arbitrary).
            receivers: ``[B, K, 2]`` receiver east/north / position scale.
            mask: ``[B, K]`` 1 present, 0 padding.

        Returns:
            ``mean [B, 2]``, ``sigma [B, 2]`` (position-scale units) and ``rho [B]``.
        """
        present = mask.unsqueeze(-1) > 0.5  # [B, K, 1]
        m = present.to(features.dtype)
        batch, slots = features.shape[0], features.shape[1]
        x = features.reshape(batch, slots, self.n_in)
        x = torch.where(present, x, torch.zeros_like(x))
        pos = torch.where(present, receivers, torch.zeros_like(receivers))
        # Total received power per frame (log-sum-exp over bands), in normalised units.
        frame_power = (
            torch.logsumexp(x.reshape(batch, slots, -1, features.shape[3]) * self.to_neper, dim=-1)
            / self.to_neper
        )
        power_mean = frame_power.mean(-1, keepdim=True)
        power_max = frame_power.amax(-1, keepdim=True)
        power_mean = torch.where(present, power_mean, torch.zeros_like(power_mean))
        power_max = torch.where(present, power_max, torch.zeros_like(power_max))
        # Time-averaged band profile and its spread: compact and independent of frame order.
        maps = x.reshape(batch, slots, -1, features.shape[3])
        band_mean = maps.mean(2)
        band_std = (maps - band_mean.unsqueeze(2)).square().mean(2).add(1e-6).sqrt()
        h = self.encoder(
            torch.cat([band_mean, band_std, power_mean * 0.1, power_max * 0.1, pos], dim=-1)
        )
        count = m.sum(1).clamp(min=1.0)
        h_mean = (h * m).sum(1) / count
        h_max = torch.where(present, h, torch.full_like(h, NEG)).amax(1)
        strongest = torch.where(present, power_mean, torch.full_like(power_mean, NEG)).amax(1)
        relative = (power_mean - strongest.unsqueeze(1)) * 0.1
        context = torch.cat([h_mean, h_max], dim=-1).unsqueeze(1).expand(-1, slots, -1)
        z = self.stage2(torch.cat([h, context, relative, power_mean * 0.1, pos], dim=-1))
        logits = torch.where(present, self.attention(z), torch.full_like(m, NEG))
        weights = torch.softmax(logits, dim=1) * m
        weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-9)
        z_att = (weights * z).sum(1)
        z_max = torch.where(present, z, torch.full_like(z, NEG)).amax(1)
        out = self.head(torch.cat([z_att, z_max], dim=-1))
        mean = (weights * pos).sum(1) + out[:, 0:2]
        sigma = functional.softplus(out[:, 2:4] - 2.0) + 1.0e-3
        rho = 0.99 * torch.tanh(out[:, 4])
        return mean, sigma, rho


def gaussian_nll(
    mean: torch.Tensor, sigma: torch.Tensor, rho: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Mean negative log-likelihood of ``target`` under the bivariate Gaussians (no constant)."""
    d = (target - mean) / sigma
    one_minus = 1.0 - rho**2
    quad = (d[:, 0] ** 2 - 2.0 * rho * d[:, 0] * d[:, 1] + d[:, 1] ** 2) / one_minus
    return (torch.log(sigma).sum(1) + 0.5 * torch.log(one_minus) + 0.5 * quad).mean()


def euclidean(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between predicted and true positions."""
    return (mean - target).square().sum(1).add(1e-8).sqrt().mean()


def mahalanobis_sq(
    err: np.ndarray, sigma: np.ndarray, rho: np.ndarray, factor: float = 1.0
) -> np.ndarray:
    """Squared Mahalanobis distance of errors ``(n, 2)`` under ``sigma * factor`` and ``rho``."""
    d = err / (sigma * factor)
    return (d[:, 0] ** 2 - 2.0 * rho * d[:, 0] * d[:, 1] + d[:, 1] ** 2) / (1.0 - rho**2)


def coverage(d2: np.ndarray, levels: tuple[float, ...] = LEVELS) -> np.ndarray:
    """Share of samples inside each level's chi-square (2 dof) ellipse."""
    return np.array([np.mean(d2 <= -2.0 * math.log1p(-p)) for p in levels])


def fit_calibration(err: np.ndarray, sigma: np.ndarray, rho: np.ndarray) -> float:
    """Sigma multiplier minimising the worst coverage deviation at 50/90/95 %."""
    d2 = mahalanobis_sq(err, sigma, rho)
    grid = np.exp(np.linspace(math.log(0.3), math.log(3.0), 801))
    worst = [np.max(np.abs(coverage(d2 / f**2) - np.array(LEVELS))) for f in grid]
    return float(grid[int(np.argmin(worst))])


def fit_spread_calibration(
    err: np.ndarray, sigma: np.ndarray, rho: np.ndarray, scale_m: float, bins: int = 8
) -> tuple[list[float], list[float]]:
    """Piecewise sigma multipliers by predicted spread (equal-count bins of log σ).

    One global factor leaves narrow predictions over-confident and wide ones too cautious
    when the model's sigma does not grow exactly with its error; a factor per spread bin,
    interpolated in log σ between the bins' medians, makes every spread honest.

    Returns:
        Knots (natural log of the geometric-mean sigma in metres) and factors.
    """
    log_sigma = np.log(np.sqrt(sigma[:, 0] * sigma[:, 1]) * scale_m)
    edges = np.quantile(log_sigma, np.linspace(0.0, 1.0, bins + 1))
    knots, factors = [], []
    for lo, hi in itertools.pairwise(edges):
        inside = (log_sigma >= lo) & (log_sigma <= hi)
        knots.append(float(np.median(log_sigma[inside])))
        factors.append(fit_calibration(err[inside], sigma[inside], rho[inside]))
    return knots, factors


def spread_factor(sigma: np.ndarray, scale_m: float, knots: list[float], factors: list[float]):
    """The factor of :func:`fit_spread_calibration` for each prediction."""
    log_sigma = np.log(np.sqrt(sigma[:, 0] * sigma[:, 1]) * scale_m)
    return np.interp(log_sigma, knots, factors)


@torch.no_grad()
def predict(
    model: nn.Module, data: PackedSet, batch: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the torch model over a dataset; returns mean, sigma, rho as numpy."""
    model.eval()
    outs: list[list[np.ndarray]] = [[], [], []]
    for s in range(0, len(data.target), batch):
        res = model(
            torch.from_numpy(data.features[s : s + batch]),
            torch.from_numpy(data.receivers[s : s + batch]),
            torch.from_numpy(data.mask[s : s + batch]),
        )
        for acc, r in zip(outs, res, strict=True):
            acc.append(r.numpy())
    return tuple(np.concatenate(o) for o in outs)  # type: ignore[return-value]


def cached_dataset(n: int, seed: int, spec: ModelSpec, shards: int) -> PackedSet:
    """Build or load (from ``training/runs/``) the packed dataset for ``(n, seed, spec)``."""
    physics = f"{simulate.WIDE.describe()}/{detection_spec()}/v2"
    text = encode_spec(spec) + f"{n}/{seed}/{shards}/{physics}".encode()
    key = hashlib.sha256(text).hexdigest()[:12]
    directory = RUNS / f"data_seed{seed}_n{n}_{key}"
    if (directory / "truth.npy").exists():
        print(f"loading cached dataset {directory.name}", flush=True)
        return load_dataset(directory)
    start = time.perf_counter()
    data = build_sharded(n, seed, spec, shards)
    save_dataset(data, directory)
    print(f"built {directory.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return data


def train_model(
    train: PackedSet,
    val: PackedSet,
    spec: ModelSpec,
    epochs: int,
    seed: int,
    history: list[dict[str, float]] | None = None,
) -> Localizer:
    """Train a :class:`Localizer` with AdamW and a one-cycle schedule on the Gaussian NLL.

    ``history``, when given, receives one ``{train_nll, val_nll, val_median_km}`` per epoch.
    """
    torch.manual_seed(seed)
    feat = spec.features
    model = Localizer(feat.n_frames, feat.n_bands, feat.norm_std_db)
    print(f"parameters: {sum(p.numel() for p in model.parameters())}", flush=True)
    batch = 256
    steps = epochs * math.ceil(len(train.target) / batch)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    tensors = [
        torch.from_numpy(a) for a in (train.features, train.receivers, train.mask, train.target)
    ]
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(len(train.target), generator=gen)
        for s in range(0, len(order), batch):
            idx = order[s : s + batch]
            f, r, m, t = (a[idx] for a in tensors)
            mean, sigma, rho = model(f, r, m)
            # NLL plus the Euclidean error: pulls the mean towards the posterior's spatial
            # median, which lowers the median error; sigmas are recalibrated afterwards.
            loss = gaussian_nll(mean, sigma, rho, t) + DISTANCE_WEIGHT * euclidean(mean, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        vm, vs, vr = predict(model, val)
        err_km = np.hypot(*(vm - val.target).T) * spec.output.position_scale_m / 1e3
        vnll = float(gaussian_nll(*(torch.from_numpy(a) for a in (vm, vs, vr, val.target))))
        if history is not None:
            history.append(
                {
                    "train_nll": total / len(order),
                    "val_nll": vnll,
                    "val_median_km": float(np.median(err_km)),
                }
            )
        print(
            f"epoch {epoch + 1:2d}/{epochs} train nll {total / len(order):+.3f} "
            f"val nll {vnll:+.3f} val median {np.median(err_km):.2f} km "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    model.eval()
    return model


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: build data, train, calibrate, export the package."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("training/reference"))
    parser.add_argument("--train", type=int, default=120_000, help="simulated training captures")
    parser.add_argument("--val", type=int, default=24_000, help="simulated validation captures")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1, help="training seed (validation: +1)")
    parser.add_argument(
        "--export-only",
        type=Path,
        help="skip training: calibrate and export the weights saved at this path (a run's "
        "training/runs/last_model.pt)",
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("HEIMDALL_REGISTRY_TRACKING_URI", "sqlite:///.local/mlflow.db"),
        help="MLflow tracking URI the run is logged to (default: HEIMDALL_REGISTRY_TRACKING_URI "
        "or the embedded registry make run serves); 'none' to skip",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()

    norm_mean, norm_std = norm_constants(2_000, args.seed)
    print(f"feature normalisation: mean {norm_mean:.3f} dB, std {norm_std:.3f} dB", flush=True)
    spec = build_spec(feature_spec(norm_mean, norm_std))
    train = cached_dataset(args.train, args.seed, spec, shards=8)
    val = cached_dataset(args.val, args.seed + 1, spec, shards=4)
    print(f"answerable captures: train {len(train.target)}, val {len(val.target)}", flush=True)

    history: list[dict[str, float]] = []
    if args.export_only is not None:
        feat = spec.features
        model = Localizer(feat.n_frames, feat.n_bands, feat.norm_std_db)
        model.load_state_dict(torch.load(args.export_only))
        model.eval()
    else:
        model = train_model(train, val, spec, args.epochs, args.seed, history)
        RUNS.mkdir(exist_ok=True)
        torch.save(model.state_dict(), RUNS / "last_model.pt")
    from training.export import export_package  # local: export imports this module

    metrics = export_package(
        model,
        spec,
        args.out,
        training_data=(
            f"training.simulate ({simulate.WIDE.describe()}): {args.train} simulated captures "
            f"(8 streams from seed {args.seed}), validation {args.val} (seed {args.seed + 1}); "
            "only captures the server answers (signal detected by >= 3 receivers) are kept"
        ),
        seed=args.seed,
        train=train,
        val=val,
    )
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(metrics, indent=2), flush=True)
    if args.tracking_uri != "none":
        from training.tracking import log_training_run

        run_id = log_training_run(
            args.tracking_uri,
            params={
                "train_captures": args.train,
                "val_captures": args.val,
                "epochs": args.epochs,
                "seed": args.seed,
                "export_only": args.export_only or "",
                "domain": simulate.WIDE.describe(),
                "distance_weight": DISTANCE_WEIGHT,
            },
            history=history,
            figures=metrics,
            package_dir=args.out,
        )
        print(f"logged training run {run_id} to {args.tracking_uri}", flush=True)


if __name__ == "__main__":
    main()
