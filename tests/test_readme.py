"""The README's code runs as written."""
import re

from conftest import ROOT


def _block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_engine_in_your_own_training_loop_runs_and_spends_the_epsilon_it_asked_for():
    scope = {}
    exec(compile(_block("## The engine in your own training loop"), "README.md", "exec"), scope)
    assert 7.5 < scope["epsilon"] <= 8.0 + 1e-6  # σ was calibrated to ε = 8 over the steps taken
    assert all(p.grad is None for p in scope["engine"].params)  # every step was applied
    assert scope["sigma"] > 0
