"""Ray job entry point for `uae-ray mine`.

    ray job submit --working-dir . -- python jobs/mine.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["mine", *sys.argv[1:]]))
