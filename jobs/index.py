"""Ray job entry point for `uae-ray index`.

    ray job submit --working-dir . -- python jobs/index.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["index", *sys.argv[1:]]))
