"""repblocks.optim: weight-decay groups and the warm-up + cosine schedule."""

import math

import pytest
import torch
from torch import nn

import repblocks
from repblocks.train.losses import rep_l2_parameters
from repblocks.train.optim import cosine_with_warmup, param_groups


def _ids(group: dict) -> set[int]:
    return {id(param) for param in group["params"]}


def _groups_by_name(model: nn.Module, **kwargs) -> dict[str, set[int]]:
    return {group["name"]: _ids(group) for group in param_groups(model, 0.05, **kwargs)}


def test_groups_partition_the_trainable_parameters_exactly_once():
    model = repblocks.create_model("repvgg_tiny_g2se")
    model.head.fc.bias.requires_grad_(False)
    groups = param_groups(model, 0.05)
    listed = [id(param) for group in groups for param in group["params"]]
    trainable = {id(param) for param in model.parameters() if param.requires_grad}
    assert len(listed) == len(set(listed)) and set(listed) == trainable
    assert [(group["name"], group["weight_decay"]) for group in groups] == [("decay", 0.05), ("no_decay", 0.0)]


def test_norm_parameters_biases_and_vectors_are_not_decayed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4))
    model.add_module("fc", nn.Linear(4, 2))
    model.register_parameter("scale", nn.Parameter(torch.ones(())))
    groups = _groups_by_name(model)
    assert groups["decay"] == {id(model[0].weight), id(model.fc.weight)}
    no_decay = {id(param) for param in model.parameters()} - groups["decay"]
    assert groups["no_decay"] == no_decay and id(model.scale) in no_decay and id(model[1].weight) in no_decay


def test_a_shared_parameter_is_listed_once():
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    groups = _groups_by_name(model)
    assert groups == {"decay": {id(layer.weight)}, "no_decay": {id(layer.bias)}}


def test_skip_keeps_rep_l2_kernels_out_of_decay_and_empty_groups_are_dropped():
    model = repblocks.create_model("repvgg_tiny")
    groups = _groups_by_name(model, skip=rep_l2_parameters(model))
    assert groups["decay"] == {id(model.head.fc.weight)}  # every conv kernel sits in a RepBlock
    only_norms = nn.BatchNorm2d(3)
    assert [group["name"] for group in param_groups(only_norms, 0.1)] == ["no_decay"]


def _factors(steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = cosine_with_warmup(optimizer, **kwargs)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"] / 2.0)
        optimizer.step()
        scheduler.step()
    return factors


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_the_minimum():
    factors = _factors(12, warmup_steps=4, total_steps=10, min_lr_ratio=0.1, warmup_start_ratio=0.2)
    assert factors[0] == pytest.approx(0.2)
    assert factors[2] == pytest.approx(0.6)  # halfway through the warm-up
    assert factors[4] == pytest.approx(1.0)  # end of warm-up: the base lr
    assert factors[7] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert factors[10] == pytest.approx(0.1) and factors[11] == pytest.approx(0.1)  # the end, and after it


def test_schedule_without_warmup_starts_at_the_base_lr():
    factors = _factors(5, warmup_steps=0, total_steps=4)
    assert factors[0] == 1.0 and factors[2] == pytest.approx(0.5) and factors[4] == pytest.approx(0.0)


def test_schedule_shorter_than_its_warmup_only_warms_up(caplog):
    factors = _factors(4, warmup_steps=10, total_steps=3, warmup_start_ratio=0.0)
    assert factors == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert "no cosine decay" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(warmup_steps=0, total_steps=0), "total_steps must be positive"),
        (dict(warmup_steps=-1, total_steps=5), "warmup_steps"),
        (dict(warmup_steps=1, total_steps=5, min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=match):
        cosine_with_warmup(optimizer, **kwargs)
