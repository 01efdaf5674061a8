"""The prompt objectives' templates, label words and label descriptions, per task, and the checks
on them: plain data, torch-free, so a config is checked before any job
(:func:`privtune.objectives.family.check`, called by ``privtune.pipeline``).

* masked LM: LM-BFF templates with a mask token, one label word per label (:mod:`privtune.objectives.mlm`);
* causal LM: a template ending just before the label word (:mod:`privtune.objectives.causal`);
* sentence encoder: a description of each label (:mod:`privtune.objectives.similarity`).
"""
from __future__ import annotations

from privtune.tasks import TASKS, CausalSpec, PromptSpec, canonical  # noqa: F401 (re-exported)

class PromptObjectiveError(ValueError):
    """The prompt objective cannot be used for this task or model (use ``objective: head``)."""


# the templates, label words and descriptions themselves are task facts (privtune.tasks)
TEMPLATES: dict[str, PromptSpec] = {t.name: t.mlm for t in TASKS.values() if t.mlm is not None}
CAUSAL_TEMPLATES: dict[str, CausalSpec] = {t.name: t.causal for t in TASKS.values() if t.causal is not None}
DESCRIPTIONS: dict[str, tuple[str, ...]] = {t.name: t.descriptions for t in TASKS.values() if t.descriptions}


# -- masked-LM templates per task ----------------------------------------------
def supports_prompt(task: str) -> bool:
    """Whether ``task`` has a prompt template (the GLUE classification tasks)."""
    return canonical(task, strict=False) in TEMPLATES


def prompt_spec(task: str) -> PromptSpec:
    """The template of ``task``; :class:`PromptObjectiveError` for tasks without one."""
    name = canonical(task, strict=False)
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name == "stsb":
        raise PromptObjectiveError(
            "task 'stsb' is a regression task; the prompt objective scores label words and supports "
            f"classification tasks only ({sorted(TEMPLATES)}). Use objective: head for stsb."
        )
    raise PromptObjectiveError(f"task {task!r} has no prompt template; templates exist for {sorted(TEMPLATES)}")


def spec_for(task: str, overrides: dict) -> CausalSpec:
    base = CAUSAL_TEMPLATES.get(canonical(task, strict=False))
    if base is None and "template" not in overrides:
        raise PromptObjectiveError(f"task {task!r} has no causal-LM template (templates exist for "
                                   f"{sorted(CAUSAL_TEMPLATES)}); give prompt.template and prompt.label_words, or use "
                                   "objective: head")
    words = overrides.get("label_words", base.label_words if base else None)
    if words is None:
        raise PromptObjectiveError(f"task {task!r}: prompt.template is given without prompt.label_words")
    prefix = overrides.get("label_prefix")
    if prefix is not None:  # the MLM convention (words without their space) carried over
        words = tuple(prefix + w for w in words)
    return CausalSpec(overrides.get("template", base.template if base else None), tuple(words))


TEMPERATURE = 0.05


def descriptions_for(task: str, overrides: dict) -> tuple[str, ...]:
    given = overrides.get("descriptions")
    if given is not None:
        return tuple(given)
    if canonical(task, strict=False) not in DESCRIPTIONS:
        raise PromptObjectiveError(
            f"task {task!r} has no label descriptions for a sentence encoder (they exist for "
            f"{sorted(DESCRIPTIONS)}); pair tasks are not a similarity to a fixed text. Give "
            "prompt.descriptions, use a model with an LM head, or objective: head")
    return DESCRIPTIONS[canonical(task, strict=False)]


def mlm_spec(task: str, prompt: dict) -> PromptSpec:
    """The masked-LM template of ``task`` with ``prompt``'s overrides (template, label_words, label_prefix)."""
    base = prompt_spec(task)
    words = prompt.get("label_words")
    return PromptSpec(prompt.get("template", base.template), tuple(words) if words is not None else base.label_words,
                      prompt.get("label_prefix", base.label_prefix))
