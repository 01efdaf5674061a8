"""A training run's settings: one flat dict, given by the ``train`` rule from the config.

Each key is described in workflow/schemas/config.schema.yaml (``$defs/train``); the schema's
``train_defaults`` holds the defaults, which the dataclass repeats so that a run can be started
outside Snakemake (tests/test_schema_defaults.py keeps the two equal).
"""
from __future__ import annotations

from dataclasses import dataclass, field


NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class RunSettings:
    kind: str  # classification | regression | table2text
    num_labels: int = 2
    epsilon: float | None = None  # None: non-private
    delta: float | str = "auto"  # "auto": n^-1.1
    clip_norm: float = 0.1
    batch_size: int = 32  # expected logical batch size
    physical_batch_size: int = 32
    physical_tokens: int | None = None  # length-sorted physical batches of at most this many padded tokens
    epochs: float = 1.0
    steps: int | None = None  # overrides epochs
    lr: float = 5e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    no_decay: list = field(default_factory=lambda: ["bias", "LayerNorm.weight"])  # names weight decay skips
    max_grad_norm: float | None = None  # clip the whole (privatized) batch gradient to this norm before the step
    lr_schedule: str = "constant"  # constant | linear
    warmup_ratio: float = 0.0
    max_length: int = 128
    sampling: str | None = None  # poisson | shuffle; default poisson under DP, shuffle otherwise
    accountant: str = "rdp"
    clipping_mode: str = "bk"  # bk | ghost
    task: str | None = None  # sst2, e2e, ... (the prompt objective's template is per task)
    objective: str = "head"  # head | prompt (privtune.objectives)
    prompt: dict = field(default_factory=dict)  # prompt objective: template / label_words / label_prefix overrides
    method: str = "full"  # full | lora | prefix | top2 | retrain (privtune.models.methods)
    method_options: dict = field(default_factory=dict)  # e.g. {"r": 8, "alpha": 16} for lora
    untie_lm_head: bool = False  # a causal LM's output layer gets its own copy of the tied input embedding
    child: str = "vanilla"  # vanilla | ct_f | ct_d
    p_f: float = 0.3
    child_strict: bool = False  # masked coordinates do not move at all (no momentum, no weight decay)
    seed: int = 0
    threads: int | None = None
    verify_engine: bool = True
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward pass; norms are accumulated in fp32) | auto
    checkpoint_every: int = 100  # optimizer steps between checkpoints; 0: never by count
    checkpoint_minutes: float = 15.0  # minutes between checkpoints; 0: never by time
    on_nonfinite: str = "stop"  # stop | skip (a non-finite loss or gradient)
    secure_rng: bool = False  # noise and Poisson batches from the OS's entropy, not from `seed` (a real release)
    secure_noise: bool = False  # the former name of secure_rng
    allow_unaccounted: bool = False  # run a DP setting whose ε does not hold (privtune.dp.guarantee), marked
    diagnostics: bool = False  # DP: also write diagnostics_nonprivate.json (data statistics ε does not cover)
    prior_events: list = field(default_factory=list)  # e.g. a DP Fisher pass, composed into ε
    world_size: int = 1  # data-parallel processes (one per GPU; gloo on the CPU)
    zero_shot: bool = False  # no training: the model as prepared, with the objective (reads no data, ε = 0)

    def __post_init__(self) -> None:
        self.secure_rng = bool(self.secure_rng or self.secure_noise)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"train.on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"train.max_grad_norm must be > 0 (or null: no whole-gradient clip), "
                             f"got {self.max_grad_norm!r}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"epsilon must be > 0 (or absent for a non-private run), got {self.epsilon}")
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ValueError(f"train.world_size must be an integer >= 1 (processes, one per GPU), "
                             f"got {self.world_size!r}")
