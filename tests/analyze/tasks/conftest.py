"""Fixtures of the lm-eval task tests: the real SmolLM2-135M loaded once, and the shipped tasks selected once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer, resolved)`` of the real SmolLM2-135M in float32 (the packaged GGUF, converted once)."""
    from actsparse.pipeline.models import load_model, load_tokenizer, resolve_model

    resolved = resolve_model("smollm2-135m")
    tok, _ = load_tokenizer(resolved)
    return load_model(resolved), tok, resolved


@pytest.fixture(scope="session")
def shipped():
    """The ``TaskSelection`` of the three shipped tasks."""
    from actsparse.analyze.tasks.build import TASK_NAMES
    from actsparse.analyze.tasks.selection import select_tasks

    return select_tasks(",".join(TASK_NAMES))
