"""llama.cpp exports (#16 item 2): ``gguf-lora`` and ``gguf``, run by llama.cpp itself.

llama.cpp is reached through node-llama-cpp (npm, prebuilt binaries): no
llama-cpp-python wheel is served here. The slow test installs it once into a cache
folder outside the repository, from the npm registry only (install scripts off, so
nothing downloads a llama.cpp source or a browser; ``build: "never"`` at run time).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lorafleet.client.base import default_gguf_path
from lorafleet.client.data import demo_notes_path, to_examples
from lorafleet.client.gguf_export import (
    GGUF_LORA_FILE,
    GGUF_MODEL_FILE,
    gguf_base,
    lora_tensors,
    permute_rows,
    write_gguf_model,
)
from lorafleet.client.sdk import PersonalModel
from lorafleet.client.train import TrainConfig

NODE_LLAMA_CPP = "3.21.1"
# node-llama-cpp's prebuilt binary package for this machine (the ones npm serves).
_PREBUILT = {("Linux", "x86_64"): "linux-x64", ("Linux", "aarch64"): "linux-arm64"}


@pytest.mark.parametrize(("n_head", "out"), [(9, 576), (3, 192), (2, 8)])
def test_permute_rows_is_what_transformers_undoes_when_it_loads_a_gguf(
    n_head: int, out: int
) -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rows = np.random.default_rng(0).standard_normal((out, 5)).astype(np.float32)
    undone = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(rows, n_head), n_head)
    assert np.array_equal(undone, rows)
    assert not np.array_equal(permute_rows(rows, n_head), rows)


def test_lora_tensors_are_named_and_shaped_as_llama_cpp_checks() -> None:
    from lorafleet.protocols.manifest import DEFAULT_BASE_SHA256
    from lorafleet.protocols.spec import AdapterSpec

    base = gguf_base("default", "gguf-lora")  # the header only: no model loads
    spec = AdapterSpec(
        base_model_id="SmolLM2-135M-Instruct",
        base_sha256=DEFAULT_BASE_SHA256,
        rank=4,
        target_modules=("q_proj", "k_proj", "down_proj"),
    )
    rng = np.random.default_rng(1)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    b = {
        q: rng.standard_normal((576, 4)).astype(np.float32),
        k: rng.standard_normal((192, 4)).astype(np.float32),
        "model.layers.29.mlp.down_proj": rng.standard_normal((576, 4)).astype(np.float32),
    }
    pairs = lora_tensors(base, spec, b)
    # llama.cpp: lora_a ne = [in, r] (numpy (r, in)), lora_b ne = [r, out] (numpy (out, r))
    assert {n: (a.shape, bb.shape) for n, (a, bb) in pairs.items()} == {
        "blk.0.attn_q.weight": ((4, 576), (576, 4)),
        "blk.0.attn_k.weight": ((4, 576), (192, 4)),
        "blk.29.ffn_down.weight": ((4, 1536), (576, 4)),
    }
    # q/k rows are permuted with their own head counts (9 and 3), the MLP's are not.
    assert np.array_equal(pairs["blk.0.attn_q.weight"][1], permute_rows(b[q], 9))
    assert np.array_equal(pairs["blk.0.attn_k.weight"][1], permute_rows(b[k], 3))
    assert np.array_equal(pairs["blk.29.ffn_down.weight"][1], b["model.layers.29.mlp.down_proj"])


def test_a_personal_a_is_written_as_it_is() -> None:
    from lorafleet.protocols.errors import LorafleetError
    from lorafleet.protocols.manifest import DEFAULT_BASE_SHA256
    from lorafleet.protocols.spec import AdapterSpec

    base = gguf_base("default", "gguf-lora")
    spec = AdapterSpec(
        base_model_id="SmolLM2-135M-Instruct", base_sha256=DEFAULT_BASE_SHA256, rank=4
    )
    rng = np.random.default_rng(2)
    q = "model.layers.0.self_attn.q_proj"
    b = {q: rng.standard_normal((576, 4)).astype(np.float32)}
    a = {q: rng.standard_normal((4, 576)).astype(np.float32)}
    # input features are not permuted, so a personal A goes in unchanged
    assert np.array_equal(lora_tensors(base, spec, b, a)["blk.0.attn_q.weight"][0], a[q])
    with pytest.raises(LorafleetError, match="adapter A of"):
        lora_tensors(base, spec, b, {q: a[q][:, :100]})


# ---------------------------------------------------------------- llama.cpp itself
_RUNNER = textwrap.dedent(
    """
    import {readFileSync} from "node:fs";
    import {getLlama, LlamaLogLevel} from "node-llama-cpp";

    // Greedy tokens for each run: {model, lora}; one process, each model loaded once.
    const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
    const llama = await getLlama({gpu: false, build: "never", skipDownload: true,
                                  logLevel: LlamaLogLevel.error, maxThreads: 2});
    const models = new Map();
    const results = [];
    for (const run of job.runs) {
      if (!models.has(run.model))
        models.set(run.model, await llama.loadModel({modelPath: run.model, gpuLayers: 0}));
      const options = {contextSize: 128, threads: 2};
      if (run.lora) options.lora = {adapters: [{filePath: run.lora, scale: 1}]};
      const context = await models.get(run.model).createContext(options);
      const tokens = [];
      for await (const t of context.getSequence().evaluate(job.ids, {temperature: 0})) {
        tokens.push(t);
        if (tokens.length >= job.n || t === job.eos) break;
      }
      results.push(tokens);
      await context.dispose();
    }
    console.log(JSON.stringify(results));
    for (const m of models.values()) await m.dispose();
    await llama.dispose();
    """
)


def _npm_env() -> dict[str, str]:
    # Install scripts stay off: node-llama-cpp's would fetch llama.cpp's source to build
    # it when no prebuilt binary fits. Only the npm registry is contacted.
    return {
        **os.environ,
        "npm_config_ignore_scripts": "true",
        "npm_config_audit": "false",
        "npm_config_fund": "false",
        "npm_config_update_notifier": "false",
        "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true",
    }


def _run(command: list[str], cwd: Path) -> str:
    """Run npm or node in ``cwd``; its stdout, or a failure with its stderr's tail."""
    proc = subprocess.run(
        command, cwd=cwd, env=_npm_env(), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="session")
