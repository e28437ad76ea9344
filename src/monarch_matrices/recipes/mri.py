"""``monarch-matrices train mri``: SENSE vs mSENSE (a learnable Monarch DFT) on simulated MRI.

The paper's MRI claim: in SENSE reconstruction, replacing the fixed Fourier
transform by a learnable Monarch matrix initialized to it (mSENSE) and
training it on a few scans gives better images.  This recipe checks it on data
it simulates (:mod:`.mri_data`):

1. phantoms: random Shepp–Logan-like ellipse images for training, and for
   testing scikit-image's Shepp–Logan plus held-out random ones; smooth
   sensitivities of ``--coils`` coils; Cartesian masks at each of
   ``--accelerations``; complex Gaussian noise of std ``--noise``;
2. SENSE: ``iters`` conjugate-gradient steps on ``(E*E + λI) x = E*y`` with the
   exact DFT and the known maps, ``λ`` and ``iters`` tuned on training phantoms
   (so the baseline is at its best, not at a guess);
3. mSENSE: the same solver, same ``λ`` and iterations, with the DFT replaced by
   ``transforms.dft2`` (one Monarch factor, exact at the start) and trained
   end to end through the unrolled CG on training phantoms, with a fresh
   random mask, acceleration and noise each step; one model for all
   accelerations;
4. optionally (default on) a small residual U-Net on the SENSE image, trained
   for the same steps, as the usual learned baseline;
5. PSNR and SSIM (``skimage.metrics``, on magnitudes, data range 1) on the
   held-out phantoms per acceleration: ``metrics.json`` and ``mri.png``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._science import (
    Run,
    StopRequested,
    add_run_arguments,
    environment,
    prepare_run,
    stop_message,
    write_png,
)
from .common import (
    RunError,
    epoch_batch,
    guarded,
    write_json,
)

FILES = ("metrics.json", "mri.png")
LAMBDAS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)  # SENSE's regularization, tuned over these
ITERS = (5, 10, 20)  # and its number of CG steps (early stopping also regularizes)
VALIDATION = 16  # training phantoms used to tune them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, steps=400, batch_size=4, lr=1e-3)
    g = parser.add_argument_group("data")
    g.add_argument("--size", type=int, default=64, help="image side n (default 64)")
    g.add_argument("--coils", type=int, default=8, help="receive coils (default 8)")
    g.add_argument("--accelerations", default="2,3,4", metavar="LIST",
                   help="undersampling factors, comma-separated (default 2,3,4)")
    g.add_argument("--noise", type=float, default=0.01,
                   help="k-space noise std, as a fraction of the phantom peak (default 0.01)")
    g.add_argument("--train-phantoms", type=int, default=200,
                   help="random training phantoms (default 200)")
    g.add_argument("--test-phantoms", type=int, default=20,
                   help="held-out phantoms: Shepp–Logan plus random ones (default 20)")
    m = parser.add_argument_group("reconstruction")
    m.add_argument("--cg-iters", type=int, default=None,
                   help=f"conjugate-gradient steps of SENSE and mSENSE (default: tuned over "
                   f"{ITERS})")
    m.add_argument("--lam", type=float, default=None,
                   help=f"SENSE Tikhonov weight (default: tuned over {LAMBDAS})")
    m.add_argument("--no-unet", action="store_true", help="skip the U-Net baseline")
    m.add_argument("--unet-width", type=int, default=16, help="U-Net channels (default 16)")
    m.add_argument("--unet-lr", type=float, default=1e-3,
                   help="U-Net peak learning rate (default 1e-3; --lr is mSENSE's)")


def run(args: argparse.Namespace) -> int:
    return guarded("mri", lambda: _main(args))


# --------------------------------------------------------------------------- models


class MonarchSense(nn.Module):
    """SENSE with a learnable Monarch matrix in place of the unitary 2-D DFT.

    The transform is ``transforms.dft2(n, n, norm="ortho")``: one Monarch factor
    that is exactly ``F_n ⊗ F_n`` at the start.  The CG solver needs the
    adjoint too; it is the same parameters' conjugate transpose
    (:func:`~monarch_matrices.ops.product.adjoint_factors`), so the normal
    operator stays Hermitian and CG stays valid however training moves it.
    """

    def __init__(self, n: int, lam: float, iters: int) -> None:
        super().__init__()
        from ..transforms import dft2

        self.n, self.lam, self.iters = n, lam, iters
        self.transform = dft2(n, n, norm="ortho", dtype=torch.complex64)

    def forward_transform(self, z: torch.Tensor) -> torch.Tensor:
        return self.transform(z.flatten(-2)).unflatten(-1, (self.n, self.n))

    def adjoint_transform(self, z: torch.Tensor) -> torch.Tensor:
        from ..ops.product import adjoint_factors, product_multiply

        (w1,), (w2,) = self.transform.w1, self.transform.w2
        out = product_multiply(z.flatten(-2), adjoint_factors(w1, w2))
        return out.unflatten(-1, (self.n, self.n))

    def forward(self, kspace: torch.Tensor, sens: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        from .mri_data import sense_reconstruct

        return sense_reconstruct(kspace, sens, mask, lam=self.lam, iters=self.iters,
                                 transform=self.forward_transform, adjoint=self.adjoint_transform)


class UNet(nn.Module):
    """A two-level residual U-Net on the SENSE magnitude: ``x + f(x)``, ``(B, n, n)`` → same."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())

        self.down1, self.down2 = block(1, width), block(width, 2 * width)
        self.bottom = block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = block(2 * width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"UNet needs sides divisible by 4, got {tuple(x.shape[-2:])}")
        h = x.unsqueeze(1)  # (B, 1, n, n)
        d1 = self.down1(h)
        d2 = self.down2(F.max_pool2d(d1, 2))
        b = self.bottom(F.max_pool2d(d2, 2))
        u2 = self.dec2(torch.cat([self.up2(b), d2], 1))
        u1 = self.dec1(torch.cat([self.up1(u2), d1], 1))
        return x + self.out(u1).squeeze(1)


