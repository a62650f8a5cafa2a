"""Ray job entry point for `uae-ray label`.

    ray job submit --working-dir . -- python jobs/label.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["label", *sys.argv[1:]]))
