"""The drop-in `nanoBragg` command: flags in, images and the original's report out.

torch is imported only once a render is certain, so `-h` and argument errors
answer at once.
"""

from __future__ import annotations

import sys

from ..errors import InputError



def _g(x) -> str:
    return "%g" % x


def _vec(v) -> str:
    return " ".join(_g(float(x)) for x in v)


def geometry_report(sim, info) -> list[str]:
    """The derived-geometry lines of the original's report, same words and
    numbers, plus the detector origin (pix0) which it leaves implicit."""
    import torch

    from ..outputs import run_smv_geometry

    beam, xtal, opt = sim.beam, sim.crystal, sim.options
    panel = sim.detector.panels[0]
    mount = panel.frame
    cfg = info.config
    lines = []
    with torch.no_grad():
        g = {k: v.cpu() for k, v in mount.geometry(beam.incident()).items()}
        mm = {k: g[k] / 1000.0 for k in ("pix0", "Fbeam", "Sbeam", "Fclose", "Sclose", "distance")}
        lines.append(f"{info.convention.lower()} convention selected.")
        lines.append("pivoting detector around sample" if mount.pivot == "SAMPLE"
                     else "pivoting detector around direct beam spot")
        b = g["beam"]
        lines.append("XDS incident beam: " + _vec([float(b @ g["fdet"]), float(b @ g["sdet"]), float(b @ g["odet"])]))
        if info.auto_interpolate:
            lines.append("auto-selected tricubic interpolation of structure factors" if min(cfg.crystal.N) <= 2
                         else "auto-selected no interpolation")
        real = xtal.real_vectors().double().cpu()
        recip = xtal.reciprocal_vectors().double().cpu()
        lengths = torch.linalg.norm(real, dim=-1)
        rl = torch.linalg.norm(recip, dim=-1)

        def angle(u, v):
            return float(torch.rad2deg(torch.arccos(torch.clamp(u @ v / torch.linalg.norm(u) / torch.linalg.norm(v), -1, 1))))

        lines.append("Unit Cell: " + _vec([*lengths.tolist(), angle(real[1], real[2]), angle(real[0], real[2]),
                                            angle(real[0], real[1])]))
        lines.append("Recp Cell: " + _vec([*rl.tolist(), angle(recip[1], recip[2]), angle(recip[0], recip[2]),
                                            angle(recip[0], recip[1])]))
        lines.append("volume = %g A^3" % float(xtal.volume()))
        lines.append("real-space cell vectors (Angstrom):")
        lines.append("     %-10s  %-10s  %-10s" % ("a", "b", "c"))
        for i, ax in enumerate("XYZ"):
            lines.append("%s: %11.8f %11.8f %11.8f" % (ax, real[0, i], real[1, i], real[2, i]))
        lines.append("reciprocal-space cell vectors (Angstrom^-1):")
        lines.append("     %-10s  %-10s  %-10s" % ("a_star", "b_star", "c_star"))
        for i, ax in enumerate("XYZ"):
            lines.append("%s: %11.8f %11.8f %11.8f" % (ax, recip[0, i], recip[1, i], recip[2, i]))
        n = xtal.N.double().cpu()
        lines.append("crystal is %g x %g x %g microns" % tuple((lengths * n * 1e-4).tolist()))
        if sim.oversample_auto:
            lines.append("auto-selected %d-fold oversampling" % sim.oversample)
        incident, lam = beam.sources()
        lines.append("  created a total of %d sources:" % lam.numel())
        lines.append("  created a total of %d mosaic domains" % xtal.mosaic_domains)
        lines.append("  %d initialized hkls (all others =%g)" % (info.hkl_count, cfg.crystal.default_F))
        lines.append("  wave=%g meters +/- %g%% in %d steps" % (float(beam.wavelength) * 1e-10,
                                                              float(beam.dispersion) * 100, beam.dispersion_steps))
        lines.append("  Kahn polarization factor: %f" % float(beam.kahn_factor()) if opt.polarization
                     else "  polarization effect disabled")
        lines.append("  incident fluence: %g photons/m^2" % float(beam.fluence))
        px = float(panel.pixel_size[0]) * 1e-3
        lines.append("  distance=%g detsize=%gx%g  pixel=%g meters (%dx%d pixels)"
                     % (float(mm["distance"]), info.detsize[0] * 1e-3, info.detsize[1] * 1e-3, px,
                        panel.fpixels, panel.spixels))
        lines.append("  sensor is %g m thick in %d layers with mu= %g"
                     % (float(panel.thickness) * 1e-3, max(opt.sensor_layers, 1), info.mu_reported))
        lines.append("  Xbeam=%g Ybeam=%g" % tuple(x * 1e-3 for x in info.beam_center))
        lines.append("  Fbeam=%g Sbeam=%g" % (float(mm["Fbeam"]), float(mm["Sbeam"])))
        lines.append("  Xclose=%g Yclose=%g" % tuple(x * 1e-3 for x in info.near_point))
        lines.append("  Fclose=%g Sclose=%g" % (float(mm["Fclose"]), float(mm["Sclose"])))
        lines.append("  DIRECTION_OF_DETECTOR_X-AXIS= " + _vec(g["fdet"]))
        lines.append("  DIRECTION_OF_DETECTOR_Y-AXIS= " + _vec(g["sdet"]))
        lines.append("  DIRECTION_OF_DETECTOR_Z-AXIS= " + _vec(g["odet"]))
        lines.append("  INCIDENT_BEAM_DIRECTION= " + _vec(g["beam"]))
        lines.append("  spindle ROTATION_AXIS= " + _vec(sim.goniometer.rotation_axis.cpu()))
        lines.append("  POLARIZATION_PLANE_NORMAL= " + _vec(beam.polarization_normal.cpu()))
        header = run_smv_geometry(sim, info)  # the same derived values the image headers carry
        lines.append("  dials origin= " + _vec(header.dials_origin))
        lines.append("  pix0_vector= " + _vec(mm["pix0"]))
        lines.append("  XDS ORGX=%g ORGY=%g" % (header.ORGX, header.ORGY))
        lines.append("  roi: %d < x < %d && %d < y < %d" % info.roi)
        div = info.divergence
        lines.append("  hdivrange=%g hdivstep=%g  radians" % (div["h"]["range"], div["h"]["step"]))
        lines.append("  vdivrange=%g vdivstep=%g  radians" % (div["v"]["range"], div["v"]["step"]))
        lines.append("  %d divergence steps" % info.n_divergence)
        lines.append("  %d sources" % lam.numel())
        lines.append("  %d mosaic domains over mosaic spread of %g degrees"
                     % (xtal.mosaic_domains, float(xtal.mosaic_spread)))
        phi0, osc = info.phi_range
        lines.append("  %d phi steps from %g to %g degrees" % (opt.phisteps, phi0, phi0 + osc))
        extra = "".join(s for s, on in ((" +thick", opt.oversample_thick), (" +polar", opt.oversample_polar),
                                        (" +omega", opt.oversample_omega)) if on)
        lines.append("  %dx%d pixel oversample steps%s" % (sim.oversample, sim.oversample, extra))
        if panel.mask is not None:
            lines.append("  skipping zero-flagged pixels in %s" % cfg.detector.mask_file)
        if cfg.output.calculate_noise:
            lines += ["", "  noise image paramters:", "  seed: %d" % info.noise_seed,
                      "  water droplet size: %g m" % float(beam.water_size)]
    return lines


