"""``python train.py fit|validate|test ...``: a thin alias of ``memcurve fit|validate|test`` (:mod:`memcurve.cli`)."""

from __future__ import annotations

import sys

from memcurve.cli import TRAINER_COMMANDS, main, usage

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TRAINER_COMMANDS:
        print(f"train.py runs {'|'.join(TRAINER_COMMANDS)}; the analysis commands are memcurve's:\n\n{usage()}")
        raise SystemExit(2)
    main(sys.argv[1:])
