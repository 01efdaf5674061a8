"""One fine-tuning run: non-private or DP (ghost clipping), with or without a
Child-Tuning mask. Writes the trained model, a training log, the run's metadata
and its privacy report.

The run's settings are a flat dict (:class:`privtune.training.settings.RunSettings`), given by the Snakemake
rule from config.yaml; see workflow/schemas/config.schema.yaml for each key.

Faults: the run checkpoints every ``checkpoint_every`` steps (and every
``checkpoint_minutes``) into ``{out}/checkpoint/`` and, rerun after being killed,
resumes there (:mod:`privtune.training.checkpoint`), ending with the same parameters and
the same ε as an uninterrupted run. Outputs are written atomically, the model
folder first and ``privacy.json`` last of all. A non-finite loss or gradient
stops the run naming the step (``on_nonfinite: stop``), or skips that update
(``skip``): under DP the skip is decided on the *privatized* gradient, which makes
it post-processing, and a skipped step still counts toward ε.

Several GPUs: ``world_size: W`` runs W data-parallel processes, each taking a shard
of every logical batch; their gradient sums are added up before the noise, which
every rank draws identically (:mod:`privtune.training.distributed` says why that is noise
added once). Rank 0 writes the outputs.

Command line (what the ``train`` rule runs)::

    python -m privtune.training.loop --settings settings.json --model results/models/minilm \
        --train results/data/sst2/train.jsonl --out results/li2022/sst2/minilm/full/eps~3/seed~0
"""
from __future__ import annotations

import argparse
import contextlib
import math
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from privtune.childtuning import mask as child
from privtune.dp import rng, sampling
from privtune.dp.engine import GhostClipEngine
from privtune.dp.noise import privatize_
from privtune.dp.plan import PrivacyPlan, plan_privacy
from privtune.io import read_json
from privtune.models import methods
from privtune.models.load import default_device, load_tokenizer, resolve_precision
from privtune.objectives import objective
from privtune.objectives.tokenised import encode_file
from privtune.training import checkpoint, distributed
from privtune.training.optim import build_optimizer
from privtune.training.outputs import DIAGNOSTICS, write_outputs, zero_shot  # noqa: F401 (re-exported)
from privtune.training.settings import NONFINITE_POLICIES, RunSettings  # noqa: F401 (re-exported)

