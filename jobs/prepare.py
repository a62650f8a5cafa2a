"""Ray job entry point for `uae-ray prepare`.

    ray job submit --working-dir . -- python jobs/prepare.py --run-dir DIR --config F
"""

import sys

from uae_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
