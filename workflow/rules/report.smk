rule tables:
    input:
        lambda wc: metrics_files(wc.paper),
    output:
        md=report("results/tables/{paper}.md", caption="../report/tables.rst", category="{paper}",
                  subcategory="tables"),
        csv="results/tables/{paper}.csv",
    log:
        "logs/tables/{paper}.log",
    benchmark:
        "benchmarks/tables/{paper}.tsv"
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/tables.py"


rule figure:
    input:
        "results/tables/{paper}.csv",
    output:
        report("results/figures/{paper}_{figure}.png", caption="../report/{figure}.rst",
               category="{paper}", subcategory="figures"),
    log:
        "logs/figures/{paper}_{figure}.log",
    benchmark:
        "benchmarks/figures/{paper}_{figure}.tsv"
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/figure.py"


# Re-derive every DP run's ε from what its privacy.json records, with an accountant library
# other than the calibration's; fails (and writes nothing) if any report is lower.
rule privacy_audit:
    input:
        [r.path("privacy.json") for r in RUNS],
    output:
        "results/privacy_audit.json",
    log:
        "logs/privacy_audit.log",
    benchmark:
        "benchmarks/privacy_audit.tsv"
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/privacy_audit.py"
