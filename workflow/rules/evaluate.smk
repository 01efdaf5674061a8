rule evaluate:
    input:
        model="results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/model",
        privacy="results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/privacy.json",
        eval="results/data/{task}/eval.jsonl",
        mismatched=lambda wc: extra_eval_files(wc.task),
    output:
        metrics="results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/metrics.json",
        # per-example predictions on the evaluation set, for the claims report's paired bootstrap
        predictions="results/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}/predictions.json",
    log:
        "logs/evaluate/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}.log",
    benchmark:
        "benchmarks/evaluate/{paper}/{task}/{model}/{method}/eps~{eps}/seed~{seed}.tsv"
    params:
        spec=lambda wc: run_for(wc).eval_spec(config),
    threads: config["threads"]
    resources:
        gpu=config["gpu"],
        slurm_partition=partition(config["gpu"]),
        mem_mb=config["train_mem_mb"],
        runtime=config["train_runtime_min"],
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/evaluate.py"
