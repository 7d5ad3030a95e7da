from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig
from lorafleet.protocols.atomic import TMP_PREFIX
from lorafleet.protocols.errors import DataError, IntegrityError, LorafleetError

NOTES = [
    "Maya climbs at the gym on Tuesdays and Thursdays with her friend Jonas.",
    "The cat Pixel sleeps on the radiator every afternoon.",
    "Tidewatch is a small app that shows the tide tables for the harbour.",
    "Lunch was lentil soup again, and the bread from the corner bakery.",
    "Remember to water the basil and call the bakery about Saturday.",
    "Jonas says the new route at the gym is a sandbagged five.",
    "Pixel knocked the basil off the windowsill again this morning.",
    "Tidewatch now shows the next low tide on the home screen.",
]
FAST = TrainConfig(steps=6, lr=0.05, eval_every=3, precision="fp32")


def open_pm(profile: Path, base: Path, **kw: object) -> PersonalModel:
    return PersonalModel.open(
        profile, base=base, rank=4, precision="fp32", device="cpu", seq_len=32, **kw
    )  # type: ignore[arg-type]


def test_train_saves_a_version_that_a_reopened_profile_uses(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    assert pm.version is None
    # Execute
    report = pm.train(NOTES, FAST, progress=False)
    again = open_pm(tmp_path / "p", tiny_model_dir)
    # Assert
    assert report.provenance is not None and report.provenance.version == 1
    assert report.result.heldout_loss_after < report.result.heldout_loss_before
    assert again.version == 1
    b1, b2 = pm.adapter_b(), again.adapter_b()
    assert all(np.array_equal(b1[k], b2[k]) for k in b1)
    prompt = "Maya climbs"
    assert again.generate(prompt, max_new_tokens=6, chat=False) == pm.generate(
        prompt, max_new_tokens=6, chat=False
    )


def test_a_test_fraction_is_set_aside_and_scored_never_trained_on(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    notes = NOTES + [f"{n} (again, note {i})" for i, n in enumerate(NOTES)]
    # Execute
    report = pm.train(notes, FAST, test_fraction=0.25, progress=False)
    # Assert: three disjoint sides, and the test losses are those of the saved adapter
    assert report.test_examples == 4
    assert report.train_examples + report.heldout_examples + report.test_examples == 16
    assert report.test_loss_before is not None and report.test_loss_after is not None
    assert report.test_loss_after < report.test_loss_before
    with pytest.raises(LorafleetError, match="test_fraction"):
        pm.train(notes, FAST, test_fraction=0.7, progress=False)


def test_versions_chain_and_rollback_moves_the_pointer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    pm.train(NOTES, FAST, progress=False)
    first = pm.adapter_b()
    pm.train(NOTES, FAST, progress=False)
    assert [p.version for p in pm.versions()] == [1, 2]
    assert pm.versions()[1].parent == 1
    pm.rollback(1)
    reopened = open_pm(tmp_path / "p", tiny_model_dir)
    assert reopened.version == 1
    assert all(np.array_equal(first[k], v) for k, v in reopened.adapter_b().items())
    with pytest.raises(LorafleetError, match="no adapter version 7"):
        pm.rollback(7)


def test_evaluate_reports_base_and_adapter_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    pm.train(NOTES, FAST, progress=False)
    rep = pm.evaluate(NOTES)
    assert rep.adapter_loss < rep.base_loss
    assert rep.tokens > 0 and rep.base_perplexity > rep.adapter_perplexity


def test_profile_refuses_another_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    open_pm(tmp_path / "p", tiny_model_dir)
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other)
    (other / "generation_config.json").write_text('{"max_length": 7}')  # a different manifest
    with pytest.raises(IntegrityError, match="open it with the same base"):
        open_pm(tmp_path / "p", other)


def test_a_corrupt_current_adapter_is_refused_on_open(tiny_model_dir: Path, tmp_path: Path) -> None:
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    pm.train(NOTES, FAST, progress=False)
    weights = tmp_path / "p" / "adapters" / "v0001" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        open_pm(tmp_path / "p", tiny_model_dir)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [([], "no training text"), (["one note", "two notes"], "need at least")],
)
def test_too_little_data_is_refused(
    tiny_model_dir: Path, tmp_path: Path, data: list[str], fragment: str
) -> None:
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    with pytest.raises(DataError, match=fragment):
        pm.train(data, FAST, progress=False)
    assert pm.versions() == []