# --------------------------------------------------------------------------- data


def _accelerations(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise RunError(f"--accelerations {text!r}: expected numbers like 2,3,4") from None
    if not values or any(v < 1 for v in values):
        raise RunError(f"--accelerations {text!r}: need one or more factors >= 1")
    return values


def _check(args: argparse.Namespace) -> tuple[float, ...]:
    if args.size < 16 or args.size % 4:
        raise RunError(f"--size={args.size}: use a multiple of 4, at least 16")
    for name in ("coils", "train_phantoms", "test_phantoms", "cg_iters", "unet_width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.noise < 0 or (args.lam is not None and args.lam < 0):
        raise RunError("--noise and --lam must be >= 0")
    if args.lr <= 0 or args.unet_lr <= 0:
        raise RunError("--lr and --unet-lr must be > 0")
    return _accelerations(args.accelerations)


def _generator(*key: int) -> torch.Generator:
    """A generator for one purpose (``key``): streams never overlap, and a resumed run
    draws exactly the same numbers."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k)) % (2**63)
    return torch.Generator().manual_seed(seed)


def _phantoms(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    from .mri_data import ellipse_phantom, shepp_logan

    gen = _generator(args.seed, 1)
    train = torch.stack([ellipse_phantom(args.size, gen) for _ in range(args.train_phantoms)])
    gen = _generator(args.seed, 2)
    test = [shepp_logan(args.size)]
    test += [ellipse_phantom(args.size, gen) for _ in range(args.test_phantoms - 1)]
    return train, torch.stack(test)


def _acquire(images: torch.Tensor, sens: torch.Tensor, accels: list[float], noise: float,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(B, 1, n, 1)`` (one acceleration per image) and measured k-space ``(B, C, n, n)``."""
    from .mri_data import cartesian_mask, simulate_kspace

    n = images.shape[-1]
    masks = torch.stack([cartesian_mask(n, r, gen) for r in accels])[:, None]
    return masks, simulate_kspace(images, sens, masks, noise, gen)


# --------------------------------------------------------------------------- metrics


def _scores(recon: torch.Tensor, truth: torch.Tensor) -> tuple[list[float], list[float]]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr, ssim = [], []
    for r, t in zip(recon.detach().abs().clamp(0, 1).numpy(), truth.numpy()):
        psnr.append(float(peak_signal_noise_ratio(t, r, data_range=1.0)))
        ssim.append(float(structural_similarity(t, r, data_range=1.0)))
    return psnr, ssim


def _summary(psnr: list[float], ssim: list[float]) -> dict[str, float]:
    return {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim),
            "psnr_shepp_logan": psnr[0], "ssim_shepp_logan": ssim[0]}


# --------------------------------------------------------------------------- main


def _main(args: argparse.Namespace) -> int:
    from .mri_data import coil_sensitivities, sense_reconstruct

    accels = _check(args)
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise RunError("the MRI recipe needs scikit-image: "
                       "pip install 'monarch-matrices[science]'") from None
    run = prepare_run(args, "mri", FILES)
    print(f"monarch-matrices train mri: {args.size}x{args.size}, {args.coils} coils, "
          f"R = {', '.join(f'{r:g}' for r in accels)}, noise {args.noise:g}; "
          f"{args.steps} steps per model, out {run.path}", flush=True)
    start = time.perf_counter()
    train, test = _phantoms(args)
    sens = coil_sensitivities(args.size, args.coils)
    tests = {r: _acquire(test, sens, [r] * len(test), args.noise, _generator(args.seed, 3, i))
             for i, r in enumerate(accels)}
    data_s = time.perf_counter() - start

    # SENSE, with λ and the CG steps tuned on training phantoms (mean PSNR, all accelerations)
    val = train[:VALIDATION]
    val_accels = [accels[i % len(accels)] for i in range(len(val))]
    val_masks, val_k = _acquire(val, sens, val_accels, args.noise, _generator(args.seed, 4))
    tuning = {}
    for iters in ([args.cg_iters] if args.cg_iters is not None else ITERS):
        for lam in ([args.lam] if args.lam is not None else LAMBDAS):
            x = sense_reconstruct(val_k, sens, val_masks, lam=lam, iters=iters)
            tuning[lam, iters] = sum(_scores(x, val)[0]) / len(val)
    lam, iters = max(tuning, key=tuning.get)
    print(f"  SENSE tuned on {len(val)} training phantoms: λ = {lam:g}, {iters} CG steps "
          f"(validation PSNR {tuning[lam, iters]:.2f} dB)", flush=True)

    def sense(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return sense_reconstruct(k, sens, m, lam=lam, iters=iters)

    def training_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = epoch_batch(step, args.batch_size, len(train), args.seed)
        gen = _generator(args.seed, 5, step)
        batch_accels = [accels[int(i)] for i in torch.randint(len(accels), (len(rows),),
                                                             generator=gen)]
        masks, k = _acquire(train[rows], sens, batch_accels, args.noise, gen)
        return train[rows], masks, k

    # one CG step from zero is E*y optimally scaled: the zero-filled image
    fixed = {"zero-filled": lambda k, m: sense_reconstruct(k, sens, m, lam=0.0, iters=1),
             "SENSE": sense}
    recon: dict[str, dict[float, torch.Tensor]] = {name: {} for name in fixed}
    results: dict[str, Any] = {name: {"params": 0, "per_acceleration": {}} for name in fixed}
    with torch.no_grad():
        for name, method in fixed.items():
            for r, (m, k) in tests.items():
                recon[name][r] = method(k, m)
                results[name]["per_acceleration"][f"{r:g}"] = _summary(
                    *_scores(recon[name][r], test))
    try:
        # mSENSE: trained through the unrolled solver
        torch.manual_seed(args.seed)
        msense = MonarchSense(args.size, lam, iters)
        opt = torch.optim.Adam(msense.parameters(), lr=args.lr)

        def msense_loss(step: int) -> torch.Tensor:
            truth, masks, k = training_batch(step)
            return F.mse_loss(msense(k, sens, masks).abs(), truth)

        def msense_eval() -> dict[str, Any]:
            out = {}
            for r, (m, k) in tests.items():
                out[f"{r:g}"] = _summary(*_scores(msense(k, sens, m), test))
            return {"per_acceleration": out}

        record = run.train("mri/msense", msense, opt, msense_loss, msense_eval)
        results["mSENSE"] = {"params": 2 * sum(p.numel() for p in msense.parameters()),
                             **record["result"], "train_seconds": record["train_s"]}
        with torch.no_grad():
            recon["mSENSE"] = {r: msense(k, sens, m) for r, (m, k) in tests.items()}
        _say("mSENSE", results["mSENSE"])

        if not args.no_unet:
            torch.manual_seed(args.seed)
            unet = UNet(args.unet_width)
            opt = torch.optim.Adam(unet.parameters(), lr=args.unet_lr)

            def unet_loss(step: int) -> torch.Tensor:
                truth, masks, k = training_batch(step)
                with torch.no_grad():
                    start_image = sense(k, masks).abs()
                return F.mse_loss(unet(start_image), truth)

            def unet_eval() -> dict[str, Any]:
                out = {}
                for r in tests:
                    out[f"{r:g}"] = _summary(*_scores(unet(recon["SENSE"][r].abs()), test))
                return {"per_acceleration": out}

            record = run.train("mri/unet", unet, opt, unet_loss, unet_eval, peak_lr=args.unet_lr)
            results["U-Net"] = {"params": sum(p.numel() for p in unet.parameters()),
                                **record["result"], "train_seconds": record["train_s"]}
            with torch.no_grad():
                recon["U-Net"] = {r: unet(recon["SENSE"][r].abs()) for r in tests}
            _say("U-Net", results["U-Net"])
    except StopRequested:
        print(stop_message("mri", run), flush=True)
        return 0
    _say("SENSE", results["SENSE"])
    _say("zero-filled", results["zero-filled"])
    _plot(run, test[0], recon, results, accels)
    metrics = {
        "recipe": "mri", "command": run.state["command"], "args": run.state["args"],
        "setup": {"size": args.size, "coils": args.coils, "accelerations": list(accels),
                  "noise": args.noise, "cg_iters": iters, "lam": lam,
                  "sense_validation_psnr": {f"lam={k:g},iters={i}": v
                                            for (k, i), v in tuning.items()},
                  "train_phantoms": args.train_phantoms, "test_phantoms": args.test_phantoms,
                  "data_seconds": data_s},
        "methods": results,
        "mSENSE_minus_SENSE": {
            f"{r:g}": {q: results["mSENSE"]["per_acceleration"][f"{r:g}"][q]
                       - results["SENSE"]["per_acceleration"][f"{r:g}"][q]
                       for q in ("psnr", "ssim")} for r in accels},
        "wall_seconds_this_invocation": time.perf_counter() - run.started,
        "environment": environment(),
        "notes": "PSNR (dB) and SSIM of magnitude images vs the phantom (peak 1, data range 1), "
                 "mean over held-out phantoms; *_shepp_logan: the Shepp–Logan phantom alone; "
                 "mSENSE params count a complex entry as two",
    }
    write_json(run.path / "metrics.json", metrics)
    print(f"wrote {run.path}/metrics.json", flush=True)
    return 0


def _say(name: str, result: dict[str, Any]) -> None:
    parts = [f"R={r}: {v['psnr']:.2f} dB / {v['ssim']:.3f}"
             for r, v in result["per_acceleration"].items()]
    print(f"  {name:11s} PSNR/SSIM  " + "  ".join(parts), flush=True)


def _plot(run: Run, truth: torch.Tensor, recon: dict[str, dict[float, torch.Tensor]],
          results: dict[str, Any], accels: tuple[float, ...]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (no PNG: matplotlib is not installed)", flush=True)
        return
    methods = [m for m in ("zero-filled", "SENSE", "mSENSE", "U-Net") if m in recon]
    fig, axes = plt.subplots(len(accels), len(methods) + 1,
                             figsize=(2.5 * (len(methods) + 1), 2.6 * len(accels)),
                             squeeze=False)
    for i, r in enumerate(accels):
        axes[i, 0].imshow(truth.numpy(), cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title("Shepp–Logan (truth)" if i == 0 else "", fontsize=9)
        axes[i, 0].set_ylabel(f"R = {r:g}")
        for j, name in enumerate(methods, start=1):
            image = recon[name][r][0].detach().abs().numpy()
            axes[i, j].imshow(image, cmap="gray", vmin=0, vmax=1)
            title = name
            if name in results:
                s = results[name]["per_acceleration"][f"{r:g}"]
                title += f"\n{s['psnr_shepp_logan']:.1f} dB / {s['ssim_shepp_logan']:.3f}"
            axes[i, j].set_title(title, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Shepp–Logan reconstructions (PSNR / SSIM on this phantom)", fontsize=10)
    fig.tight_layout()
    write_png(run.path / "mri.png", fig)
