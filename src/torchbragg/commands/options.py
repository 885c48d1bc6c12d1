"""Option handling shared by the torchbragg subcommands (simulate, refine)."""

from __future__ import annotations

from ..errors import InputError
from ..flags import GEOMETRY_FLAGS


def split_options(argv: list[str], opts: dict, valued, switches, command: str, max_positional=None,
                  optional=None) -> list[str]:
    """Fill `opts` from the command's --options found anywhere in `argv`:
    `valued` take the next word, `switches` none, `optional` maps an option
    to (test of the next word, value when it fails the test). Words before the
    first nanoBragg flag are returned as positionals (up to `max_positional`);
    the rest, nanoBragg flags and their values, go to opts["flags"]."""
    positionals, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in valued:
            if i + 1 >= len(argv):
                raise InputError(f"{a} expects a value")
            opts[a[2:].replace("-", "_")] = argv[i + 1]
            i += 2
            continue
        if optional and a in optional:
            takes, default = optional[a]
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            opts[a[2:]] = nxt if takes(nxt) else default
            i += 2 if takes(nxt) else 1
            continue
        if a in switches:
            opts[a[2:]] = True
        elif a.startswith("--"):
            raise InputError(f"unknown option '{a}' (see torchbragg {command} -h)")
        elif (not opts["flags"] and not a.startswith("-")
              and (max_positional is None or len(positionals) < max_positional)):
            positionals.append(a)
        else:
            opts["flags"].append(a)  # nanoBragg flags and their values
        i += 1
    return positionals


def refuse_geometry(flags: list[str]) -> None:
    refused = [f for f in flags if f in GEOMETRY_FLAGS]
    if refused:
        raise InputError(f"{refused[0]} is held by the experiment file; edit the experiment to change it")
