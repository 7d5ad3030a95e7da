from __future__ import annotations

import json

import pytest

from lorafleet.protocols.errors import SpecError
from lorafleet.protocols.provenance import AdapterProvenance
from lorafleet.protocols.spec import AdapterSpec

SHA = "ab" * 32


def make(**kw: object) -> AdapterSpec:
    args: dict[str, object] = {"base_model_id": "m", "base_sha256": SHA}
    args.update(kw)
    return AdapterSpec(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"rank": 0}, "rank"),
        ({"rank": 2000}, "rank"),
        ({"rank": True}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"target_modules": ()}, "target_modules is empty"),
        ({"target_modules": "q_proj"}, "list of module names"),
        ({"target_modules": ("q_proj", "q_proj")}, "duplicates"),
        ({"target_modules": ("q proj",)}, "not a valid module name"),
        ({"cohort_seed": -1}, "cohort_seed"),
        ({"a_init": "gaussian"}, "a_init"),
        ({"dtype": "int8"}, "dtype"),
        ({"base_sha256": "xyz"}, "base_sha256"),
        ({"base_model_id": ""}, "base_model_id"),
    ],
)
def test_bad_spec_values_are_refused_with_the_field_named(
    kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises(SpecError, match=fragment):
        make(**kwargs)


def test_spec_round_trips_and_fingerprint_ignores_target_order() -> None:
    # Prepare
    a = make(target_modules=("v_proj", "q_proj"), cohort_seed=7)
    b = make(target_modules=("q_proj", "v_proj"), cohort_seed=7)
    # Execute
    back = AdapterSpec.from_json(a.to_json())
    # Assert
    assert back == a
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != make(cohort_seed=8).fingerprint()
    assert a.scaling == 2.0


def test_spec_fingerprint_is_a_stable_test_vector() -> None:
    # A change here means every deployed cohort's spec identity changes: bump SPEC_FORMAT.
    spec = AdapterSpec(base_model_id="smollm2-135m-instruct", base_sha256=SHA, cohort_seed=1234)
    assert spec.to_json() == (
        '{"a_init":"kaiming_uniform","alpha":16.0,"base_model_id":"smollm2-135m-instruct",'
        f'"base_sha256":"{SHA}","cohort_seed":1234,"dtype":"float32","format":1,"rank":8,'
        '"target_modules":["q_proj","v_proj"]}'
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"base_model_id": "m", "base_sha256": SHA, "format": 99}), "format 99"),
        (json.dumps({"base_model_id": "m", "base_sha256": SHA, "colour": "red"}), "unknown field"),
        (json.dumps({"base_model_id": "m"}), "base_sha256"),
    ],
)
def test_bad_spec_json_gives_one_clear_error(text: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        AdapterSpec.from_json(text)


def test_provenance_round_trips_and_validates_lineage() -> None:
    spec = make()
    p = AdapterProvenance(
        spec=spec, version=3, parent=2, content_hash="c" * 64, metrics={"loss": 1.5}
    )
    assert AdapterProvenance.from_json(p.to_json()) == p
    with pytest.raises(SpecError, match="parent"):
        AdapterProvenance(spec=spec, version=2, parent=2, content_hash="c" * 64)
    with pytest.raises(SpecError, match="finite"):
        AdapterProvenance(
            spec=spec, version=1, content_hash="c" * 64, metrics={"loss": float("nan")}
        )
