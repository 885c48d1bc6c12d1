"""The `noisify` command: a float image of photons per pixel in, what a
detector records out (SMV noise image, noiseless integer image, PGM), as
nanoBragg's companion program does, with the same files for the same input
and seeds. See ``torchbragg.noisify`` for the arithmetic.

Flags are matched by their exact names and the synonyms listed in -h;
unknown flags, malformed numbers, missing or short input files are refused
with one line.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

from ..errors import InputError
from ..flags import NOISIFY_FLAGS, by_name, number

PROG = "noisify"
R_E_SQR = 7.94079248018965e-30  # Thomson cross section, m^2
# the fluence at which the input is read as photons per pixel
UNIT_FLUENCE = 125932015286227086360700780544.0

FLAGS = NOISIFY_FLAGS  # this command's part of flags.REGISTRY
_BY_NAME = by_name(FLAGS)
DEFAULTS = dict(floatfile=None, scale=1.0, fluence=UNIT_FLUENCE, gain=1.0, adc=40.0, readout=0.0, flicker=0.0,
                calibration=0.03, seed=None, calib_seed=123456789, psf=None, psf_fwhm=float(np.float32(46e-6)),
                psf_radius=0, nonoise=False, distance=0.1, pixel=1e-4, detpixels=None, xpixels=None,
                ypixels=None, Xbeam=None, Ybeam=None, detsize=None, detsize_x=None, detsize_y=None,
                header=None, noisefile="noiseimage.img", intfile="intimage.img", pgmfile="image.pgm",
                nopgm=False, bits=16, noprogress=False, badpix_seed=None, hotpix_seed=None, phi=0.0, osc=1.0, **{"lambda": 1.0})


def help_text() -> str:
    lines = [f"usage: {PROG} -floatfile FILE [flags]",
             "  turns a float image of photons per pixel into detector images: flicker, calibration error,",
             "  Poisson photons, point-spread function, gain, ADC offset, read-out noise, 16/32-bit overloads.",
             "  Outputs are written whole or not at all.", ""]
    for f in FLAGS:
        arg = "" if f.kind == "switch" else (" gauss|fiber" if f.kind == "psf" else " v")
        unit = f" [{f.unit}]" if f.unit else ""
        dflt = f" (default {f.default})" if f.default else ""
        lines.append(f"  {' '.join(f.names) + arg:<44s} {f.help}{unit}{dflt}")
    lines.append("  -h, --help                                   this text")
    return "\n".join(lines)


def parse(argv: list[str]) -> dict:
    opts = dict(DEFAULTS)
    i = 0
    while i < len(argv):
        a = argv[i]
        f = _BY_NAME.get(a)
        if f is None:
            if a.startswith("-"):
                raise InputError(f"unknown flag '{a}' (see {PROG} -h)")
            if opts["floatfile"] is not None:
                raise InputError(f"unexpected argument '{a}'")
            opts["floatfile"] = a
            i += 1
            continue
        if f.kind == "switch":
            opts[f.key] = True
            i += 1
            continue
        if i + 1 >= len(argv):
            raise InputError(f"{a} expects a value")
        text = argv[i + 1]
        if f.kind == "str":
            opts[f.key] = text
        elif f.kind == "psf":
            if text not in ("gauss", "fiber", "fibre"):
                raise InputError(f"-psf expects gauss or fiber, got '{text}'")
            opts["psf"] = "fiber" if text == "fibre" else text
        elif f.key in ("seed", "calib_seed"):
            opts[f.key] = -int(number(text, "int", a))  # the original stores the negated seed
        elif f.key == "psf_fwhm":
            opts[f.key] = float(np.float32(number(text, "float", a) / 1e6))  # a float in the original
        else:
            v = number(text, f.kind, a)
            opts[f.key] = v * f.scale if f.kind == "float" else v
        i += 2
    _check(opts)
    return opts


def _check(o: dict) -> None:
    if o["floatfile"] is None:
        raise InputError(f"no input image: give -floatfile FILE (see {PROG} -h)")
    for key, flag in (("pixel", "-pixel"), ("gain", "-gain")):
        if o[key] <= 0:
            raise InputError(f"{flag} must be positive")
    for key, flag in (("readout", "-readout"), ("flicker", "-flicker"), ("calibration", "-calibration"),
                      ("psf_fwhm", "-psf_fwhm"), ("scale", "-scale"), ("fluence", "-fluence")):
        if o[key] < 0:
            raise InputError(f"{flag} must not be negative")
    if o["psf_radius"] < 0:
        raise InputError("-psf_radius must not be negative (0 chooses it from the photons)")
    if o["bits"] not in (16, 32):
        raise InputError("-bits must be 16 or 32")
    for key in ("detpixels", "xpixels", "ypixels"):
        if o[key] is not None and not 0 < o[key] <= 100000:
            raise InputError(f"-{'detpixels' if key == 'detpixels' else 'detpixels_' + key[0]} must be between 1 "
                             "and 100000")


def _read_header(path: str):
    from ..io.smv import read_smv_header, value_of
    text, _ = read_smv_header(path)
    vals = {k: value_of(text, k) for k in ("SIZE1", "SIZE2", "PIXEL_SIZE", "DISTANCE", "BEAM_CENTER_X",
                                           "BEAM_CENTER_Y")}
    return text.encode("latin-1"), vals


def _layout(o: dict, file_pixels: int, say):
    """(xpixels, ypixels, header bytes or None), with the original's guesses."""
    header = None
    x = o["xpixels"] if o["xpixels"] is not None else o["detpixels"]
    y = o["ypixels"] if o["ypixels"] is not None else o["detpixels"]
    x, y = x or 0, y or 0
    if o["header"] is not None:
        header, v = _read_header(o["header"])
        say(f"taking header from {o['header']}")
        if not (v["SIZE1"] >= 1 and v["SIZE2"] >= 1):
            raise InputError(f"{o['header']}: the header has no SIZE1/SIZE2")
        x, y = int(v["SIZE1"]), int(v["SIZE2"])
        if v["PIXEL_SIZE"] == v["PIXEL_SIZE"]:
            o["pixel"] = v["PIXEL_SIZE"] / 1000.0
        if v["DISTANCE"] == v["DISTANCE"]:
            o["distance"] = v["DISTANCE"] / 1000.0
        if v["BEAM_CENTER_X"] == v["BEAM_CENTER_X"]:
            o["Xbeam"] = v["BEAM_CENTER_X"] / 1000.0
        if v["BEAM_CENTER_Y"] == v["BEAM_CENTER_Y"]:
            o["Ybeam"] = o["pixel"] * y - v["BEAM_CENTER_Y"] / 1000.0
    if not x and not y:
        say("WARNING: guessing xy pixel dimensions.")
        x = int(math.sqrt(file_pixels))
        y = file_pixels // x if x else 0
        while x > 0 and file_pixels != x * y:
            x -= 1
            y = file_pixels // x if x else 0
        if file_pixels != x * y:
            x, y = file_pixels, 1
    if x and not y:
        y = file_pixels // x
    if y and not x:
        x = file_pixels // y
    if x * y == 0:
        raise InputError(f"{o['floatfile']} holds {file_pixels} pixels, too few for a {x}x{y} detector")
    return x, y, header


