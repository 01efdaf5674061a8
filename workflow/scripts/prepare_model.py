from pathlib import Path

from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.models.prepare import prepare_model  # noqa: E402

info = prepare_model(snakemake.wildcards.model, snakemake.params.spec,  # noqa: F821
                     Path(snakemake.output[0]), Path(snakemake.params.cache))  # noqa: F821
print(info)
