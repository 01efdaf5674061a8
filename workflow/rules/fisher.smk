# Child-Tuning_D: Fisher information over the training set (or public data, or with DP noise),
# top-p_D mask, computed once per (task, model, source, p_D, seed) and reused by every run that needs it.
rule fisher_mask:
    input:
        model="results/models/{model}",
        data=lambda wc: fisher_data(config, wc.task, wc.model, wc.source),
    output:
        "results/fisher/{task}/{model}/{source}/pd~{pd}/seed~{seed}/mask.pt",
    log:
        "logs/fisher_mask/{task}/{model}/{source}/pd~{pd}/seed~{seed}.log",
    benchmark:
        "benchmarks/fisher_mask/{task}/{model}/{source}/pd~{pd}/seed~{seed}.tsv"
    params:
        settings=lambda wc: fisher_settings(config, wc.task, wc.model, wc.source, float(wc.pd), int(wc.seed)),
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
        slurm_partition=partition(config["gpu"]),
        mem_mb=config["train_mem_mb"],
        runtime=config["train_runtime_min"],
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/fisher_mask.py"
