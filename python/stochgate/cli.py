"""The `stochgate` console command: `stochgate info`, `stochgate demo`, `stochgate bench ...`,
`stochgate reproduce ...`. Each subcommand's own options: `stochgate <subcommand> --help`."""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "info": ("stochgate.info", "print what the compiled extension was built with"),
    "demo": ("stochgate.demo", "train a small gated network with each estimator"),
    "bench": ("stochgate.bench", "measure conditional-computation speedups"),
    "reproduce": ("stochgate.reproduce", "the paper's MNIST experiment with measured speedups"),
}


def _usage() -> str:
    lines = ["usage: stochgate <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in _COMMANDS:
        print(f"stochgate: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
