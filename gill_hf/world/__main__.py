"""`python -m gill_hf.world <command>`: see gill_hf.world.cli."""

from .cli import main

if __name__ == "__main__":
    main()
