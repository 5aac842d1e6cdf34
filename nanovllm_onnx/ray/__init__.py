"""The engine on Ray: Ray Serve for online serving (`build_app`, `app_builder` for `serve run`),
Ray Data for batch inference (`LLMPredictor`, `generate_dataset`). Install with
`pip install nano-vllm-onnx[ray]`."""

try:
    import ray  # noqa: F401
    from ray import data, serve  # noqa: F401
except ImportError as e:
    raise ImportError("nanovllm_onnx.ray needs Ray Serve and Ray Data: "
                      "pip install 'nano-vllm-onnx[ray]'") from e

from nanovllm_onnx.ray.batch import LLMPredictor, generate_dataset
from nanovllm_onnx.ray.deployment import app_builder, build_app

__all__ = ["LLMPredictor", "app_builder", "build_app", "generate_dataset"]
