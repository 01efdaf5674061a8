import os
import sys

from privtune.io import log_to

log_to(snakemake)  # noqa: F821
os.environ["PRIVTUNE_BENCH_THREADS"] = str(snakemake.threads)  # noqa: F821
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the subprocesses import privtune too
from privtune.bench.clipping import main  # noqa: E402

main([*snakemake.params.args, "--out", snakemake.output.json])  # noqa: F821