def node_llama_cpp() -> Path:
    """A folder with node-llama-cpp and its prebuilt binary installed (once, cached)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run llama.cpp through node-llama-cpp")
    prebuilt = _PREBUILT.get((platform.system(), platform.machine()))
    if prebuilt is None:
        pytest.skip(f"no node-llama-cpp prebuilt binary is wired up for {platform.machine()}")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = cache / "lorafleet" / "node" / f"node-llama-cpp-{NODE_LLAMA_CPP}"
    installed = folder / "node_modules" / "@node-llama-cpp" / prebuilt / "package.json"
    if not installed.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"private": true, "type": "module"}\n')
        _run(
            [
                "npm",
                "install",
                "--save-exact",
                "--omit=optional",  # the other platforms' and CUDA binaries: ~600 MB
                f"node-llama-cpp@{NODE_LLAMA_CPP}",
                f"@node-llama-cpp/{prebuilt}@{NODE_LLAMA_CPP}",
            ],
            folder,
        )
    (folder / "greedy.mjs").write_text(_RUNNER)
    return folder


def _llama_cpp_greedy(
    runner: Path, runs: list[tuple[Path, Path | None]], ids: list[int], eos: int, tmp: Path
) -> list[list[int]]:
    job = tmp / "job.json"
    job.write_text(
        json.dumps(
            {
                "ids": ids,
                "n": 32,
                "eos": eos,
                "runs": [{"model": str(m), "lora": str(lo) if lo else None} for m, lo in runs],
            }
        )
    )
    stdout = _run(["node", str(runner / "greedy.mjs"), str(job)], runner)
    result: list[list[int]] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _trained_on_demo_notes(
    tmp_path: Path, targets: tuple[str, ...], steps: int, lr: float
) -> PersonalModel:
    """A personal model on the default base, trained briefly at a high rate (fp32)."""
    pm = PersonalModel.open(
        tmp_path / "p", precision="fp32", device="cpu", seq_len=64, target_modules=targets
    )
    notes = to_examples(demo_notes_path())[:12]
    config = TrainConfig(steps=steps, lr=lr, eval_every=100, precision="fp32")
    pm.train(notes, config, progress=False)
    return pm


@pytest.mark.slow
def test_llama_cpp_runs_the_gguf_exports_as_lorafleet_does(
    node_llama_cpp: Path, tmp_path: Path
) -> None:
    # Prepare: a short run with a high rate on the default base, on q, k, v and o, so
    # both permuted projections (q: 9 heads, k: 3) and unpermuted ones carry a delta.
    pm = _trained_on_demo_notes(tmp_path, ("q_proj", "k_proj", "v_proj", "o_proj"), 4, 0.02)
    prompt = "Crux Yard tonight with"
    tokenizer = pm.base.tokenizer
    ids = [int(t) for t in tokenizer(prompt)["input_ids"]]
    mine = pm.generate(prompt, chat=False, max_new_tokens=32)
    bare = pm.generate(prompt, chat=False, max_new_tokens=32, use_adapter=False)
    # Execute: both exports, and the float32 de-quantized base the adapter trained on
    lora = pm.export(tmp_path / "lora", "gguf-lora") / GGUF_LORA_FILE
    merged = pm.export(tmp_path / "merged", "gguf") / GGUF_MODEL_FILE
    f32_base = tmp_path / "base-f32.gguf"
    write_gguf_model(default_gguf_path(), f32_base, {})
    q4 = default_gguf_path()
    runs = [(f32_base, lora), (merged, None), (f32_base, None), (q4, lora), (q4, None)]
    got = _llama_cpp_greedy(node_llama_cpp, runs, ids, tokenizer.eos_token_id, tmp_path)
    f32_lora, f32_merged, f32_bare, q4_lora, q4_bare = (
        str(tokenizer.decode(t, skip_special_tokens=True)).strip() for t in got
    )
    # Assert: on the weights lorafleet computes with, llama.cpp gives lorafleet's
    # 32 greedy tokens, with the LoRA file and merged; the adapter changes them.
    assert mine != bare
    assert f32_lora == mine
    assert f32_merged == mine
    assert f32_bare == bare
    # On the shipped Q4_1 file llama.cpp quantizes activations too, so its text may part
    # from lorafleet's late; the adapter must still move it onto lorafleet's opening.
    assert q4_lora != q4_bare
    assert q4_lora[:12] == mine[:12], (q4_lora, mine)
    card = (tmp_path / "lora" / "README.md").read_text()
    assert f"-m {q4.name} --lora lora/adapter.gguf" in card


@pytest.mark.slow
def test_llama_cpp_agrees_with_an_adapter_on_the_permuted_projections_alone(
    node_llama_cpp: Path, tmp_path: Path
) -> None:
    # Prepare: an adapter on q and k only, the two projections whose rows llama.cpp
    # permutes, strong enough to change most of the 32 greedy tokens; a mix-up of the
    # permutation (or of q with k) would then show in the text, not hide behind v and o.
    pm = _trained_on_demo_notes(tmp_path, ("q_proj", "k_proj"), 8, 0.05)
    prompt = "Crux Yard tonight with"
    tokenizer = pm.base.tokenizer
    ids = [int(t) for t in tokenizer(prompt)["input_ids"]]
    mine_ids = tokenizer(pm.generate(prompt, chat=False, max_new_tokens=32))["input_ids"]
    bare_ids = tokenizer(pm.generate(prompt, chat=False, max_new_tokens=32, use_adapter=False))[
        "input_ids"
    ]
    # Execute
    lora = pm.export(tmp_path / "lora", "gguf-lora") / GGUF_LORA_FILE
    f32_base = tmp_path / "base-f32.gguf"
    write_gguf_model(default_gguf_path(), f32_base, {})
    got = _llama_cpp_greedy(
        node_llama_cpp, [(f32_base, lora)], ids, tokenizer.eos_token_id, tmp_path
    )
    theirs = tokenizer(str(tokenizer.decode(got[0], skip_special_tokens=True)).strip())["input_ids"]
    # Assert: the q/k adapter moves the text early, and llama.cpp follows it token for token
    differs_at = next(
        (i for i, (a, b) in enumerate(zip(mine_ids, bare_ids, strict=False)) if a != b),
        min(len(mine_ids), len(bare_ids)),
    )
    assert differs_at < 16, (differs_at, mine_ids, bare_ids)
    assert theirs == mine_ids