def run(argv: list[str], out=None) -> int:
    """Parse, render, write the outputs and print the report. Raises InputError."""
    out = out or sys.stdout
    from ..flags import parse_args
    from ..validate import check_config, check_writable
    cfg = parse_args(argv)  # bad flags, files and geometry fail fast, before torch is imported
    check_config(cfg)
    check_writable(cfg)

    import torch

    from .. import outputs
    from ..build.nanobragg import models_from_args
    from ..simulator import Simulator

    # the command renders in float64 unless told otherwise: its files then equal the original's byte for byte
    dtype = None if "-dtype" in argv else torch.float64
    models, info = models_from_args(argv, dtype=dtype, write_dump=True)
    sim = Simulator(**models).to(info.dtype)
    for line in info.messages:
        print(line, file=sys.stderr if is_warning(line) else out)
    for line in geometry_report(sim, info):
        print(line, file=out)
    progress = None
    if info.config.output.progress:
        def progress(done, total):
            print("%d%% done" % (100 * done // max(total, 1)), file=out, flush=True)
    with torch.no_grad():
        image = sim.render(progress=progress)[0]
        check_image(image)  # before any file is written
    outputs.write_all(sim, info, image, out)
    if info.config.output.write_expt:
        from ..build.nanobragg import write_experiment
        write_experiment(info.config.output.write_expt, argv, info)
        print(f"writing {info.config.output.write_expt} (DIALS experiment list)", file=out)
    return 0


def is_warning(line: str) -> bool:
    """Warnings and notes go to stderr; the report stays on stdout."""
    return line.startswith(("WARNING", "note:"))


def check_image(image) -> None:
    """Never write a non-finite or negative image: say what went wrong instead."""
    import torch
    # the float file holds 4-byte floats: a float64 pixel beyond their range would be written as infinity
    bad = int((~torch.isfinite(image) | (image.abs() > torch.finfo(torch.float32).max)).sum())
    if bad:
        raise InputError(f"the rendered image has {bad} NaN or infinite pixels (as 4-byte floats): the "
                         "intensities overflow or the inputs are degenerate; lower -default_F, -fluence or the "
                         "structure factors")
    if bool((image < 0).any()):
        raise InputError("the rendered image has negative pixels: check the detector geometry "
                         "(-twotheta, -detector_rotx/y/z, detector vectors)")


MEMORY_MESSAGE = "not enough memory for this detector; try a smaller -roi or fewer pixels"


def _allocation_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                   "could not allocate", "failed to allocate"))


def companion_main(prog: str, argv: list[str] | None, help_text, run) -> int:
    """The entry point of a companion program (nonBragg, noisify): -h or no
    arguments print the help, anything else runs guarded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "-help") for a in argv):
        print(help_text())
        return 0 if argv else 2
    return guarded(prog, lambda: run(argv))


def guarded(prog: str, fn) -> int:
    """Run a command; bad input, memory and device failures become one line
    on stderr and an exit status."""
    try:
        return fn()
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: {MEMORY_MESSAGE}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # torch.OutOfMemoryError and allocator or device failures
        if _allocation_failure(exc):
            print(f"{prog}: error: {MEMORY_MESSAGE}", file=sys.stderr)
            return 3
        text = str(exc).strip().splitlines()
        if text and any(w in text[0] for w in ("CUDA", "cuda", "device", "MPS")):
            print(f"{prog}: error: the device failed: {text[0][:200]}", file=sys.stderr)
            return 2
        raise


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or any(a in ("-h", "--help", "-help") for a in argv):
        from ..flags import help_text
        print(help_text())
        return 0 if argv else 2
    return guarded("nanoBragg", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
