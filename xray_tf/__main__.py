"""``python -m xray_tf``: the commands; ``python -m xray_tf COMMAND [FLAGS]`` runs one (as ``xray-COMMAND``)."""

import importlib
import sys

from xray_tf.cli import COMMANDS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        known = "" if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") else f"Unknown command {sys.argv[1]!r}.\n"
        listing = "\n".join(f"  {name:<16} {about}  (xray-{name})" for name, (_, about) in COMMANDS.items())
        print(f"{known}usage: python -m xray_tf COMMAND [FLAGS]   (COMMAND --help lists its flags)\n\n{listing}")
        sys.exit(2 if known else 0)
    module, _ = COMMANDS[sys.argv[1]]
    sys.argv = [f"xray-{sys.argv[1]}", *sys.argv[2:]]
    importlib.import_module(module).main()


if __name__ == "__main__":
    main()
