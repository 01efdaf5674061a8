# Tables, figures and provenance; each output marked for `snakemake --report`, with a caption
# (workflow/report/*.rst) that says what it shows and which part of the config produced it.


rule tables:
    input:
        lambda wc: metrics_files(wc.paper),
    output:
        md=report("results/tables/{paper}.md", caption="../report/tables.rst", category="{paper}",
                  subcategory="tables", labels={"table": "{paper} (Markdown)"}),
        csv=report("results/tables/{paper}.csv", caption="../report/tables.rst", category="{paper}",
                   subcategory="tables", labels={"table": "{paper} (CSV, every run and metric)"}),
        tex=report("results/tables/{paper}.tex", caption="../report/tables.rst", category="{paper}",
                   subcategory="tables", labels={"table": "{paper} (LaTeX)"}),
    log:
        "logs/tables/{paper}.log",
    benchmark:
        "benchmarks/tables/{paper}.tsv"
    params:
        provenance=lambda wc: provenance_text(wc.paper),
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/tables.py"


rule figure:
    input:
        lambda wc: figure_inputs(wc.paper, wc.figure),
    output:
        png=report("results/figures/{paper}_{figure}.png", caption="../report/figure.rst",
                   category="{paper}", subcategory="figures", labels={"figure": "{figure}"}),
        svg="results/figures/{paper}_{figure}.svg",
    log:
        "logs/figures/{paper}_{figure}.log",
    benchmark:
        "benchmarks/figures/{paper}_{figure}.tsv"
    params:
        provenance=lambda wc: provenance_text(wc.paper),
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/figure.py"


# The configuration as Snakemake saw it (defaults filled in) and the software versions of the
# rules' environment, both shown in the report beside the results they produced.
rule provenance:
    output:
        config=report("results/provenance/config.yaml", caption="../report/provenance.rst",
                      category="provenance", labels={"file": "configuration"}),
        versions=report("results/provenance/software.tsv", caption="../report/provenance.rst",
                        category="provenance", labels={"file": "software versions"}),
    log:
        "logs/provenance.log",
    benchmark:
        "benchmarks/provenance.tsv"
    params:
        config=canonical(config),
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/provenance.py"


# Re-derive every DP run's ε from what its privacy.json records, with an accountant library
# other than the calibration's; fails (and writes nothing) if any report is lower.
rule privacy_audit:
    input:
        [r.path("privacy.json") for r in RUNS],
    output:
        report("results/privacy_audit.json", caption="../report/privacy_audit.rst", category="provenance",
               labels={"file": "privacy audit"}),
    log:
        "logs/privacy_audit.log",
    benchmark:
        "benchmarks/privacy_audit.tsv"
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/privacy_audit.py"


# Each finding of the two papers with our numbers and a verdict computed by a stated rule.
rule claims:
    input:
        unpack(claims_inputs),
    output:
        report("results/claims.md", caption="../report/claims.rst", category="claims",
               labels={"file": "claims report"}),
    log:
        "logs/claims.log",
    benchmark:
        "benchmarks/claims.tsv"
    params:
        preset=config.get("preset", "custom"),
    threads: 1
    conda:
        "../../envs/privtune.yaml"
    script:
        "../scripts/claims.py"
