# Speed/memory of DP clipping vs non-private and Opacus (issue: ghost clipping). In `all` only
# when benchmark.in_report is true (the quick preset, on small shapes); otherwise run it with
# `snakemake --cores all benchmark_cpu` (or benchmark_gpu on a GPU machine; scripts/gpu-check.sh
# runs the GPU benchmark and a training run on one GPU in 8 minutes).

rule benchmark_clipping:
    output:
        json="results/benchmarks/clipping_{device}.json",
        png=report("results/benchmarks/clipping_{device}.png", caption="../report/benchmark.rst",
                   category="benchmarks", labels={"device": "{device}"}),
        svg="results/benchmarks/clipping_{device}.svg",
    log:
        "logs/benchmark_clipping/{device}.log",
    benchmark:
        "benchmarks/benchmark_clipping/{device}.tsv"
    params:
        args=lambda wc: benchmark_args(wc.device),
    threads: config["threads"]
    resources:
        gpu=lambda wc: 1 if wc.device == "cuda" else 0,
        slurm_partition=lambda wc: partition(wc.device == "cuda"),
        mem_mb=20000,
        runtime=240,
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/benchmark_clipping.py"


rule benchmark_cpu:
    input:
        "results/benchmarks/clipping_cpu.json",


rule benchmark_gpu:
    input:
        "results/benchmarks/clipping_cuda.json",
