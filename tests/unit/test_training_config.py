"""TrainingConfig as seed clients send it: camelCase, every hyperparameter checked, unknown names refused."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from shared.schemas import Hyperparameters, TrainingConfig

SEED_EXAMPLE: dict[str, Any] = {
    "dataRange": {"startDate": "2023-01-01T00:00:00.000Z", "endDate": "2024-01-01T00:00:00.000Z"},
    "hyperparameters": {
        "numLeaves": 31,
        "learningRate": 0.05,
        "featureFraction": 0.9,
        "baggingFraction": 0.8,
        "baggingFreq": 5,
        "minDataInLeaf": 20,
        "maxDepth": -1,
        "numIterations": 100,
        "objective": "binary",
        "metric": "binary_logloss",
        "verbosity": -1,
    },
    "validationSplit": 0.2,
    "targetColumn": "failure_indicator",
    "featureColumns": ["temperature", "pressure", "vibration", "current"],
    "datasetId": "ds_1",
}


def test_the_seed_clients_example_is_accepted_and_maps_to_lightgbm_names() -> None:
    config = TrainingConfig.model_validate(SEED_EXAMPLE)
    assert config.hyperparameters.to_lightgbm() == {
        "num_leaves": 31,
        "learning_rate": 0.05,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 5,
        "min_data_in_leaf": 20,
        "max_depth": -1,
        "num_iterations": 100,
        "objective": "binary",
        "metric": "binary_logloss",
        "verbosity": -1,
        "lambda_l1": 0.0,
        "lambda_l2": 0.0,
    }
    assert TrainingConfig.model_validate(config.to_wire()) == config


def test_an_unknown_hyperparameter_is_named() -> None:
    with pytest.raises(ValidationError) as raised:
        Hyperparameters.model_validate({"numLeaves": 31, "numTrees": 5})
    assert raised.value.errors()[0]["loc"] == ("numTrees",)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("numLeaves", 1),
        ("learningRate", 0),
        ("featureFraction", 1.5),
        ("baggingFraction", 0),
        ("baggingFreq", -1),
        ("minDataInLeaf", -1),
        ("maxDepth", 0),
        ("numIterations", 0),
        ("objective", "regression"),
        ("verbosity", 3),
        # another JSON type, refused rather than converted
        ("numLeaves", "31"),
        ("numLeaves", 31.0),
        ("numLeaves", True),
        ("learningRate", "0.1"),
        ("learningRate", True),
        ("isUnbalance", "yes"),
        ("isUnbalance", 1),
    ],
)
def test_each_hyperparameter_is_range_and_type_checked(name: str, value: object) -> None:
    with pytest.raises(ValidationError) as raised:
        Hyperparameters.model_validate({name: value})
    assert raised.value.errors()[0]["loc"] == (name,)


def test_a_whole_number_is_taken_where_a_fraction_may_be_given() -> None:
    assert Hyperparameters.model_validate({"learningRate": 1, "lambdaL1": 0}).learning_rate == 1.0


def test_dates_without_a_zone_are_utc_and_an_end_before_the_start_is_refused() -> None:
    config = TrainingConfig.model_validate(
        {**SEED_EXAMPLE, "dataRange": {"startDate": "2023-01-01", "endDate": "2023-02-01"}}
    )
    assert config.data_range is not None and config.data_range.start_date.utcoffset() is not None
    with pytest.raises(ValidationError, match="endDate is before startDate"):
        TrainingConfig.model_validate(
            {**SEED_EXAMPLE, "dataRange": {"startDate": "2023-02-01", "endDate": "2023-01-01"}}
        )


def test_a_feature_named_twice_or_used_as_target_is_refused() -> None:
    with pytest.raises(ValidationError, match="more than once: pressure"):
        TrainingConfig.model_validate({**SEED_EXAMPLE, "featureColumns": ["pressure", "pressure"]})
    with pytest.raises(ValidationError, match="also in featureColumns"):
        TrainingConfig.model_validate({**SEED_EXAMPLE, "featureColumns": ["failure_indicator"]})


def test_a_feature_column_with_an_empty_name_is_refused_naming_its_item() -> None:
    """No dataset column has an empty name (an upload refuses one), so no feature can be one."""
    with pytest.raises(ValidationError, match="item 1 is empty") as refused:
        TrainingConfig.model_validate({**SEED_EXAMPLE, "featureColumns": ["pressure", ""]})
    assert [error["loc"] for error in refused.value.errors()] == [("featureColumns",)]


def test_the_options_beyond_the_seed_map_to_lightgbm_names() -> None:
    hyperparameters = Hyperparameters.model_validate(
        {"earlyStoppingRounds": 20, "scalePosWeight": 25.0, "lambdaL1": 0.5, "lambdaL2": 1.0, "seed": 7}
    )
    params = hyperparameters.to_lightgbm()
    assert params["early_stopping_round"] == 20 and params["scale_pos_weight"] == 25.0
    assert (params["lambda_l1"], params["lambda_l2"], params["seed"]) == (0.5, 1.0, 7)
    assert "is_unbalance" not in params


def test_multiclass_takes_multiclass_metrics_and_defaults_to_multi_logloss() -> None:
    assert Hyperparameters(objective="multiclass").to_lightgbm()["metric"] == "multi_logloss"
    with pytest.raises(ValidationError, match="does not go with objective"):
        Hyperparameters.model_validate({"objective": "multiclass", "metric": "auc"})


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"isUnbalance": True, "scalePosWeight": 3.0}, "give one of them"),
        ({"objective": "multiclass", "isUnbalance": True}, "binary objective only"),
        ({"scalePosWeight": 0}, "greater than 0"),
        ({"lambdaL2": -1}, "greater than or equal to 0"),
        ({"earlyStoppingRounds": 0}, "greater than or equal to 1"),
    ],
)
def test_inconsistent_or_out_of_range_options_are_refused(given: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        Hyperparameters.model_validate(given)


@pytest.mark.parametrize("positive", ["failure", "1", 1, 2.5, True])
def test_a_positive_class_keeps_its_json_type(positive: object) -> None:
    config = TrainingConfig.model_validate({**SEED_EXAMPLE, "positiveClass": positive})

    assert config.positive_class == positive and type(config.positive_class) is type(positive)
    assert config.to_wire()["positiveClass"] == positive


def test_a_positive_class_is_refused_for_a_multiclass_objective() -> None:
    body = {**SEED_EXAMPLE, "hyperparameters": {"objective": "multiclass"}, "positiveClass": "failure"}

    with pytest.raises(ValidationError, match="a positive class applies to the binary objective only") as raised:
        TrainingConfig.model_validate(body)

    assert raised.value.errors()[0]["loc"] == ("positiveClass",)