# the progress bar shows ε spent at most this often per run: each is an accountant call (0.06 s on one
# thread), which at every step of a small-batch run cost as much as a tenth of the step
EPSILON_SHOWN = 50


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient under ``on_nonfinite: stop``; names the step."""


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; use fp32 or bf16")


def _set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _lr_lambda(s: RunSettings, steps: int):
    warm = int(s.warmup_ratio * steps)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if s.lr_schedule == "linear":
            return max(0.0, (steps - step) / max(1, steps - warm))
        return 1.0

    return f


def _all_finite(params) -> bool:
    """Every gradient entry finite. Each gradient is read once, for its smallest and largest entry (a NaN
    is both; +inf the largest, -inf the smallest), with no tensor of its size made, and the host waits
    once: a fifth to a tenth of the time of ``isfinite`` on each gradient, which made a 22.7M-parameter
    model's check 0.12 s a step on one thread. The ends are tested in the gradient's own dtype (a finite
    float64 entry beyond float32's range is finite)."""
    ok = []
    for p in params:
        g = p.grad
        if g is None:
            continue
        g = g.coalesce().values() if g.is_sparse else g
        if g.numel():
            ok.append(torch.isfinite(torch.stack(torch.aminmax(g))).all().to(params[0].device))
    return bool(torch.stack(ok).all()) if ok else True


@dataclass
class RunState:
    """What a run carries from step to step; its checkpoint saves it with the model, the optimizer, the
    schedule and the generators."""
    root: int  # the secret root of the noise and the batches (privtune.dp.rng)
    step: int = 0  # the next step to run
    log: list = field(default_factory=list)  # train_log.json: per step, only what ε covers or needs no data
    diagnostics: list = field(default_factory=list)  # a DP run's per-step losses (train.diagnostics only)
    noise_norms: list = field(default_factory=list)  # the norm of each step's noise: checked, never released
    grad_norms: list = field(default_factory=list)  # the clipped sum's norm before noise (diagnostics only)
    skipped: list = field(default_factory=list)  # steps whose update was skipped (train.on_nonfinite: skip)
    verified: bool = False  # engine.verify() has run (train.verify_engine)
    segments: list = field(default_factory=list)  # the step ranges each process ran, across resumes
    seconds: float = 0.0  # training time of the earlier segments


@dataclass
class Job:
    """Everything a training step needs, fixed before the first step (:func:`setup`)."""

    s: RunSettings
    plan: PrivacyPlan
    obj: object  # privtune.objectives.Objective
    tok: object
    model: torch.nn.Module
    data: list
    lengths: list[int]
    params: list
    engine: GhostClipEngine | None
    opt: torch.optim.Optimizer
    sched: object
    mask_gen: torch.Generator  # CT_F's masks: the public root's stream (the same on every rank; privtune.dp.rng)
    masks: dict | None  # CT_D's fixed mask
    mask_info: dict | None
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(s: RunSettings, model, obj, tok, train_file: Path, mask_file: Path | None, device, rank: int,
          world: int) -> Job:
    """Data, mask, privacy plan (every refusal happens here, before the first step), engine, optimizer."""
    data = encode_file(obj, tok, train_file, s.max_length)  # through Dataset.map, cached beside the file
    if not data:
        raise ValueError(f"{train_file} holds no training examples (after encoding with max_length={s.max_length})")
    masks, mask_info = None, None
    if s.child == "ct_d":
        if mask_file is None:
            raise ValueError("child: ct_d needs a Fisher mask file")
        payload = torch.load(mask_file, map_location="cpu")
        masks, mask_info = payload["masks"], payload.get("info")
        child.check_mask_fits(model, masks, str(mask_file))
        # composed with whatever earlier releases the settings name, never in place of them
        s.prior_events = [*s.prior_events, *payload.get("privacy_events", [])]
    plan = plan_privacy(s, len(data), (mask_info or {}).get("source", "train") if masks is not None else None)
    engine = GhostClipEngine(model, s.clip_norm, mode=s.clipping_mode) if plan.private else None
    params = engine.params if engine else [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(s.optimizer, params, s.lr, s.weight_decay, no_decay=s.no_decay,
                          names={id(p): n for n, p in model.named_parameters(remove_duplicate=False)})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s, plan.steps))
    # CT_F's masks show in the released iterates (masked coordinates do not move), so they come from the
    # public root: what they reveal of their generator says nothing about the noise or the batches
    mask_gen = rng.mask_generator(s.seed, device)
    return Job(s, plan, obj, tok, model, data, [len(e.input_ids) for e in data], params, engine, opt, sched,
               mask_gen, masks, mask_info, device, rank, world)


def clip_and_sum(job: Job, shard, batch_len: int, state: RunState) -> tuple[float, int]:
    """Run this rank's share of the logical batch through the model in length-sorted physical batches,
    leaving in ``p.grad`` the sum of its per-example gradients, each clipped to C (under DP), or the
    plain gradient of the mean loss over the ``batch_len`` examples of all ranks. Returns the loss sum
    and the example count (data statistics)."""
    s, plan, engine = job.s, job.plan, job.engine
    losses_sum, count = 0.0, 0
    for part in sampling.physical_batches(shard, job.lengths, s.physical_batch_size, s.physical_tokens):
        chunk = [job.data[i] for i in part]
        batch = job.obj.collate(chunk, job.tok.pad_token_id, job.device)
        if plan.private:
            lengths = [job.lengths[i] for i in part]  # right padding: the engine skips padded rows it checks zero
            with engine.capture(batch_size=len(chunk), lengths=lengths), _autocast(s.precision, job.device):
                losses = job.obj.loss(job.model, batch)
            if s.verify_engine and not state.verified:
                # once: every parameter's gradient flows through hooked layers (bf16 autograd
                # gradients carry ~1e-2 relative rounding, hence the looser tolerance there)
                engine.verify(losses, rtol=1e-3 if s.precision == "fp32" else 5e-2)
                state.verified = True
                with engine.capture(batch_size=len(chunk), lengths=lengths), _autocast(s.precision, job.device):
                    losses = job.obj.loss(job.model, batch)
            engine.backward(losses)
        else:
            with _autocast(s.precision, job.device):
                losses = job.obj.loss(job.model, batch)
            (losses.sum() / batch_len).backward()
        losses_sum += float(losses.detach().sum())
        count += len(chunk)
    return losses_sum, count


