rule prepare_data:
    input:
        lambda wc: user_files(config, wc.task),
    output:
        "results/data/{task}/{part}.jsonl",
    log:
        "logs/prepare_data/{task}/{part}.log",
    benchmark:
        "benchmarks/prepare_data/{task}/{part}.tsv"
    params:
        data_dir=config["data_dir"],
        spec=lambda wc: data_spec(config, wc.task, wc.part),
        user=lambda wc: canonical((config.get("user_tasks") or {}).get(wc.task)),  # a changed entry reruns it
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/prepare_data.py"
