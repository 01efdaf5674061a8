from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.tasks import register_config_tasks  # noqa: E402

register_config_tasks(snakemake.config)  # noqa: F821  (a user's own datasets join the task registry)
from privtune.training.gpus import claim  # noqa: E402

claim(snakemake.resources.get("gpu", 0))  # noqa: F821  (lock this job's GPUs before CUDA starts)
from privtune.childtuning.fisher import compute_mask_file  # noqa: E402

info = compute_mask_file(snakemake.input.model, snakemake.input.data, snakemake.output[0],  # noqa: F821
                         **snakemake.params.settings)  # noqa: F821
print(info)
