"""Execution providers, session options and `doctor`, as the guide's workflow uses them."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.config import EngineConfig
from nanovllm_onnx.kernels import kernel_target
from tests.conftest import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_cuda_falls_back_to_cpu_with_one_warning(converted: dict[str, Path],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    prompts = random_prompts(3, seed=4)
    expected = LLM(str(converted["llama"])).generate(prompts, GREEDY, use_tqdm=False)
    with caplog.at_level(logging.INFO):
        llm = LLM(str(converted["llama"]), providers=["cuda", "cpu"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "CUDAExecutionProvider is not available" in warnings[0].message
    assert llm.llm_engine.runner.session.get_providers() == ["CPUExecutionProvider"]
    threads = llm.llm_engine.config.intra_op_num_threads
    assert any(f"providers CPUExecutionProvider, {threads} intra-op" in r.getMessage()
               for r in caplog.records)
    got = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_session_options_reach_onnx_runtime(converted: dict[str, Path]) -> None:
    llm = LLM(str(converted["llama"]), intra_op_num_threads=1, inter_op_num_threads=2,
              execution_mode="parallel", graph_optimization_level="basic",
              enable_mem_pattern=False, enable_cpu_mem_arena=False, intra_op_spinning=False)
    opts = llm.llm_engine.runner.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 2)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert str(opts.execution_mode).endswith("ORT_PARALLEL")
    assert str(opts.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    assert not opts.enable_mem_pattern and not opts.enable_cpu_mem_arena
    assert len(llm.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 16


def test_sampler_threads_follow_the_pool_where_it_does_not_spin(
        converted: dict[str, Path]) -> None:
    """ONNX Runtime's idle pool lends the sampler its cores; spinning threads would hold them."""
    model = str(converted["llama"])
    resting = LLM(model, intra_op_num_threads=3, intra_op_spinning=False).llm_engine.sampler
    spinning = LLM(model, intra_op_num_threads=3).llm_engine.sampler
    assert (resting.num_threads, spinning.num_threads) == (3, 1)


@pytest.mark.parametrize("argv,spinning", [(["serve"], False),
                                            (["serve", "--intra-op-spinning"], True)])
def test_serve_runs_without_spinning_unless_asked(argv: list[str], spinning: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime's spinning threads would hold the cores the server's event loop (and
    clients on the same machine) need; offline engines keep ONNX Runtime's default."""
    from nanovllm_onnx import cli
    from nanovllm_onnx.server import api_server

    configs = []
    monkeypatch.setattr(api_server, "serve", lambda cfg, *args, **kwargs: configs.append(cfg))
    cli.main(argv)
    assert configs[0].intra_op_spinning is spinning
    assert EngineConfig().intra_op_spinning


def test_bad_session_option_is_named() -> None:
    with pytest.raises(ValueError, match="execution_mode"):
        LLM("unused", execution_mode="turbo")


def test_doctor_reports_versions_providers_and_cpu() -> None:
    out = subprocess.run([sys.executable, "-m", "nanovllm_onnx.cli", "doctor"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for expected in ("onnxruntime 1.", "execution providers: ", "CPUExecutionProvider",
                     "cpu: ", "threads (defaults): "):
        assert expected in out.stdout
    # the build the dispatcher picked for this CPU
    assert (f"kernels (SlotAttention, SwiGLU, BlockLinear, BlockGather): {kernel_target()} build"
            in out.stdout)


def test_weights_are_read_in_from_their_external_data_file(converted: dict[str, Path]) -> None:
    from nanovllm_onnx.runner.model_runner import external_data_files, map_in_huge_pages

    folder = converted["llama"]
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    (name,) = external_data_files(model)
    data = folder / name
    before = data.read_bytes()
    pages = map_in_huge_pages(data)  # drops the cached pages and reads them back: same bytes
    assert pages[:] == before and data.read_bytes() == before and len(before) > 0


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_block_weights_are_one_shared_mapping_of_their_file(
        hf_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int4 weights reach the session as arrays over one read-only shared mapping of their
    file (huge pages from end to end), not ONNX Runtime's mapping per initializer nor a copy;
    and they give the tokens of ONNX Runtime's own mappings."""
    import nanovllm_onnx.runner.model_runner as model_runner
    from nanovllm_onnx.convert.converter import convert

    convert(hf_models["llama"], tmp_path / "int4", "int4")
    prompts = random_prompts(2, seed=11)
    llm = LLM(str(tmp_path / "int4"), enable_prefix_caching=False)
    (name,) = model_runner.external_data_files(
        onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False))
    data = str((tmp_path / "int4" / name).resolve())
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
            if line.endswith(" " + data)]
    assert [m[1] for m in maps] == ["r--s"]
    tokens = llm.generate(prompts, GREEDY, use_tqdm=False)
    monkeypatch.setattr(model_runner, "map_weights", lambda model, folder: {})  # ORT maps them
    own = LLM(str(tmp_path / "int4"), enable_prefix_caching=False)
    assert ([o.outputs[0].token_ids for o in own.generate(prompts, GREEDY, use_tqdm=False)] ==
            [o.outputs[0].token_ids for o in tokens])