def train_step(job: Job, state: RunState, step: int, idx) -> tuple[float, bool]:
    """One optimizer step, in the privacy-critical order: clip (each example) and sum → all-reduce across
    ranks → noise → (check the privatized gradient; clip its total norm if asked) → Child-Tuning mask →
    step. Returns the batch's mean loss (a data statistic: under DP no decision reads it) and whether the
    update was skipped."""
    s, plan, params = job.s, job.plan, job.params
    if job.world > 1:
        torch.manual_seed(rng.dropout_seed(s.seed, step, job.rank))  # dropout: per rank, resumable
    losses_sum, count = clip_and_sum(job, distributed.shard(idx, job.rank, job.world), len(idx), state)  # 1. clip
    if job.world > 1:  # 2. every rank now holds the whole batch's gradient sum and loss
        distributed.all_reduce_grads(params)
        losses_sum, count = distributed.all_reduce_sum([losses_sum, count], job.device)
    if plan.private:
        if s.diagnostics:  # the clipped sum before noise: a statistic of the data, not covered by ε
            state.grad_norms.append(math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params
                                                     if p.grad is not None)) / plan.batch_size)
        state.noise_norms.append(privatize_(params, plan.noise_multiplier, s.clip_norm, plan.batch_size,
                                               key=rng.noise_key(state.root, step)))  # 3. noise, ÷ expected B
    loss = losses_sum / max(1, count)
    if _skip_update(job, step, loss):
        job.opt.zero_grad(set_to_none=True)
        return loss, True
    if s.max_grad_norm:  # the whole batch gradient's norm (Hugging Face Trainer's max_grad_norm); post-processing
        torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
    kept = (child.ct_f_mask_(params, s.p_f, job.mask_gen, return_masks=s.child_strict) if s.child == "ct_f" else
            child.fixed_mask_(job.model, job.masks) if s.child == "ct_d" else [])  # 4. mask
    saved = child.snapshot(kept) if s.child_strict else []
    job.opt.step()  # 5. step
    child.restore_masked_(saved)
    job.opt.zero_grad(set_to_none=True)
    return loss, False


def _skip_update(job: Job, step: int, loss: float) -> bool:
    """The non-finite policy. Under DP the gradient here is already privatized: checking it is
    post-processing. The loss is not, so under DP nothing depends on it (a stop on a non-finite loss
    would release a bit)."""
    plan, s = job.plan, job.s
    grad_ok = _all_finite(job.params)
    if grad_ok and (plan.private or math.isfinite(loss)):
        return False
    what = "a non-finite privatized gradient" if plan.private else (
        f"loss {loss}" + ("" if grad_ok else " and a non-finite gradient"))
    if s.on_nonfinite == "stop":
        raise NonFiniteError(f"step {step} of {plan.steps}: {what}. Lower train.lr, check the data, "
                             "or set train.on_nonfinite: skip to drop such updates")
    skip = not grad_ok  # a finite gradient is applied even if the loss was not
    if job.main:
        print(f"step {step}: {what}; " + ("update skipped (train.on_nonfinite: skip); it still counts toward ε"
                                          if skip else "the gradient is finite, so it is applied"), flush=True)
    return skip


def new_state(job: Job) -> RunState:
    # the secret root of the noise and of the batches (privtune.dp.rng): the run's seed, or (secure_rng)
    # 128 bits from the OS, rank 0's on every rank, then only here and in the checkpoint
    return RunState(root=distributed.broadcast_seed(rng.secret_root(job.s.seed, job.s.secure_rng and job.plan.private),
                                                    job.device))


