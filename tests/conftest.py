"""Shared fixtures: tiny models built here, so most tests need no download and run fast."""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI and these machines share 2 cores with other work: a slow draw or example is load,
# not a bug, so neither the too-slow health check nor per-example deadlines fail a test.
settings.register_profile("lorafleet", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("lorafleet")

CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Maya climbs at the gym on Tuesdays and Thursdays with her friend Jonas.",
    "The cat Pixel sleeps on the radiator every afternoon.",
    "Remember to water the basil and call the bakery about Saturday.",
    "Tidewatch is a small app that shows the tide tables for the harbour.",
    "Lunch was lentil soup again, and the bread from the corner bakery.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
] * 4


def build_tiny_model(folder: Path, *, seed: int = 0) -> Path:
    """Save a tiny Llama causal LM with a real fast BPE tokenizer and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Larger than the usual 0.02 so a 2-layer, width-32 model has logits with some
        # structure, and a rank-4 adapter visibly moves the loss within a few steps.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, with the reason, on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a tiny Llama (2 layers, width 32) and its tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    """The tiny model's tokenizer (a fast BPE with a ChatML template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@dataclass(frozen=True)
class Disk:
    """A real file system of its own (a small tmpfs) that a test can fill or make read-only.

    Tests run as root, so ``chmod`` cannot make a folder unwritable; a read-only mount
    and a full file system refuse root too (EROFS, ENOSPC).
    """

    path: Path

    def read_only(self) -> None:
        """Remount read-only: every write below ``path`` fails with EROFS."""
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def fill(self) -> None:
        """Write a filler file until the file system is full (ENOSPC)."""
        with open(self.path / "filler", "wb", buffering=0) as fh:
            for chunk in (1 << 20, 4096, 1):
                try:
                    while True:
                        fh.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Disk]:
    """A 64 MiB tmpfs mounted for this test; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "lorafleet-test", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"needs to mount a tmpfs (root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield Disk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
