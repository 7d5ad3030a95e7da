"""A simulated device told where its users are: what it says when the folder is wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from lorafleet.client.federated import make_client_app
from lorafleet.protocols.federation import INSTRUCTION_KEY, REFUSAL_PREFIX, RoundInstruction
from lorafleet.protocols.spec import AdapterSpec

SPEC = AdapterSpec(base_model_id="tiny", base_sha256=hashlib.sha256(b"tiny").hexdigest(), rank=4)


@pytest.fixture(autouse=True)
def coordinator_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the running task's ids; this test is that task."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def round_request() -> Message:
    instr = RoundInstruction(round=1, spec=SPEC, prior_version="zero", seq_len=32)
    content = RecordDict({INSTRUCTION_KEY: ConfigRecord(instr.to_config())})  # type: ignore[arg-type]
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def answer(run_config: dict[str, str]) -> Message:
    """What the real ClientApp replies to a training request on virtual node 0."""
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config=run_config,  # type: ignore[arg-type]
    )
    return make_client_app()(round_request(), context)


@pytest.mark.parametrize(
    ("users_dir", "expected"),
    [
        ("runs/no/such/users", "sim-users-dir 'runs/no/such/users' does not exist in"),
        ("{tmp}/absent", "sim-users-dir '{tmp}/absent' does not exist;"),
        ("{tmp}/empty", "holds no user folders"),
        ("", "this node has no data"),
    ],
)
def test_a_device_without_users_answers_with_one_line_naming_the_path_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, users_dir: str, expected: str
) -> None:
    # Prepare: relative paths are read from the working folder
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").mkdir()

    # Execute
    reply = answer({"sim-users-dir": users_dir.format(tmp=tmp_path)})

    # Assert: an error reply, not an exception, in the words a person can act on
    assert reply.has_error() and not reply.has_content()
    reason = reply.error.reason
    assert reason.startswith(REFUSAL_PREFIX)
    assert expected.format(tmp=tmp_path) in reason, reason
    assert "\n" not in reason
    if users_dir.startswith("runs/"):
        assert str(tmp_path / "runs/no/such/users") in reason  # where it looked
    if users_dir != "":
        assert "lorafleet-sim prepare" in reason
