import sys

from .cli import main

# Guarded: `extproc serve --workers N` spawns workers, which import the parent's __main__ again.
if __name__ == "__main__":
    sys.exit(main())
