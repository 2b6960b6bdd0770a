"""One definition each: the library dataclasses that mirror a stage's options (ContextConfig for `synth`,
SamplingParams for `sample`) take every shared default from the stage's dataclass (sealong/config/stages.py), so
a default is written once. Checked on the source (a literal equal to today's default would drift) and by value."""

import ast
import dataclasses
import inspect

import pytest

from sealong.config.stages import SampleConfig, SynthConfig
from sealong.data.context import ContextConfig
from sealong.sample.sampler import SamplingParams


def default_expressions(cls) -> dict:
    """{field: the source of its default expression} of a dataclass's body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: ast.unparse(node.value) for node in body
            if isinstance(node, ast.AnnAssign) and node.value is not None}


@pytest.mark.parametrize("cls, stage", [(ContextConfig, SynthConfig), (SamplingParams, SampleConfig)])
def test_shared_defaults_come_from_the_stage_dataclass(cls, stage):
    stage_fields = {f.name: f for f in dataclasses.fields(stage)}
    shared = [f.name for f in dataclasses.fields(cls) if f.name in stage_fields
              and stage_fields[f.name].default is not dataclasses.MISSING and f.name != "decode_slots"]
    assert len(shared) >= 6, shared  # ContextConfig: lengths, distractors, embedder, seed; SamplingParams: 8
    written = default_expressions(cls)
    assert {name: written[name] for name in shared} == {name: f"{stage.__name__}.{name}" for name in shared}
    assert all(getattr(cls(), name) == stage_fields[name].default for name in shared)