def resume(job: Job, ckpt_dir: Path, fp: str, state: RunState) -> RunState:
    """The state of a matching checkpoint (model, optimizer, schedule, generators restored), or ``state``."""
    resumed = checkpoint.load(ckpt_dir, fp, log=print if job.main else lambda *_: None)
    if resumed is None:
        return state
    if resumed["noise_multiplier"] != job.plan.noise_multiplier:
        raise RuntimeError(f"checkpoint {ckpt_dir} was calibrated to σ={resumed['noise_multiplier']} but this "
                           f"run calibrates σ={job.plan.noise_multiplier}: delete {ckpt_dir} and rerun")
    job.model.load_state_dict(resumed["model"])
    job.opt.load_state_dict(resumed["optimizer"])
    job.sched.load_state_dict(resumed["scheduler"])
    checkpoint.set_rng_state(resumed["rng"], job.mask_gen)
    if job.main:
        print(f"resuming from checkpoint {ckpt_dir} at step {resumed['step']} of {job.plan.steps}", flush=True)
    return RunState(**{f.name: resumed.get(f.name, getattr(state, f.name)) for f in fields(RunState)})


def record_step(job: Job, state: RunState, step: int, idx, loss: float, skip: bool, bar) -> None:
    """The step's log entry: under DP only what ε covers or needs no data; the rest is a diagnostic."""
    private, s = job.plan.private, job.s
    if skip:
        state.skipped.append(step)
    entry = {"step": step, "lr": job.sched.get_last_lr()[0], **({"skipped": True} if skip else {}),
             **job.obj.step_record(job.model, job.tok, job.device)}
    state.log.append(entry if private else {**entry, "loss": loss, "batch": int(len(idx))})
    if private and s.diagnostics:
        state.diagnostics.append({"step": step, "loss": loss, "batch": int(len(idx))})
    if private:  # ε spent so far: a function of the settings alone, no data in it
        every = max(1, job.plan.steps // EPSILON_SHOWN)
        if not bar.disable and ((step + 1) % every == 0 or step + 1 == job.plan.steps):
            bar.set_postfix(eps=f"{job.plan.epsilon_after(step + 1, s.accountant):.3g}",
                            **({"loss": f"{loss:.4f}"} if s.diagnostics else {}))
    else:
        bar.set_postfix(loss=f"{loss:.4f}")
    state.step = step + 1


def save_checkpoint(job: Job, ckpt_dir: Path, fp: str, state: RunState, start: int, seconds: float) -> None:
    segments = [*state.segments[:-1], {"start": start, "stop": state.step}]
    checkpoint.save(ckpt_dir, {**asdict(state), "segments": segments, "seconds": state.seconds + seconds,
                               "model": job.model.state_dict(), "optimizer": job.opt.state_dict(),
                               "scheduler": job.sched.state_dict(), "rng": checkpoint.rng_state(job.mask_gen),
                               "noise_multiplier": job.plan.noise_multiplier}, fp,
                    secret=job.s.secure_rng and job.plan.private)


@contextlib.contextmanager
def _secret_left_behind(job: Job, ckpt_dir: Path):
    """A secure run that stops with a checkpoint (in training, the end-of-run checks or while writing its
    outputs) says where its secret root is: never silently left."""
    try:
        yield
    except BaseException:
        if job.main and job.s.secure_rng and job.plan.private and (ckpt_dir / checkpoint.STATE).exists():
            print(f"this secure_rng run stopped; {ckpt_dir / checkpoint.STATE} holds its secret root (the 128 bits "
                  "its noise and Poisson batches are drawn from): anyone who reads it can recompute the noise and "
                  f"subtract it from a released model. Rerun to resume and finish (the run then deletes it), or "
                  f"delete {ckpt_dir}.", file=sys.stderr, flush=True)
        raise


def run(settings: RunSettings, model_dir: Path, train_file: Path, out_dir: Path,
        mask_file: Path | None = None, progress: bool = True) -> dict:
    """Train one run into ``out_dir`` (resuming its checkpoint if there is one); the returned dict holds
    its privacy report and training metrics."""
    s, out_dir = settings, Path(out_dir)
    if s.world_size > 1 and not distributed.is_initialized():
        # W fresh processes run this function again, inside a process group; rank 0 writes the outputs
        distributed.launch(run, s.world_size, (s, model_dir, train_file, out_dir, mask_file, progress))
        return {"privacy": read_json(out_dir / "privacy.json"), "train": read_json(out_dir / "train_metrics.json")}
    rank, world = distributed.rank_and_world(s.world_size)
    if s.threads:
        torch.set_num_threads(s.threads)
    _set_seed(s.seed)
    device = distributed.local_device() if world > 1 else default_device()
    s = replace(s, precision=resolve_precision(s.precision, device))  # auto: recorded as what it ran in
    tok = load_tokenizer(model_dir)
    obj = objective(s.kind, s.task, s.objective, s.num_labels, s.prompt, model_dir=model_dir)
    if s.zero_shot:
        return zero_shot(s, obj.load(model_dir), tok, out_dir, obj.family)
    base = obj.load(model_dir)
    if s.untie_lm_head:
        methods.untie_lm_head(base)
    model = methods.apply(base, s.method, s.kind, s.method_options, seed=s.seed, objective=s.objective).to(device)
    if s.untie_lm_head and methods.head_is_tied(model):
        raise RuntimeError(f"train.untie_lm_head: the LM head of {model_dir} is tied to the embedding again after "
                           f"method {s.method!r} was applied; report this with the model and method")
    obj.prepare(model, tok, device)  # before any step: the similarity objective's fixed label embeddings
    job = setup(s, model, obj, tok, train_file, mask_file, device, rank, world)

    ckpt_dir = out_dir / "checkpoint"
    fp = checkpoint.fingerprint(asdict(s), train_file, model_dir, mask_file)
    state = resume(job, ckpt_dir, fp, new_state(job))
    start = state.step
    state.segments.append({"start": start, "stop": job.plan.steps})
    model.train()
    t0 = last_ckpt = time.monotonic()
    batches = sampling.logical_batches(job.plan.dataset_size, job.plan.batch_size, job.plan.steps,
                                       state.root, job.plan.sampling, start=start)
    bar = tqdm(batches, total=job.plan.steps, initial=start, disable=not (progress and job.main), unit="step",
               desc=f"{'DP ε=%g' % s.epsilon if job.plan.private else 'non-private'} {s.child}")
    with _secret_left_behind(job, ckpt_dir):
        for step, idx in bar:
            loss, skip = train_step(job, state, step, idx)
            if world > 1 and step == start:
                distributed.check_replicas(job.params)  # early: the ranks took the same first step
            job.sched.step()
            record_step(job, state, step, idx, loss, skip, bar)
            now = time.monotonic()
            due = ((s.checkpoint_every and state.step % s.checkpoint_every == 0)
                   or (s.checkpoint_minutes and now - last_ckpt >= 60 * s.checkpoint_minutes))
            if due and state.step < job.plan.steps and job.main:
                save_checkpoint(job, ckpt_dir, fp, state, start, now - t0)
                last_ckpt = now
        elapsed = state.seconds + time.monotonic() - t0
        if world > 1:
            distributed.check_replicas(job.params)  # before any output is written
            if not job.main:
                return {}
        result = write_outputs(job, state, out_dir, mask_file, train_file, elapsed)
        checkpoint.clear(ckpt_dir)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m privtune.training.loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", required=True, help="a JSON file, or a JSON object, of RunSettings")
    ap.add_argument("--model", required=True, type=Path, help="a prepared model folder")
    ap.add_argument("--train", required=True, type=Path, help="training records (JSONL, from prepare_data)")
    ap.add_argument("--out", required=True, type=Path, help="the run's folder")
    ap.add_argument("--mask", type=Path, help="Child-Tuning_D mask file (fisher_mask rule)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    text = a.settings if a.settings.lstrip().startswith("{") else Path(a.settings).read_text()
    result = run(RunSettings(**json.loads(text)), a.model, a.train, a.out, a.mask, progress=not a.no_progress)
    print(json.dumps({"epsilon": result["privacy"]["epsilon"], "final_loss": result["train"].get("final_loss")}))


if __name__ == "__main__":
    main()
