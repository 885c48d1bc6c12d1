"""Shared by the file-format tests: small experiment lists built from plain
dictionaries, and the miniCBF header dictionary as dxtbx's reader builds it."""

from torchbragg.io.dials import experiments_from_dict


def experiment(detector, goniometer=None, scan=None, direction=(0.0, 0.0, 1.0)):
    """One experiment of a detector dictionary (and a goniometer and scan)."""
    doc = {"experiment": [{"beam": 0, "detector": 0}],
           "beam": [{"direction": list(direction), "wavelength": 0.9795, "polarization_normal": [0.0, 1.0, 0.0],
                     "polarization_fraction": 0.999}],
           "detector": [detector]}
    if goniometer is not None:
        doc["goniometer"], doc["experiment"][0]["goniometer"] = [goniometer], 0
    if scan is not None:
        doc["scan"], doc["experiment"][0]["scan"] = [scan], 0
    return experiments_from_dict(doc)[0]


def parse_minicbf_header(contents: str) -> dict:
    """The mini-header's '# Name value' records (and its timestamp line) as dxtbx's miniCBF reader reads them."""
    out = {}
    for record in contents.replace("\r\n", "\n").split("\n"):
        if record[:1] != "#":
            continue
        if len(record[1:].split()) <= 2 and record.count(":") == 2:
            out["timestamp"] = record[1:].strip()
            continue
        tokens = record.replace("=", "").replace(":", "").split()
        out[tokens[1]] = " ".join(tokens[2:])
    return out
