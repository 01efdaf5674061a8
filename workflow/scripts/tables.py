from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.report.tables import write_tables  # noqa: E402

out = snakemake.output  # noqa: F821
write_tables(snakemake.input, snakemake.wildcards.paper, out.md, out.csv, out.tex)  # noqa: F821