def _smv(header: bytes | None, o: dict, data: np.ndarray, x: int, y: int) -> bytes:
    if header is None:
        g = lambda v: "%g" % v  # noqa: E731
        typ = "unsigned_short" if o["bits"] == 16 else "long_integer"
        order = "little_endian" if sys.byteorder == "little" else "big_endian"
        text = (f"{{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER={order};\nTYPE={typ};\n"
                f"SIZE1={x};\nSIZE2={y};\nPIXEL_SIZE={g(o['pixel'] * 1000.0)};\nDISTANCE={g(o['distance'] * 1000.0)};\n"
                f"WAVELENGTH={g(o['lambda'])};\nBEAM_CENTER_X={g(o['Xbeam'] * 1000.0)};\n"
                f"BEAM_CENTER_Y={g((o['pixel'] * y - o['Ybeam']) * 1000)};\n"
                f"PHI={g(o['phi'])};\nOSC_START={g(o['phi'])};\nOSC_RANGE={g(o['osc'])};\n"
                "DETECTOR_SN=000;\nBEAMLINE=fake;\n}\f").encode("ascii")
        header = text + b" " * max(0, 512 - len(text))
    dt = "=u2" if o["bits"] == 16 else "=u4"
    return header + np.ascontiguousarray(data, dtype=dt).tobytes()


