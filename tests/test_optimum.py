"""Optimum exports (`optimum-cli export onnx --task text-generation-with-past`) run as they are.

Optimum's ONNX exporter (optimum-onnx 0.1.0, the newest) needs transformers < 4.58 and imports
internals transformers 5 removed, so these exports are made with torch.onnx in Optimum's exact
layout: the same file names, input and output names, shapes and dimension names.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from nanovllm_onnx import LLM, SamplingParams
from nanovllm_onnx.cli import main
from nanovllm_onnx.convert.source import ModelLoadError
from nanovllm_onnx.runner.optimum_runner import OptimumRunner
from tests.conftest import (
    VOCAB,
    build_hf_model,
    random_prompts,
    reference_greedy,
    save_tiny_model,
)

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
# transformers' default (0.02) leaves these tiny models' greedy output one token repeated,
# whatever the prompt, which would hide wrong positions or masks; 0.2 makes it depend on them.
INIT_RANGE = 0.2
EXPORT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def build_gpt2(folder: Path) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                           bos_token_id=1, eos_token_id=4, initializer_range=INIT_RANGE)
    return save_tiny_model(tf.GPT2LMHeadModel(config).eval(), folder, norm_marker=".ln_")


def export_like_optimum(hf_folder: Path, out: Path, graph_name: str, position_ids: bool,
                        cache_branch: bool) -> Path:
    """Export as Optimum does: input_ids, attention_mask, [position_ids],
    past_key_values.N.key/value in; logits, present.N.key/value out."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    num_layers = model.config.num_hidden_layers

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model  # a submodule, so its weights become initializers

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
            positions, past = (rest[0], rest[1:]) if position_ids else (None, rest)
            cache = DynamicCache(config=model.config)
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions, past_key_values=cache, use_cache=True)
            layers = out.past_key_values.layers
            return (out.logits, *(t for layer in layers for t in (layer.keys, layer.values)))

    batch, past_len, new = 2, 3, 4
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    head_dim = model.config.hidden_size // heads
    total = "past_sequence_length + sequence_length"
    mask = torch.ones(batch, past_len + new, dtype=torch.int64)
    mask[0, :2] = 0  # padding in the example, so the traced graph keeps the mask
    inputs = {"input_ids": torch.randint(0, VOCAB, (batch, new)), "attention_mask": mask}
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: total},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    if position_ids:
        inputs["position_ids"] = torch.arange(past_len, past_len + new).repeat(batch, 1)
        axes["position_ids"] = {0: "batch_size", 1: "sequence_length"}
    outputs = ["logits"]
    for i in range(num_layers):
        for kind in ("key", "value"):
            inputs[f"past_key_values.{i}.{kind}"] = torch.randn(batch, kv_heads, past_len,
                                                                 head_dim)
            axes[f"past_key_values.{i}.{kind}"] = {0: "batch_size", 2: "past_sequence_length"}
            outputs.append(f"present.{i}.{kind}")
            axes[f"present.{i}.{kind}"] = {0: "batch_size", 2: total}
    out.mkdir(parents=True)
    graph = out / graph_name
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it freezes: expected
        torch.onnx.export(WithPast(), tuple(inputs.values()), str(graph),
                          input_names=list(inputs), output_names=outputs, dynamic_axes=axes,
                          dynamo=False, opset_version=17)
    if cache_branch:
        # A real decoder_model_merged.onnx switches on use_cache_branch between a no-past and a
        # with-past decoder; this with-past graph also takes an empty past, so it stands for
        # both, and the flag is an input it leaves unused.
        proto = onnx.load(str(graph))
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1]))
        onnx.save(proto, str(graph))
    for name in EXPORT_FILES:
        shutil.copy(hf_folder / name, out / name)
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (transformers folder, its Optimum-layout export), made once."""
    root = tmp_path_factory.mktemp("optimum")
    gpt2 = build_gpt2(root / "gpt2-hf")
    qwen2 = build_hf_model("qwen2", root / "qwen2-hf", initializer_range=INIT_RANGE)
    return {
        # GPT-2: learned positions, no position_ids input (positions follow the past's length).
        "gpt2": (gpt2, export_like_optimum(gpt2, root / "gpt2", "model.onnx",
                                           position_ids=False, cache_branch=False)),
        # Qwen2: rotary positions from position_ids; the merged decoder's file and input names.
        "qwen2": (qwen2, export_like_optimum(qwen2, root / "qwen2", "decoder_model_merged.onnx",
                                             position_ids=True, cache_branch=True)),
    }


@pytest.fixture(scope="module", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """LLM(export) converts into the cache: a temporary one, not the user's."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANO_VLLM_ONNX_CACHE", str(cache))
        yield cache


