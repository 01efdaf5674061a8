from pathlib import Path

from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.training.gpus import claim  # noqa: E402

claim(snakemake.resources.get("gpu", 0))  # noqa: F821  (lock this job's GPUs before CUDA starts)
from privtune.evaluate import evaluate  # noqa: E402

spec = snakemake.params.spec  # noqa: F821
row = evaluate(Path(snakemake.input.model).parent, Path(snakemake.input.eval), Path(snakemake.output.metrics),  # noqa: F821
               spec["kind"], spec["task"], spec["meta"], spec["generation"], spec["metrics"],
               threads=snakemake.threads,  # noqa: F821
               mismatched_file=Path(snakemake.input.mismatched[0]) if snakemake.input.mismatched else None)  # noqa: F821
print(row["metrics"])