def run(argv: list[str], out=None) -> int:
    from .. import noisify as nz
    from ..io.atomic import atomic_write
    from ..io.pgm import pgm_file_bytes

    o = parse(argv)

    def say(line: str) -> None:
        print(line, file=out or sys.stdout)

    path = o["floatfile"]
    try:
        nbytes = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if os.path.isdir(path):
        raise InputError(f"cannot read {path}: it is a folder")
    file_pixels = nbytes // 4
    outputs = [o["intfile"]] + ([] if o["nopgm"] else [o["pgmfile"]]) + ([] if o["nonoise"] else [o["noisefile"]])
    for name in outputs:  # refuse before writing any of them
        folder = os.path.dirname(os.path.abspath(name))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise InputError(f"cannot write {name}: folder {os.path.dirname(name) or '.'} does not exist "
                             "or is not writable")
    say("noisify - add noise to pixels (torchbragg)")
    x, y, header = _layout(o, file_pixels, say)
    pixels = x * y
    if pixels > 200_000_000:
        raise InputError(f"{x}x{y} pixels is too large an image")
    if file_pixels < pixels:
        raise InputError(f"{path} holds {file_pixels} float pixels, fewer than the {x}x{y} detector needs")
    if file_pixels > pixels:
        print(f"{PROG}: warning: {path} holds {file_pixels} float pixels; using the first {pixels}", file=sys.stderr)
    floats = np.fromfile(path, dtype="<f4", count=pixels).astype(np.float32)
    say(f"importing {pixels} pixel intensites: {path}")
    if o["Xbeam"] is None:
        o["Xbeam"] = o["pixel"] * x / 2.0
    if o["Ybeam"] is None:
        o["Ybeam"] = o["pixel"] * y / 2.0
    if o["nonoise"]:
        o["calibration"] = o["readout"] = o["flicker"] = 0.0
    seed = o["seed"] if o["seed"] is not None else -int(time.time())
    psf = o["psf"] if o["psf"] and o["psf_fwhm"] > 0.0 else None

    say("  distance=%g detsize=%gx%g  pixel=%g meters (%dx%d pixels)" % (o["distance"], o["pixel"] * x,
                                                                           o["pixel"] * y, o["pixel"], x, y))
    say("  Xbeam=%g Ybeam=%g" % (o["Xbeam"], o["Ybeam"]))
    if o["psf"]:
        radius = "automatic" if o["psf_radius"] == 0 else "%d pixels" % o["psf_radius"]
        say("  %s PSF fwhm = %g um  rendering radius: %s" % ("Gaussian" if o["psf"] == "gauss" else "fiber",
                                                              o["psf_fwhm"] * 1e6, radius))
    for line in ("  seed: %d" % seed, "  calibration noise seed: %d" % o["calib_seed"],
                 "  calibration_noise = %g %%" % (o["calibration"] * 100), "  input file scale = %g" % o["scale"],
                 "  readout_noise = %g ADU" % o["readout"], "  flicker_noise = %g %%" % (o["flicker"] * 100),
                 "  quantum_gain = %g ADU/photon" % o["gain"], "  adc_offset = %g ADU" % o["adc"], ""):
        say(line)

    neg = floats < 0
    if neg.any():
        print(f"{PROG}: warning: {int(neg.sum())} negative pixels in {path}", file=sys.stderr)
    bad = ~np.isfinite(floats)
    if bad.any():
        print(f"{PROG}: warning: {int(bad.sum())} NaN or infinite pixels in {path} (they read 0)", file=sys.stderr)
    max_i = max(0.0, float(floats.max()))
    factor = (o["fluence"] * R_E_SQR) * o["scale"]
    photons = (factor * floats.astype(np.float64)).astype(np.float32).reshape(y, x)
    say("maximum value in input file: %g ( %g on photon scale)" % (max_i, max_i * o["scale"] * o["fluence"] * R_E_SQR))
    fwhm_pixels = o["psf_fwhm"] / o["pixel"]
    if o["nonoise"] and psf:
        say("  applying PSF to noiseless image width = %g pixels" % fwhm_pixels)
        photons = nz.apply_psf(photons, psf, fwhm_pixels, o["psf_radius"], say)

    files: dict[str, bytes] = {}
    adu = photons.astype(np.float64) * o["gain"] + o["adc"]
    adu = np.minimum(adu, 2147483647.0)
    # the noiseless image is clipped at 65535 whatever the bits
    adu = np.minimum(adu, 65535.0)
    ints = nz.to_uint16(adu) if o["bits"] == 16 else nz.to_uint32(adu)
    files[o["intfile"]] = _smv(header, o, ints, x, y)
    say("writing %s as %d %d-byte integers" % (o["intfile"], pixels, o["bits"] // 8))
    if not o["nopgm"]:
        u16 = nz.to_uint16(adu)
        files[o["pgmfile"]] = pgm_file_bytes(np.minimum(u16, 255).astype(np.uint8).reshape(y, x), 1.0)
        say("writing %s as 1-byte integers" % o["pgmfile"])

    if not o["nonoise"]:
        counts, total, streams = nz.photon_noise(photons, seed, o["calib_seed"], o["flicker"], o["calibration"])
        if psf:
            say("%.0f photons on noise image before PSF" % total)
            say("  applying PSF width = %g um" % (o["psf_fwhm"] * 1e6))
            counts = nz.apply_psf(counts, psf, fwhm_pixels, o["psf_radius"], say)
        total = float(np.cumsum(counts.reshape(-1), dtype=np.float64)[-1]) if pixels else 0.0
        adu = counts.reshape(-1).astype(np.float64) * o["gain"] + o["adc"]
        if o["readout"] > 0.0:
            adu = adu + streams.read_noise(pixels, o["readout"])
        over32 = adu > 2147483647.0
        adu = np.where(over32, 2147483647.0, adu)
        over16 = adu > 65535.0
        if o["bits"] == 16:
            noisy, overloads = nz.to_uint16(np.where(over16, 65535.0, adu)), int(over16.sum())
        else:
            noisy, overloads = nz.to_uint32(adu), int(over32.sum())
        say("%.0f photons on noise image (%d overloads)" % (total, overloads))
        files[o["noisefile"]] = _smv(header, o, noisy.reshape(y, x), x, y)
        say("writing %s as %d-byte integers" % (o["noisefile"], o["bits"] // 8))
    for name, data in files.items():
        atomic_write(name, data)
    return 0


# detector-response flags of `torchbragg simulate`: flag -> (DetectorResponse argument, factor)
RESPONSE_FLAGS = {"-psf_fwhm": ("psf_fwhm", 1e-3), "-psf_radius": ("psf_radius", None), "-gain": ("gain", 1.0),
                  "-adc_offset": ("adc_offset", 1.0), "-readout": ("readout_noise", 1.0),
                  "-calibration_noise": ("calibration_noise", 0.01), "-overload": ("overload", 1.0)}


def split_response_flags(flags: list[str], command: str) -> tuple[list[str], dict | None]:
    """Take the detector-response flags out of nanoBragg ``flags``; returns
    (the other flags, DetectorResponse arguments or None when none was
    given). -psf_fwhm is in microns (stored in mm), -calibration_noise in percent."""
    rest, kw, i = [], {}, 0
    while i < len(flags):
        a = flags[i]
        if a != "-psf" and a not in RESPONSE_FLAGS:
            rest.append(a)
            i += 1
            continue
        if i + 1 >= len(flags):
            raise InputError(f"{a} expects a value")
        text = flags[i + 1]
        if a == "-psf":
            if text not in ("gauss", "fiber"):
                raise InputError(f"-psf expects gauss or fiber, got '{text}'")
            kw["psf"] = text
        else:
            key, factor = RESPONSE_FLAGS[a]
            v = number(text, "int" if factor is None else "float", a)
            if v < 0 or (a in ("-gain", "-overload") and v == 0):
                raise InputError(f"{a} must be {'positive' if a in ('-gain', '-overload') else 'non-negative'}")
            kw[key] = v if factor is None else v * factor
        i += 2
    if not kw:
        return rest, None
    if ("psf_fwhm" in kw or "psf_radius" in kw) and "psf" not in kw:
        raise InputError("-psf_fwhm and -psf_radius need -psf gauss|fiber")
    if "psf" in kw:
        kw.setdefault("psf_fwhm", 0.046)
        if kw["psf_fwhm"] <= 0:
            raise InputError("-psf_fwhm must be positive")
        if kw.get("psf_radius") == 0:
            kw.pop("psf_radius")
    return rest, kw


def main(argv: list[str] | None = None) -> int:
    from .nanobragg import companion_main
    return companion_main(PROG, argv, help_text, run)


if __name__ == "__main__":
    sys.exit(main())