def prompts_with_shared_prefixes() -> list[list[int]]:
    shared = random_prompts(1, seed=3, lo=40, hi=40)[0]  # 2 full blocks of 16 and a bit
    tails = random_prompts(4, seed=4, lo=1, hi=12)
    others = random_prompts(4, seed=5, lo=2, hi=50)
    return [shared + tails[0], *others[:2], shared + tails[1], others[2], shared + tails[2],
            others[3], shared + tails[3]]


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_greedy_matches_transformers(name: str, exports: dict[str, tuple[Path, Path]]) -> None:
    hf_folder, export = exports[name]
    prompts = prompts_with_shared_prefixes()
    # Fewer slots than prompts and small token budgets: continuous batching, chunked prefill
    # and decodes of different past lengths share steps.
    llm = LLM(str(export), max_num_seqs=3, max_num_batched_tokens=24)
    engine = llm.llm_engine
    assert isinstance(engine.runner, OptimumRunner)
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == reference_greedy(hf_folder, prompts,
                                                                         NEW_TOKENS)
    assert engine.block_manager.prefix_hits > 0
    assert any(o.num_cached_tokens for o in outputs)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_prompt_logprobs_match_transformers(name: str, exports: dict[str, tuple[Path, Path]]
                                            ) -> None:
    """Logits at every prompt position, from chunks padded into batches of different pasts."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_folder, export = exports[name]
    prompts = random_prompts(3, seed=6, lo=20, hi=40)
    llm = LLM(str(export), max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1).numpy()
        got = [out.prompt_logprobs[p][prompt[p]].logprob for p in range(1, len(prompt))]
        np.testing.assert_allclose(got, ref[np.arange(len(prompt) - 1), prompt[1:]], atol=1e-4)


@pytest.mark.parametrize("name,kv_heads", [("gpt2", 4), ("qwen2", 2)])
def test_config_comes_from_the_graph_and_config_json(name: str, kv_heads: int,
                                                     exports: dict[str, tuple[Path, Path]]
                                                     ) -> None:
    mc = LLM(str(exports[name][1])).llm_engine.model_config
    assert (mc.runner, mc.num_layers, mc.num_kv_heads, mc.head_dim) == ("optimum", 2, kv_heads, 16)
    assert (mc.vocab_size, mc.eos_token_ids, mc.max_position_embeddings) == (VOCAB, [4], 1024)


def test_int8_kv_cache_is_refused_by_name(exports: dict[str, tuple[Path, Path]]) -> None:
    """An export runs its own attention on float caches: int8 (this engine's SlotAttention
    only) is a clear error before any step, not a cache the graph cannot take."""
    with pytest.raises(ValueError, match="kv_cache_dtype=int8 needs a model converted by this "
                                         "engine"):
        LLM(str(exports["qwen2"][1]), kv_cache_dtype="int8")


def test_cli_model_flag(exports: dict[str, tuple[Path, Path]],
                        capsys: pytest.CaptureFixture[str]) -> None:
    export = exports["gpt2"][1]
    main(["generate", "Hello world", "--model", str(export), "--max-tokens", "8", "--no-chat"])
    expected = LLM(str(export)).generate("Hello world", SamplingParams(temperature=0, max_tokens=8),
                                         use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out == expected + "\n"


def copy_without(export: Path, tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(export, folder, ignore=shutil.ignore_patterns(*names))
    return folder


@pytest.mark.parametrize("missing", ["tokenizer.json", "config.json"])
def test_missing_file_names_it_and_the_export_command(missing: str, tmp_path: Path,
                                                      exports: dict[str, tuple[Path, Path]]
                                                      ) -> None:
    folder = copy_without(exports["gpt2"][1], tmp_path, missing)
    with pytest.raises(ModelLoadError, match=f"no {missing}.*optimum-cli export onnx --model M "
                                             "--task text-generation-with-past OUT"):
        LLM(str(folder))


def test_no_decoder_graph_names_the_files_wanted(tmp_path: Path,
                                                 exports: dict[str, tuple[Path, Path]]) -> None:
    folder = copy_without(exports["gpt2"][1], tmp_path)
    (folder / "model.onnx").rename(folder / "decoder_model.onnx")
    with pytest.raises(ModelLoadError, match="decoder_model.onnx but no model.onnx or "
                                             "decoder_model_merged.onnx.*with-past"):
        LLM(str(folder))


def test_graph_without_past_is_refused(tmp_path: Path,
                                       exports: dict[str, tuple[Path, Path]]) -> None:
    """What `--task text-generation` (no past) gives: input_ids, attention_mask -> logits."""
    from onnx import TensorProto, helper

    folder = copy_without(exports["gpt2"][1], tmp_path, "model.onnx")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["ids", "axis"], ["logits"])],
        "no_past",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 1])],
        [helper.make_tensor("axis", TensorProto.INT64, [1], [2])],
    )
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    with pytest.raises(ModelLoadError, match="not a decoder with past.*past_key_values.N.key/value"
                                             ".*text-generation-with-past"):
        LLM(str(folder))
