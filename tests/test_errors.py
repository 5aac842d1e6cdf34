"""Bad input gets a clear error naming the problem, and never stops the other requests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nanovllm_onnx import LLM, SamplingParams, kernels
from nanovllm_onnx.convert.converter import convert
from nanovllm_onnx.convert.source import ModelLoadError
from nanovllm_onnx.kernels import KernelBuildError


@pytest.fixture(scope="module")
def llm(converted: dict[str, Path]) -> LLM:
    return LLM(str(converted["llama"]), max_model_len=64)


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_kernels_not_built_or_older_than_their_sources(converted: dict[str, Path],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The package refuses to run without its built ops, or with ops built from other sources
    (an editable install whose ops.cc changed), naming how to rebuild."""
    monkeypatch.setattr(kernels, "LIBRARY", tmp_path / "ops.so")
    with pytest.raises(KernelBuildError, match="were not built.*pip install -e"):
        LLM(str(converted["llama"]))
    built = Path(kernels.__file__).parent
    for library in built.glob("ops*.so"):
        shutil.copy(library, tmp_path)
    for source in kernels.SOURCES:
        shutil.copy(built / source, tmp_path)
    kernels.custom_ops_library()  # the copy is as built
    with (tmp_path / "ops.cc").open("a") as f:
        f.write("// changed\n")
    with pytest.raises(KernelBuildError, match="built from other sources"):
        LLM(str(converted["llama"]))


def test_folder_without_tokenizer(hf_models: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(hf_models["llama"], tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        convert(folder, tmp_path / "out")


def test_folder_without_weights(hf_models: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(hf_models["llama"], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        convert(folder, tmp_path / "out")


def test_sharded_folder_missing_a_shard_or_a_weight(hf_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    """An interrupted download names the shard it lacks; a weight missing from every file is
    named too (not a KeyError from inside the converter)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32).save_pretrained(
        folder, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_models["llama"] / name, folder)
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"lacks {shard.name}, listed in model.safetensors"):
        convert(folder, tmp_path / "out")
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match=r"has no weight model\.\w"):
        convert(folder, tmp_path / "out")


def test_unknown_architecture_names_the_supported_ones(hf_models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    folder = shutil.copytree(hf_models["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        convert(folder, tmp_path / "out")


def test_malformed_config(hf_models: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(hf_models["llama"], tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        convert(folder, tmp_path / "out")


def test_kv_budget_too_small_says_what_to_lower(converted: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory_gib.*max_model_len"):
        LLM(str(converted["llama"]), kv_cache_memory_gib=1e-6)


@pytest.mark.parametrize("field,value", [
    ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("max_tokens", 0), ("n", 0),
])
def test_invalid_sampling_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_bad_prompts_do_not_stop_the_others(llm: LLM) -> None:
    good = [5, 6, 7]
    outputs = llm.generate(
        [good, list(range(5, 100)), [999999], [], good],
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False,
    )
    assert [o.error is None for o in outputs] == [True, False, False, False, True]
    assert "max_model_len=64" in outputs[1].error
    assert "token ids must be integers" in outputs[2].error
    assert "empty" in outputs[3].error
    assert outputs[0].outputs[0].token_ids == outputs[4].outputs[0].token_ids
    assert len(outputs[0].outputs[0].token_ids) == 4


def test_add_request_raises_for_the_engine_api(llm: LLM) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        llm.llm_engine.add_request("x", list(range(5, 100)))
    for params in (SamplingParams(stop_token_ids=[10**6]), SamplingParams(logit_bias={-1: 1.0})):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            llm.llm_engine.add_request("y", [5, 6], params)
    assert not llm.llm_engine.has_unfinished_requests()


def test_max_tokens_is_capped_by_the_context(llm: LLM) -> None:
    prompt = list(range(5, 65 - 4))  # leaves 4 positions of max_model_len=64
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 64 - len(prompt)
    assert out.outputs[0].finish_reason == "length"


def test_chat_without_template(converted: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(converted["llama"], tmp_path / "m")
    config = json.loads((folder / "nano_vllm_onnx.json").read_text())
    config["chat_template"] = None
    (folder / "nano_vllm_onnx.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        LLM(str(folder)).chat([{"role": "user", "content": "hi"}])
