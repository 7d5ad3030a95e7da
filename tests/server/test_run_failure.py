"""A failed round becomes the run's failure, in one line that says what the devices said."""

from __future__ import annotations

import pytest

from lorafleet.protocols.federation import REFUSAL_PREFIX
from lorafleet.server.flower_app import RoundOutcome, failure_causes

NO_USERS = "sim-users-dir 'runs/sim/users' does not exist; write user folders there"


@pytest.mark.parametrize(
    ("refused", "dropouts", "expected"),
    [
        (
            {1: f"error: {REFUSAL_PREFIX}{NO_USERS}", 2: f"error: {REFUSAL_PREFIX}{NO_USERS}"},
            0,
            f"; 2 of 3 device(s) refused: {NO_USERS}",
        ),
        (
            {
                1: f"error: {REFUSAL_PREFIX}{NO_USERS}",
                2: f"error: {REFUSAL_PREFIX}{NO_USERS}",
                3: "norm 12.0 above clip-norm 10.0",
            },
            0,
            f"; 2 of 3 device(s) refused: {NO_USERS} (and 1 other refusal(s))",
        ),
        ({7: "error: <class 'RuntimeError'>:<'" + "x" * 500 + "'>"}, 0, None),
        ({}, 3, "; 3 device(s) did not answer"),
        ({}, 0, ""),
    ],
)
def test_the_failure_quotes_the_devices_commonest_refusal(
    refused: dict[int, str], dropouts: int, expected: str | None
) -> None:
    # Prepare
    outcome = RoundOutcome(round=1, attempt=0, sampled=3, refused=refused, dropouts=dropouts)

    # Execute
    text = failure_causes(outcome)

    # Assert
    if expected is None:  # a crash's repr is cut short, never quoted whole
        assert text.startswith("; 1 of 3 device(s) refused: <class 'RuntimeError'>")
        assert len(text) < 220
    else:
        assert text == expected
