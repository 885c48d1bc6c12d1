"""The `torchbragg` command: demo, bench and gradcheck."""

from __future__ import annotations

import os
import sys

USAGE = """usage: torchbragg COMMAND [options]

commands:
  demo [--out DIR]        render a default case; writes float, SMV, noise and PNG images
  gradcheck [--out DIR]   run the gradient audit and write an evidence bundle
  bench [options]         run the benchmark table (scripts/bench.py)
  simulate EXPT --out P   render the images of a DIALS experiment (see `torchbragg simulate -h`)
  refine EXPT IMG --out D refine an experiment's models against an image (see `torchbragg refine -h`)
  render FLAGS...         same as `nanoBragg FLAGS...`
"""

DEMO_ARGS = ["-cell", "78", "78", "38", "90", "90", "90", "-default_F", "100", "-N", "8",
             "-lambda", "1.0", "-distance", "120", "-detpixels", "512", "-pixel", "0.1",
             "-misset", "10", "20", "30", "-mosaic", "0.2", "-mosaic_dom", "4", "-mosaic_seed", "7",
             "-water", "0.01", "-seed", "1", "-oversample", "1"]


def demo(argv: list[str]) -> int:
    out = "out/demo"
    if argv[:1] == ["--out"] and len(argv) > 1:
        out = argv[1]
    elif argv:
        print("usage: torchbragg demo [--out DIR]", file=sys.stderr)
        return 2
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        print(f"torchbragg: error: cannot create the folder {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    from .nanobragg import main as nanobragg
    files = {"-floatfile": "demo.bin", "-intfile": "demo.img", "-noisefile": "noise.img",
             "-pgmfile": "demo.pgm"}
    args = list(DEMO_ARGS)
    for flag, name in files.items():
        args += [flag, os.path.join(out, name)]
    print("nanoBragg " + " ".join(args))
    rc = nanobragg(args)
    if rc != 0:
        return rc
    import numpy as np

    from ..errors import InputError
    from ..io.png import preview, write_png
    try:
        image = np.fromfile(os.path.join(out, "demo.bin"), "<f4").reshape(512, 512)
        write_png(os.path.join(out, "demo.png"), preview(image))
    except (OSError, ValueError) as exc:  # InputError is a ValueError
        reason = exc if isinstance(exc, InputError) else f"cannot write the PNG preview: {exc}"
        print(f"torchbragg: error: {reason}", file=sys.stderr)
        return 2
    print()
    print(f"demo images written to {os.path.abspath(out)}:")
    for name in ("demo.bin", "demo.img", "noise.img", "demo.pgm", "demo.png"):
        print(f"  {os.path.join(os.path.abspath(out), name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return demo(rest)
    if cmd == "gradcheck":
        from .gradcheck import main as gradcheck
        return gradcheck(rest)
    if cmd == "simulate":
        from .simulate import main as simulate
        return simulate(rest)
    if cmd == "refine":
        from .refine import main as refine
        return refine(rest)
    if cmd == "render":
        from .nanobragg import main as nanobragg
        return nanobragg(rest)
    if cmd == "bench":
        import runpy
        script = os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts", "bench.py")
        if not os.path.exists(script):
            print("torchbragg bench needs the source checkout (scripts/bench.py)", file=sys.stderr)
            return 2
        sys.argv = [script] + rest
        runpy.run_path(script, run_name="__main__")
        return 0
    print(f"torchbragg: unknown command '{cmd}'\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
