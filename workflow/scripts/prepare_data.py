from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.data.prep import prepare  # noqa: E402

s = snakemake.params.spec  # noqa: F821
n = prepare(snakemake.wildcards.task, s["split"], snakemake.params.data_dir, snakemake.output[0],  # noqa: F821
            s["size"], s["seed"], s["k_shot_seed"], s["verify_size"])
print(f"wrote {n} records to {snakemake.output[0]}")  # noqa: F821
