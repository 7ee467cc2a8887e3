"""Model spec: validation names the bad field, JSON round-trips exactly."""

import json

import pytest

from recserve.engine.demo import demo_spec
from recserve.engine.spec import (
    DenseFeature,
    Interaction,
    ModelSpec,
    Output,
    SparseFeature,
    Table,
)


def small_spec(**overrides) -> ModelSpec:
    fields = dict(
        name="m",
        tables=(Table("a", 10, 4), Table("b", 7, 4, "int8")),
        sparse=(SparseFeature("x", "a", "mean", "request", 3),
                SparseFeature("y", "b", scope="candidate", weighted=True)),
        dense=(DenseFeature("d", 5),),
        bottom_mlp=(8, 4),
        interaction=Interaction("dot", self_interaction=True),
        top_mlp=(6, 2),
        outputs=(Output("click"), Output("watch", "logit")),
        weight_dtype="bf16",
    )
    fields.update(overrides)
    return ModelSpec(**fields)


@pytest.mark.parametrize("spec", [small_spec(), demo_spec(),
                                  small_spec(interaction=Interaction("dcnv2", layers=2, rank=3)),
                                  small_spec(interaction=Interaction("cat"))])
def test_json_round_trip_is_exact(spec):
    text = spec.to_json()
    again = ModelSpec.from_json(text)
    assert again == spec
    assert again.to_json() == text


def test_derived_widths():
    spec = small_spec()
    assert spec.dense_in_dim == 5
    assert spec.bottom_out_dim == 4
    assert spec.num_vectors == 3
    assert spec.concat_dim == 12
    assert spec.interaction_dim == 4 + 6  # 3 vectors with the diagonal: 6 pairs
    assert small_spec(interaction=Interaction("dot")).interaction_dim == 4 + 3


@pytest.mark.parametrize("change, message", [
    (dict(tables=(Table("a", 10, 4), Table("a", 7, 4))), "duplicate table names"),
    (dict(sparse=(SparseFeature("x", "zzz"),)), "unknown table 'zzz'"),
    (dict(top_mlp=(6, 3)), "top_mlp ends in 3 units"),
    (dict(bottom_mlp=(8, 5)), "dot interaction needs one width"),
    (dict(dense=(), bottom_mlp=(8, 4)), "bottom_mlp is set"),
    (dict(dense=(DenseFeature("x", 5),)), "share the names"),
    (dict(sparse=(SparseFeature("x", "a", scope="request"),),
          dense=(DenseFeature("d", 5, "request"),)), "no candidate-scope input"),
    (dict(weight_dtype="fp64"), "model weight_dtype is 'fp64'"),
])
def test_invalid_models_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        small_spec(**change)


@pytest.mark.parametrize("build, message", [
    (lambda: Table("t", 0, 4), "table 't' rows is 0"),
    (lambda: Table("t", 5, 4, "int4"), "table 't' dtype is 'int4'"),
    (lambda: Table("bad name", 5, 4), "table name 'bad name'"),
    (lambda: SparseFeature("f", "t", pooling="max"), "pooling is 'max'"),
    (lambda: SparseFeature("f", "t", scope="user"), "scope is 'user'"),
    (lambda: SparseFeature("f", "t", max_bag=0), "max_bag is 0"),
    (lambda: DenseFeature("d", -1), "dense feature 'd' dim is -1"),
    (lambda: Interaction("dcnv2"), "interaction layers is 0"),
    (lambda: Interaction("cat", layers=2), "only apply to dcnv2"),
    (lambda: Interaction("cat", self_interaction=True), "only applies to dot"),
    (lambda: Output("o", "tanh"), "activation is 'tanh'"),
])
def test_invalid_parts_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_from_json_rejects_unknown_keys_and_bad_text():
    data = json.loads(small_spec().to_json())
    data["tables"][0]["colour"] = "red"
    with pytest.raises(ValueError, match=r"tables has unknown keys \['colour'\]"):
        ModelSpec.from_dict(data)
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelSpec.from_json("{")
    with pytest.raises(ValueError, match="spec_version"):
        ModelSpec.from_dict({**json.loads(small_spec().to_json()), "spec_version": 99})
