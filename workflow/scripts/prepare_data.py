from privtune.io import log_to

log_to(snakemake)  # noqa: F821
from privtune.prep import prepare  # noqa: E402

spec = snakemake.params.spec  # noqa: F821
part = snakemake.wildcards.part  # noqa: F821
n = prepare(snakemake.wildcards.task, spec[f"{part}_split"], snakemake.params.data_dir,  # noqa: F821
            snakemake.output[0], spec.get(f"{part}_size"), spec.get("sample_seed", 0),  # noqa: F821
            spec.get("k_shot_seed"), spec.get("verify_size", True))
print(f"wrote {n} records to {snakemake.output[0]}")  # noqa: F821
