"""``python -m llmagogy_ds.train --run-dir RUN --stage NAME``: one rank of a stage (torchrun, srun)."""
import sys

from llmagogy_ds.train.loop import main

sys.exit(main())
