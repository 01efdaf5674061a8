"""privtune: differentially private (ghost clipping) and Child-Tuning fine-tuning of language models.

One package per concept:

================  ==========================================================================
``dp``            the engine (``engine``, ``layers``: the ghost norm of each layer type,
                  ``contributions``), ``sampling`` (Poisson), ``noise`` (the Gaussian step),
                  ``accounting``, ``plan`` (what a run's settings cost in ε), ``guarantee``,
                  ``fisher_release`` (the DP Fisher), ``audit``
``childtuning``   ``mask`` (CT_F's Bernoulli mask, CT_D's fixed mask), ``fisher`` (CT_D's mask)
``objectives``    ``head``, ``mlm``, ``causal``, ``similarity`` (and their ``templates``)
``models``        ``prepare`` (fetch, build, convert), ``load``, ``methods`` (LoRA, prefix,
                  top2, retrain), ``architectures``
``training``      ``settings``, ``loop``, ``optim``, ``checkpoint``, ``distributed``, ``gpus``
``metrics``       ``classification`` and one module per generation metric
``data``          ``download``, ``readers`` (GLUE), ``table2text`` (E2E, DART), ``user`` (a user's own
                  dataset, through Hugging Face ``datasets``), ``prep``
``report``        ``tables``, ``figures``, ``claims`` (the rules), ``claims_md`` (the report),
                  ``evidence`` (intervals), ``provenance``
``bench``         ``clipping`` (engine against non-private and Opacus: ``workload``, ``steps``, ``measure``),
                  ``batches``
================  ==========================================================================

``tasks`` is the one registry of task facts; ``pipeline`` is the workflow's (torch-free) glue;
``evaluate`` is the evaluation stage; ``selection`` chooses hyperparameters on a validation split carved
from the training data.
"""
