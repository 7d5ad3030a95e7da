"""The single-device story, end to end, on the bundled demo notes.

Load the default base, give a fictional user (Nadia) a personal adapter from a seed,
fine-tune it on her notes on this machine, and show held-out loss and replies before and
after. Nothing leaves the machine.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from lorafleet.client.data import demo_notes_path, read_examples
from lorafleet.client.evaluate import perplexity
from lorafleet.client.runtime import Precision
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig

PROMPTS = (
    "Walked Turnip along the",
    "Crux Yard tonight with",
    "Sunday call with Mum at 11. She asked",
)


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def run_demo(
    *,
    profile: Path | None = None,
    steps: int = 40,
    precision: Precision = "auto",
    cache_dir: Path | None = None,
    max_new_tokens: int = 24,
) -> dict[str, float]:
    """Run the demo and return its headline numbers (held-out loss before and after)."""
    with tempfile.TemporaryDirectory(prefix="lorafleet-demo-") as tmp:
        root = profile if profile is not None else Path(tmp) / "nadia"
        _rule("1. load the frozen base and open Nadia's profile")
        started = time.perf_counter()
        pm = PersonalModel.open(root, precision=precision, cache_dir=cache_dir)
        print(f"base      {pm.spec.base_model_id}  (manifest sha256 {pm.spec.base_sha256[:16]}…)")
        print(
            f"adapter   rank {pm.spec.rank} on {', '.join(pm.spec.target_modules)}, A from seed {pm.spec.cohort_seed}"
        )
        print(f"trainable {pm.info()['trainable_parameters']:,} parameters (B only)")
        print(
            f"device    {pm.info()['device']}, precision {pm.precision}; ready in {time.perf_counter() - started:.1f}s"
        )

        notes = read_examples(demo_notes_path())
        _rule(f"2. replies of the bare base ({len(notes)} private notes stay on this machine)")
        before = {
            p: pm.generate(p, max_new_tokens=max_new_tokens, use_adapter=False, chat=False)
            for p in PROMPTS
        }
        for prompt, reply in before.items():
            print(f"  {prompt} … {reply!r}")

        _rule("3. fine-tune the personal adapter on this device")
        report = pm.train(
            notes, TrainConfig(steps=steps, precision=pm.precision, eval_every=10, patience=2)
        )
        r = report.result
        _rule("4. held-out notes: loss before and after")
        print(f"  notes: {report.train_examples} for training, {report.heldout_examples} held out")
        print(f"  {'':18s}{'loss':>8s}{'perplexity':>12s}")
        print(
            f"  {'base':18s}{r.heldout_loss_before:8.4f}{perplexity(r.heldout_loss_before):12.2f}"
        )
        print(
            f"  {'personal adapter':18s}{r.heldout_loss_after:8.4f}{perplexity(r.heldout_loss_after):12.2f}"
        )
        gain = 100 * (1 - r.heldout_loss_after / r.heldout_loss_before)
        print(
            f"  {r.steps} steps, {r.tokens_per_second:.0f} tokens/s, held-out loss {gain:.1f}% lower"
        )

        _rule("5. the same prompts with the personal adapter")
        for prompt in PROMPTS:
            reply = pm.generate(prompt, max_new_tokens=max_new_tokens, chat=False)
            print(f"  {prompt} …")
            print(f"      base:     {before[prompt]!r}")
            print(f"      personal: {reply!r}")
        if report.provenance is not None:
            print(
                f"\nsaved adapter version {report.provenance.version} (content {report.provenance.content_hash[:16]}…)"
            )
            if profile is not None:
                print(f"profile: {root}")
        return {
            "heldout_loss_before": r.heldout_loss_before,
            "heldout_loss_after": r.heldout_loss_after,
        }
