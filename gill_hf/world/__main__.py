"""`python -m gill_hf.world <command>`: the same as `gill-hf world <command>` (see gill_hf.world.cli)."""

import sys

from ..cli import main

if __name__ == "__main__":
    main(["world", *sys.argv[1:]])
