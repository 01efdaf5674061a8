from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.report.figures import FIGURES  # noqa: E402

FIGURES[snakemake.wildcards.figure](list(snakemake.input), snakemake.output.png)  # noqa: F821
