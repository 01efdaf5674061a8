from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.dp.audit import main  # noqa: E402

if main([*snakemake.input, "--out", snakemake.output[0]]):  # noqa: F821
    raise SystemExit("the privacy audit failed: see the FAILED lines above")
