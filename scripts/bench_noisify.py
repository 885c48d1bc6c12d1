#!/usr/bin/env python3
"""PSF plus noise on a Pilatus 6M-sized frame (2463 fast x 2527 slow pixels):
the DetectorResponse model (FFT PSF, calibration error, Poisson photons,
read-out noise) in float32, and, given --c-bin, the original noisify with the
same PSF and radius on the same frame.

Usage: python scripts/bench_noisify.py [--psf gauss|fiber] [--fwhm UM] [--radius N]
       [--threads N] [--repeat N] [--device cpu|cuda] [--c-bin PATH] [--json FILE]

The frame: a smooth background of about 2 photons per pixel plus 2000 spots
(fixed seed). Seconds are the minimum over the repeats (the model's first,
warm-up call is left out); memory is the peak resident size of the process
(model: above what it held before the first call; the original: its own).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

FAST, SLOW, PIXEL_MM = 2463, 2527, 0.172


def frame(seed: int = 1) -> np.ndarray:
    g = np.random.default_rng(seed)
    s = np.linspace(-1, 1, SLOW)[:, None]
    f = np.linspace(-1, 1, FAST)[None, :]
    img = (2.0 * np.exp(-(s * s + f * f))).astype(np.float32)
    ys, xs = g.integers(0, SLOW, 2000), g.integers(0, FAST, 2000)
    img[ys, xs] += g.uniform(10, 5e4, 2000).astype(np.float32)
    return img


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def bench_model(img, psf, fwhm_um, radius, repeat, device) -> dict:
    import torch

    from torchbragg.models import DetectorResponse
    r = DetectorResponse(gain=1.0, adc_offset=40.0, readout_noise=3.0, psf=psf, psf_fwhm=fwhm_um * 1e-3,
                         psf_radius=radius, calibration_noise=0.03, dtype=torch.float32, device=device)
    photons = torch.as_tensor(img, device=device)
    pixel = (PIXEL_MM, PIXEL_MM)
    gen = torch.Generator(device=device).manual_seed(1)

    def once():
        out = r.sample(photons, pixel, gen)
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    before = _rss_mb()
    once()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    row = dict(what=f"DetectorResponse.sample float32 ({device})", seconds=min(times), peak_mb=peak - before)
    if device != "cpu":
        row["peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return row


# runs the original from a small process, so that its peak memory is not the
# bench's own (a forked child's high-water mark starts at its parent's)
_LAUNCH = """
import json, resource, subprocess, sys, time
argv, cwd = json.loads(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
rc = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL).returncode
print(json.dumps([rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


def bench_c(img, psf, fwhm_um, radius, c_bin, repeat) -> dict:
    times, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        img.astype("<f4").tofile(os.path.join(tmp, "in.bin"))
        argv = [os.path.abspath(c_bin), "-floatfile", "in.bin", "-detpixels_x", str(FAST), "-detpixels_y", str(SLOW),
                "-pixel", str(PIXEL_MM), "-psf", psf, "-psf_fwhm", str(fwhm_um), "-psf_radius", str(radius),
                "-readout", "3", "-seed", "1", "-nopgm"]
        for _ in range(repeat):
            out = subprocess.run([sys.executable, "-c", _LAUNCH, json.dumps(argv), tmp], capture_output=True,
                                 text=True, check=True).stdout
            rc, seconds, peak_kb = json.loads(out)
            if rc != 0:
                raise SystemExit(f"{c_bin} failed with status {rc}")
            times.append(seconds)
            peaks.append(peak_kb / 1024.0)
    return dict(what="original noisify (whole run, 16-bit files written)", seconds=min(times), peak_mb=max(peaks))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--psf", choices=("gauss", "fiber"), default="gauss")
    p.add_argument("--fwhm", type=float, default=172.0, help="PSF FWHM in microns (default 172: one pixel)")
    p.add_argument("--radius", type=int, default=3, help="PSF radius in pixels, both programs (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--c-bin", metavar="PATH", help="the original noisify, built elsewhere")
    p.add_argument("--json", metavar="FILE")
    opts = p.parse_args(argv)
    import torch
    torch.set_num_threads(opts.threads)
    img = frame()
    rows = [bench_model(img, opts.psf, opts.fwhm, opts.radius, opts.repeat, opts.device)]
    if opts.c_bin:
        rows.append(bench_c(img, opts.psf, opts.fwhm, opts.radius, opts.c_bin, opts.repeat))
    print(f"PSF {opts.psf} {opts.fwhm:g} um, radius {opts.radius}, {FAST}x{SLOW} pixels, "
          f"{opts.threads} torch threads")
    print("| what | seconds | peak memory (MB) |")
    print("| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['what']} | {r['seconds']:.3f} | {r['peak_mb']:.0f} |")
    if len(rows) == 2:
        print(f"original / model time: {rows[1]['seconds'] / rows[0]['seconds']:.1f}x")
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(dict(options=vars(opts), rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
