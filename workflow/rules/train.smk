def train_inputs(wc):
    run = run_for(wc)
    inputs = {"model": f"results/models/{wc.model}", "train": f"results/data/{wc.task}/train.jsonl"}
    if run.method == "ct_d":
        inputs["mask"] = run.mask_path(config)
    return inputs


rule train:
    input:
        unpack(train_inputs),
    output:
        model=directory("results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/model"),
        privacy="results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/privacy.json",
        metrics="results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/train_metrics.json",
    log:
        "logs/train/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}.log",
    benchmark:
        "benchmarks/train/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}.tsv"
    params:
        settings=lambda wc: run_settings(config, run_for(wc)),
    threads: config["threads"]
    resources:
        gpu=lambda wc: train_gpus(wc),
        slurm_partition=lambda wc: partition(train_gpus(wc)),
        mem_mb=config["train_mem_mb"],
        runtime=config["train_runtime_min"],
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/train.py"
