"""nano-vllm-onnx: a small, fast LLM inference engine on ONNX Runtime."""

from nanovllm_onnx.config import EngineConfig
from nanovllm_onnx.engine.llm_engine import LLMEngine
from nanovllm_onnx.llm import LLM
from nanovllm_onnx.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm_onnx.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutputsParams",
]
