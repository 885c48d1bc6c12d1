"""What a run writes: the float image, the SMV and PGM images, the noise image
and the original's end-of-run report. Like the original, a run writes
floatimage.bin, intimage.img, image.pgm and noiseimage.img unless told
otherwise (-nopgm, -nonoise); every file is written whole or not at all."""

from __future__ import annotations


import numpy as np
import torch

from . import stats
from .io.atomic import atomic_write
from .io.smv import SMVGeometry, header_text, smv_bytes
from .units import DEG
from .validate import output_paths



def run_smv_geometry(sim, info) -> SMVGeometry:
    """The values an SMV header of the original carries, in metres and radians."""
    panel = sim.detector.panels[0]
    with torch.no_grad():
        g = {k: float(v) if v.dim() == 0 else v.cpu().tolist()
             for k, v in panel.frame.geometry(sim.beam.incident()).items()}
        px = float(panel.pixel_size[0]) / 1000.0
        phi0, osc = (x * DEG for x in info.phi_range)
        twotheta = float(panel.frame.twotheta) * DEG
    pix0 = [x / 1000.0 for x in g["pix0"]]
    return SMVGeometry(
        fpixels=panel.fpixels, spixels=panel.spixels, pixel_size=px, distance=g["distance"] / 1000.0,
        wavelength=float(sim.beam.wavelength) / 1e10, Xbeam=info.beam_center[0] / 1000.0,
        Ybeam=info.beam_center[1] / 1000.0, Fbeam=g["Fbeam"] / 1000.0, Sbeam=g["Sbeam"] / 1000.0,
        detsize_s=info.detsize[1] / 1000.0,
        dials_origin=(1000.0 * pix0[2], 1000.0 * pix0[1], -1000.0 * pix0[0]),
        ORGX=g["Fclose"] / 1000.0 / px + 0.5, ORGY=g["Sclose"] / 1000.0 / px + 0.5,
        close_distance=g["close_distance"] / 1000.0, phi0=phi0, osc=osc, twotheta=twotheta)


def pixel_printout(img: np.ndarray, roi, pixel=None) -> list[str]:
    """`fast slow : value` for one pixel (-printout_pixel) or every ROI pixel (-printout)."""
    if pixel is not None:
        f, s = pixel
        if not (0 <= f < img.shape[1] and 0 <= s < img.shape[0]):
            return [f"pixel {f} {s} is outside the {img.shape[1]}x{img.shape[0]} detector"]
        return ["%4d %4d : pixel %15.10g" % (f, s, img[s, f])]
    xmin, xmax, ymin, ymax = roi
    return ["%4d %4d : pixel %15.10g" % (f, s, img[s, f])
            for s in range(ymin, min(ymax, img.shape[0] - 1) + 1)
            for f in range(xmin, min(xmax, img.shape[1] - 1) + 1)]


def write_all(sim, info, image, out) -> None:
    cfg = info.config
    o = cfg.output
    panel = sim.detector.panels[0]
    roi = info.roi
    paths = output_paths(cfg)
    img = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())

    if o.printout:
        for line in pixel_printout(img, roi, o.printout_pixel):
            print(line, file=out)
    print(f"writing {paths['floatfile']} as {img.size} 4-byte floats", file=out)
    atomic_write(paths["floatfile"], img.astype("<f4").tobytes())

    mask = None if panel.mask is None else panel.mask.cpu().numpy()
    st = stats.image_statistics(img, roi=roi, mask=mask, pixel_size_m=float(panel.pixel_size[0]) / 1000.0,
                                oversample=sim.oversample, omp_threads=2)
    scale = stats.intfile_scale(o.int_scale, st.max_I)
    for line in stats.format_report(st, scale):
        print(line, file=out)
    geometry = run_smv_geometry(sim, info)
    ints = stats.int_image(img, scale, o.adc_offset, roi=roi, max_I=st.max_I)
    print(f"writing {paths['intfile']} as 2-byte integers", file=out)
    atomic_write(paths["intfile"], smv_bytes(ints, header_text(geometry, denzo_sign=-1.0)))

    if "pgmfile" in paths:
        from .io.pgm import pgm_file_bytes
        pscale = stats.pgm_scale(o.pgm_scale, scale, st.rmsd)
        for line in stats.format_report(pgm_scale_value=pscale):
            print(line, file=out)
        print(f"writing {paths['pgmfile']} as 1-byte integers", file=out)
        atomic_write(paths["pgmfile"], pgm_file_bytes(stats.pgm_bytes(img, pscale, roi=roi), pscale))

    if "noisefile" in paths:
        from .noise import noise_image
        noisy, photons, overloads = noise_image(img, info.noise_seed, o.adc_offset, roi=roi)
        for line in stats.format_report(photons=photons, overloads=overloads):
            print(line, file=out)
        print(f"writing {paths['noisefile']} as 2-byte integers", file=out)
        atomic_write(paths["noisefile"], smv_bytes(noisy, header_text(geometry, denzo_sign=1.0)))
