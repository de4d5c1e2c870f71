"""Flags derived from the config dataclasses: every field reachable, documented, and round-tripping."""

import argparse
import dataclasses
import json

import pytest

from blocklora.config import (
    AdapterConfig,
    FederationConfig,
    GenerateConfig,
    PretrainConfig,
    TrainConfig,
    add_flags,
    flag_name,
    from_args,
    to_argv,
    to_json,
)
from blocklora.toy.recipe import TOY_BASE_ADAPTER, TOY_BASE_TRAIN

CONFIGS = (TrainConfig, AdapterConfig, GenerateConfig, FederationConfig, PretrainConfig)


def parser(cls: type, defaults=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    add_flags(p, cls, defaults)
    return p


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_a_documented_flag(cls):
    actions = {a.option_strings[0]: a for a in parser(cls)._actions}
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
        assert actions[flag_name(f)].help.startswith(f.metadata["help"])


@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_round_trip(cls):
    assert from_args(cls, parser(cls).parse_args([])) == cls()
    assert from_args(cls, parser(cls).parse_args(to_argv(cls()))) == cls()


def test_presets_and_every_type_round_trip():
    """A preset's values become the defaults; bools, tuples, floats and strings survive to_argv."""
    assert from_args(TrainConfig, parser(TrainConfig, TOY_BASE_TRAIN).parse_args([])) == TOY_BASE_TRAIN
    assert from_args(AdapterConfig, parser(AdapterConfig, TOY_BASE_ADAPTER).parse_args([])) == TOY_BASE_ADAPTER
    odd = AdapterConfig(rank=2, num_slots=3, erasure=0.25, unet_targets=("to_q",), text_targets=("q_proj", "v_proj"),
                        blockwise=False, freeze_a="orthogonal")
    assert from_args(AdapterConfig, parser(AdapterConfig).parse_args(to_argv(odd))) == odd
    train = TrainConfig(prior_preservation=True, flip=False, prompt_template="{trigger} in the style of {class_word}")
    assert from_args(TrainConfig, parser(TrainConfig).parse_args(to_argv(train))) == train
    sampling = GenerateConfig(negative_prompt="-blurry, dark", guidance_scale=0.5)
    assert from_args(GenerateConfig, parser(GenerateConfig).parse_args(to_argv(sampling))) == sampling


def test_tuples_take_spaces_or_commas_and_bools_take_no():
    args = parser(AdapterConfig).parse_args(["--targets", "to_q,to_k", "to_v", "--text-targets", "", "--no-blockwise"])
    cfg = from_args(AdapterConfig, args)
    assert cfg.unet_targets == ("to_q", "to_k", "to_v") and cfg.text_targets == () and not cfg.blockwise
    assert from_args(TrainConfig, parser(TrainConfig).parse_args(["--prior"])).prior_preservation  # the old flag


@pytest.mark.parametrize("argv, reason", [
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--lr", "-1"], "learning rates must be positive"),
    (["--quiet-weight", "-0.5"], "quiet_weight must be >= 0, got -0.5"),
    (["--quiet-classes", "circle", " "], "quiet_classes must be non-empty words, got ['circle', ' ']"),
])
def test_bad_values_are_argparse_errors(argv, reason, capsys):
    p = parser(TrainConfig)
    with pytest.raises(SystemExit) as e:
        from_args(TrainConfig, p.parse_args(argv), p)
    assert e.value.code == 2 and reason in capsys.readouterr().err


def test_unknown_field_names_are_refused():
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['stepz'\]"):
        add_flags(argparse.ArgumentParser(), TrainConfig, skip=("stepz",))


def test_configs_sharing_a_field_name_read_their_own_flags():
    """TrainConfig and GenerateConfig both have `steps`: each reads only the flag added for it."""
    p = argparse.ArgumentParser()
    add_flags(p, TrainConfig)
    add_flags(p, GenerateConfig, skip=("steps", "seed"))
    args = p.parse_args(["--steps", "7", "--guidance", "2"])
    assert from_args(TrainConfig, args).steps == 7
    assert from_args(GenerateConfig, args) == GenerateConfig(guidance_scale=2.0)


@pytest.mark.parametrize("cls", CONFIGS)
def test_canonical_json_names_only_what_differs_from_the_defaults(cls):
    """Cache keys (benchmarks/retention/study.py) are built from it: a field added later at its default must
    leave them as they were, and any changed field must change them."""
    assert to_json(cls()) == "{}"
    f = next(f for f in dataclasses.fields(cls)
             if isinstance(f.default, (int, float)) and not isinstance(f.default, bool))
    changed = dataclasses.replace(cls(), **{f.name: f.default + 1})
    assert json.loads(to_json(changed)) == {f.name: f.default + 1}
    assert to_json(changed) == to_json(dataclasses.replace(cls(), **{f.name: f.default + 1}))
