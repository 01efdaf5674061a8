"""One fine-tuning run: ``settings`` (RunSettings), ``loop`` (set-up, the step, checkpoints, outputs),
``optim``, ``checkpoint`` (exact resume), ``distributed`` (data-parallel DP) and ``gpus`` (per-job locks)."""
