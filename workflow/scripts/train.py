from pathlib import Path

from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.training.gpus import claim  # noqa: E402

claim(snakemake.resources.get("gpu", 0))  # noqa: F821  (lock this job's GPUs before CUDA starts)
from privtune.training.loop import RunSettings, run  # noqa: E402

out = Path(snakemake.output.privacy).parent  # noqa: F821
mask = snakemake.input.get("mask")  # noqa: F821
result = run(RunSettings(**snakemake.params.settings), Path(snakemake.input.model),  # noqa: F821
             Path(snakemake.input.train), out, Path(mask) if mask else None)  # noqa: F821
print({"epsilon": result["privacy"]["epsilon"], "final_loss": result["train"].get("final_loss")})
