"""Offline API, shaped like vLLM's `LLM`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

from tqdm import tqdm

from nanovllm_onnx.config import EngineConfig
from nanovllm_onnx.engine.llm_engine import LLMEngine
from nanovllm_onnx.engine.tokenizer import Message
from nanovllm_onnx.outputs import CompletionOutput, RequestOutput
from nanovllm_onnx.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, **engine_args: object) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **engine_args))  # type: ignore[arg-type]

    def get_tokenizer(self):  # noqa: ANN201 - the tokenizers.Tokenizer
        return self.llm_engine.tokenizer.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt"|"prompt_token_ids": ...});
        results come back in input order."""
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return self._run([_unwrap(p) for p in prompts], params, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them (with the
        tools, in OpenAI's form, where given)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.llm_engine.tokenizer
        prompts = [tok.chat_prompt_ids(c, add_generation_prompt, tools)  # type: ignore[arg-type]
                   for c in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out, conv in zip(outputs, conversations):
            out.prompt = tok.apply_chat_template(conv, add_generation_prompt, tools)  # type: ignore[arg-type]
        return outputs

    def _run(self, prompts: list[str | list[int]], params: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        for prompt, p in zip(prompts, params):
            rid = engine.new_request_id()
            order.append(rid)
            try:
                engine.add_request(rid, prompt, p)
            except ValueError as e:  # one bad prompt must not stop the others
                logger.warning("request %s rejected: %s", rid, e)
                results[rid] = _rejected(rid, prompt, str(e))
        bar = tqdm(total=len(order), desc="Processed prompts", disable=not use_tqdm)
        bar.update(len(results))
        start, generated = time.perf_counter(), 0
        pending = set(order) - set(results)
        while pending:
            steps = engine.num_steps
            outputs = engine.step()
            if engine.num_steps == steps:  # nothing was scheduled, and nothing will change
                bar.close()
                raise RuntimeError(
                    f"{len(pending)} requests cannot progress: the scheduler can run none of "
                    f"them ({engine.get_num_unfinished_requests()} unfinished in the engine; "
                    "too little free KV cache, or aborted from outside)")
            for out in outputs:
                generated += sum(len(o.token_ids) for o in out.outputs) if out.finished else 0
                if out.finished:
                    results[out.request_id] = out
                    pending.discard(out.request_id)
                    bar.update(1)
                    bar.set_postfix(output_tok_s=f"{generated / (time.perf_counter() - start):.1f}")
        bar.close()
        return [results[rid] for rid in order]


def _unwrap(prompt: Prompt) -> str | list[int]:
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError("a prompt dict needs a 'prompt' or 'prompt_token_ids' key")
    return prompt


def _rejected(rid: str, prompt: str | list[int], error: str) -> RequestOutput:
    return RequestOutput(
        request_id=rid, prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=[] if isinstance(prompt, str) else list(prompt),
        outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")],
        finished=True, error=error,
    )