def test_an_interrupted_save_leaves_the_previous_version_current(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: version 1 exists, then a save dies half way (a temp dir is all that is left)
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    pm.train(NOTES, FAST, progress=False)
    b1 = pm.adapter_b()
    stale = tmp_path / "p" / "adapters" / f"{TMP_PREFIX}abc"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    # Execute
    again = open_pm(tmp_path / "p", tiny_model_dir)
    # Assert
    assert again.version == 1 and not stale.exists()
    assert all(np.array_equal(b1[k], v) for k, v in again.adapter_b().items())


def test_a_full_disk_during_save_keeps_the_previous_version(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # A real write failure: the child process may only write files up to 4 KiB
    # (RLIMIT_FSIZE), so saving version 2's weights fails inside the OS.
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    pm.train(NOTES, FAST, progress=False)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from lorafleet.client.sdk import PersonalModel
        from lorafleet.client.train import TrainConfig
        from lorafleet.protocols.errors import LorafleetError
        pm = PersonalModel.open({str(tmp_path / "p")!r}, base={str(tiny_model_dir)!r}, precision="fp32", device="cpu", seq_len=32)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            pm.train({NOTES!r}, TrainConfig(steps=2, lr=0.05, precision="fp32"), progress=False)
        except LorafleetError as exc:
            print("ERROR:", exc)
            sys.exit(3)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "nothing was replaced" in proc.stdout
    again = open_pm(tmp_path / "p", tiny_model_dir)
    assert again.version == 1 and [p.version for p in again.versions()] == [1]
    assert not any(p.name.startswith(TMP_PREFIX) for p in (tmp_path / "p" / "adapters").iterdir())


def test_a_file_as_profile_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LorafleetError, match="is a file"):
        open_pm(f, tiny_model_dir)


def test_info_has_no_tensors_or_text(tiny_model_dir: Path, tmp_path: Path) -> None:
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    info = pm.info()
    assert info["trainable_parameters"] == 2 * (32 * 4 + 16 * 4)  # 2 layers: q (32x4) + v (16x4)
    assert set(info) >= {"profile", "base_sha256", "spec", "version"}
    assert os.fspath(tmp_path) in info["profile"]


def test_kill_9_during_saves_never_leaves_a_corrupt_profile(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a child process that saves version after version as fast as it can
    import signal
    import time

    script = textwrap.dedent(
        f"""
        import numpy as np
        from lorafleet.client.sdk import PersonalModel
        pm = PersonalModel.open({str(tmp_path / "p")!r}, base={str(tiny_model_dir)!r}, rank=4,
                                precision="fp32", device="cpu", seq_len=32)
        rng = np.random.default_rng(0)
        print("ready", flush=True)
        while True:
            pm.load_b({{k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in pm.adapter_b().items()}})
            pm.save()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        # Execute: let it write a few versions, then kill it mid-write
        deadline = time.monotonic() + 60
        adapters = tmp_path / "p" / "adapters"
        while time.monotonic() < deadline and len(list(adapters.glob("v*"))) < 4:
            time.sleep(0.05)
        time.sleep(0.037)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # Assert: the profile opens, its current version verifies, every listed version reads
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    assert pm.version is not None and pm.version >= 3
    versions = [p.version for p in pm.versions()]
    assert versions == list(range(1, len(versions) + 1))
    assert not any(p.name.startswith(TMP_PREFIX) for p in adapters.iterdir())


@pytest.mark.gpu
def test_training_on_cuda_in_bf16(tiny_model_dir: Path, tmp_path: Path) -> None:
    pm = PersonalModel.open(tmp_path / "p", base=tiny_model_dir, rank=4, device="cuda", seq_len=32)
    assert pm.precision == "bf16" and pm.info()["device"].startswith("cuda")
    report = pm.train(
        NOTES, TrainConfig(steps=10, lr=0.05, device="cuda", precision="bf16"), progress=False
    )
    assert report.result.heldout_loss_after < report.result.heldout_loss_before


def test_evaluating_the_bare_base_keeps_a_frozen(tiny_model_dir: Path, tmp_path: Path) -> None:
    # peft's disable_adapter() marks A trainable on exit; training after an evaluation
    # must still change B only, and the saved adapter must still verify against the seed.
    pm = open_pm(tmp_path / "p", tiny_model_dir)
    pm.evaluate(NOTES)
    pm.generate("Maya", max_new_tokens=2, use_adapter=False, chat=False)
    trainable = [n for n, p in pm.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B." in n for n in trainable)
    pm.train(NOTES, FAST, progress=False)
    assert open_pm(tmp_path / "p", tiny_model_dir).version == 1  # reads and verifies A


def test_reopening_uses_the_profiles_own_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    open_pm(tmp_path / "p", tiny_model_dir)
    again = PersonalModel.open(tmp_path / "p", precision="fp32", device="cpu", seq_len=32)
    assert again.spec.base_sha256 == again.base.sha256


def test_a_bad_target_on_first_open_writes_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lorafleet.protocols.errors import SpecError

    with pytest.raises(SpecError, match="match no Linear"):
        open_pm(tmp_path / "p", tiny_model_dir, target_modules=("qkv",))
    assert not (tmp_path / "p" / "profile.json").exists()


def test_prior_b_without_a_proximal_term_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lorafleet.protocols.errors import SpecError

    pm = open_pm(tmp_path / "p", tiny_model_dir)
    with pytest.raises(SpecError, match="prox_mu"):
        pm.train(NOTES, FAST, prior_b=pm.adapter_b(), progress=False)


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch

    pm = open_pm(tmp_path / "p", tiny_model_dir)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = pm.generate("Maya", max_new_tokens=5, chat=False, temperature=1.0, seed=7)
    assert torch.equal(torch.rand(1), expected_next)
    assert pm.generate("Maya", max_new_tokens=5, chat=False, temperature=1.0, seed=7) == a


def test_the_int8_training_path_trains_through_the_sdk(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a profile on the int8 quantized training path (B stays fp32)
    pm = PersonalModel.open(
        tmp_path / "p", base=tiny_model_dir, rank=4, precision="int8", device="cpu", seq_len=32
    )
    # Execute
    report = pm.train(
        NOTES, TrainConfig(steps=6, lr=0.05, eval_every=3, precision="int8"), progress=False
    )
    # Assert
    assert report.provenance is not None and report.provenance.version == 1
    assert report.result.heldout_loss_after < report.result.heldout_loss_before
    assert all(b.dtype == np.float32 for b in pm.adapter_b().values())
