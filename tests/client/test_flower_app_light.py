"""The ClientApp module a SuperNode's per-message process imports stays light."""

from __future__ import annotations

import subprocess
import sys


def test_the_clientapp_module_imports_no_torch_transformers_or_peft() -> None:
    # Execute: a fresh interpreter, as flwr-clientapp is, loading the app object
    code = (
        "import sys\n"
        "from lorafleet.client.flower_app import app\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )

    # Assert: SecAgg+'s stages and device-worker rounds never pay for them
    assert out.stdout.strip() == ""


def test_the_app_is_still_importable_from_its_old_home() -> None:
    from lorafleet.client import federated, flower_app

    assert federated.app is flower_app.app
    assert federated.make_client_app is flower_app.make_client_app
