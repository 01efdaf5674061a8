from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.report.claims_md import write_claims  # noqa: E402

results = write_claims(snakemake.input.tables, snakemake.output[0],  # noqa: F821
                       snakemake.input.get("benchmark"), snakemake.params.preset,  # noqa: F821
                       snakemake.input.predictions)  # noqa: F821
for claim, verdict in results:
    print(f"({claim.key}) {verdict.verdict}")
