"""The device's half of the narrow masked upload (see :mod:`lorafleet.protocols.masked`).

Flower's ``secaggplus_mod`` writes the masked vector into its reply as int64 arrays
(``np.save`` bytes). :func:`narrow_masked_reply` runs on that reply, after the mod and
before the message leaves the device, and rewrites each array in the smallest unsigned
type the round's modulus needs. It changes the encoding only: the values, and so what
the coordinator can learn, are the same.
"""

from __future__ import annotations

from typing import cast

from flwr.app import Context, Message
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
)

from lorafleet.protocols.errors import IntegrityError
from lorafleet.protocols.masked import narrow_masked


def narrow_masked_reply(reply: Message, context: Context) -> Message:
    """``reply`` with its masked arrays narrowed; other messages unchanged.

    The modulus is the one the coordinator set at the round's setup stage, which the mod
    keeps in the node's state.
    """
    if not reply.has_content() or RECORD_KEY_CONFIGS not in reply.content.config_records:
        return reply
    configs = reply.content.config_records[RECORD_KEY_CONFIGS]
    if Key.MASKED_PARAMETERS not in configs:
        return reply
    state = context.state.config_records.get(RECORD_KEY_STATE)
    modulus = int(cast(int, state.get(Key.MOD_RANGE, 0))) if state is not None else 0
    if modulus < 2:
        raise IntegrityError("SecAgg+ masked a vector without a modulus in the node's state")
    arrays = cast(list[bytes], configs[Key.MASKED_PARAMETERS])
    configs[Key.MASKED_PARAMETERS] = [
        ndarray_to_bytes(narrow_masked(bytes_to_ndarray(b), modulus)) for b in arrays
    ]
    return reply
