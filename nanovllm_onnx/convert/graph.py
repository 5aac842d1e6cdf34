"""Emit the ONNX graph this engine runs: one call serves a whole continuous-batching step.

Layout of a step (T packed tokens, row after row, for B cache rows):
- Embedding, projections, attention and MLP all run on the T packed tokens: no padding.
- SlotAttention (the engine's own kernel, `nanovllm_onnx/kernels`) does rotary itself and
  writes the new K/V in place into the cache rows bound through IOBinding; `past_lens` and
  `query_lens` make rows ragged (decode, prefill, prefill chunk on top of a cache, idle).
- Logits only for the `logits_index` rows (the positions that are sampled).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from nanovllm_onnx.config import FOUR_BIT_FORMATS, ModelConfig
from nanovllm_onnx.convert.source import BlockRows, ModelSource, QuantBlocks, Rows
from nanovllm_onnx.convert.weight_file import WeightFile
from nanovllm_onnx.kernels import DOMAIN, KEY_TILE, PROMPT_ROWS, quantize

MS = "com.microsoft"


BLOCK = 32  # inputs per block of 4- and 8-bit weights (GGUF's, q8_0, int4)
WIDE_BLOCK = 128  # auto's 8-bit blocks of a float weight, where K is a multiple of it
CHUNK_BYTES = 16 << 20  # a large weight is converted this many float32 bytes of rows at a time
ROTARY_POSITIONS = 8192  # rotary tables computed this many positions at a time


@dataclass
class BlockWeights:
    """An initializer of packed blocks (pack_blocks) and the matrix it holds, [n, k]."""

    name: str
    k: int
    n: int
    bits: int
    block: int  # inputs per block: 32 or 128


class GraphBuilder:
    """Accumulates nodes and initializers with unique names; emits linear layers in the
    chosen weight format. With a `weight_file`, initializers go there as they are made; with
    `prompt_rows` (a graph input's name), BlockLinear layers take their rows' roles from it."""

    def __init__(self, weights: str = "auto", weight_file: WeightFile | None = None,
                 prompt_rows: str | None = None) -> None:
        self.weights = weights  # one of WEIGHT_FORMATS, checked where a conversion starts
        self.weight_file = weight_file
        self.prompt_rows = prompt_rows
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def const(self, name: str, data: np.ndarray | Iterable[np.ndarray]) -> str:
        """An initializer: an array, or chunks of rows of one (see WeightFile.tensor)."""
        if self.weight_file is not None:
            self.initializers.append(self.weight_file.tensor(name, data))
        else:
            array = data if isinstance(data, np.ndarray) else np.concatenate(list(data))
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           **attrs: object) -> list[str]:
        self._count += 1
        outputs = [f"{op_type}_{self._count}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain or None,
                                           name=f"{op_type}_{self._count}", **attrs))
        return outputs

    def linear(self, x: str, name: str, weight: np.ndarray | list[np.ndarray] | QuantBlocks,
               bias: np.ndarray | None = None, token_scale: str | None = None) -> str:
        """x @ weight.T (+ bias); weight is HF's [out_features, in_features] (float32 or
        bfloat16; or a list of such, stacked by rows: q, k and v), or a GGUF's blocks (auto,
        int4). int8 only: `token_scale` [tokens, 1] says that x comes divided by it already
        (SwiGLU's second output), so that the activations are quantized with one scale per
        token rather than one per tensor."""
        parts = [weight] if isinstance(weight, np.ndarray) else weight
        if self.weights == "int8":
            return self._int8_linear(x, name, parts, bias, token_scale)
        if self.weights != "fp32":
            y = self.block_linear(x, name, parts, self.block_bits)
        else:
            # Gemm reads HF's [out, in] as it is: transposing it cost more than writing it;
            # stacked parts are written one after the other (no concatenated copy).
            floats = (np.asarray(part, np.float32) for part in parts)
            (y,) = self.op("Gemm", [x, self.const(name, floats)], transB=1)
        if bias is not None:
            (y,) = self.op("Add", [y, self.const(name + ".bias", bias)])
        return y

    @property
    def block_bits(self) -> int:
        """The bits of the projections' blocks in a block format."""
        return 4 if self.weights in FOUR_BIT_FORMATS else 8

    def _int8_linear(self, x: str, name: str, parts: list[np.ndarray], bias: np.ndarray | None,
                     token_scale: str | None) -> str:
        """Per-output-channel symmetric int8 weights; activations quantized on the fly (the
        int8 GEMM, VNNI/AMX, is several times fp32 on batched steps)."""
        scales, codes = quantize.quantize_channels(parts, chunk_rows(sum(map(len, parts))))
        # The codes as uint8 with zero point 128 (the same values): ONNX Runtime's u8 x s8 GEMM
        # sums pairs of products in int16 on AVX2 CPUs without VNNI, which saturates (a 7%
        # error, measured); its u8 x u8 GEMM does not, and with VNNI or AMX it is the same u8 x
        # s8 kernel (MLAS converts the weights when it packs them).
        unsigned = (chunk.view(np.uint8) ^ np.uint8(0x80) for chunk in codes)
        inputs = [x, self.const(name, unsigned), self.const(name + ".scale", scales),
                  self.const(name + ".zero_point", np.array(128, np.uint8))]
        if token_scale is None:
            if bias is not None:
                inputs.append(self.const(name + ".bias", bias))
            (y,) = self.op("DynamicQuantizeMatMul", inputs, domain=MS)
            return y
        # DynamicQuantizeMatMul has one activation scale per tensor: a token with outliers
        # (SiLU(gate) * up has them) flattens every other token of the step. Each token
        # divided by its own max |x| first and the output multiplied back makes it per token.
        # SmolLM2 perplexity with down_proj per token: 13.41; with down_proj per tensor its
        # output error is 5-38%, and on 8-bit MatMulNBits blocks (13.30) it runs 3x slower on
        # batched steps.
        (y,) = self.op("DynamicQuantizeMatMul", inputs, domain=MS)
        (y,) = self.op("Mul", [y, token_scale])
        if bias is not None:
            (y,) = self.op("Add", [y, self.const(name + ".bias", bias)])
        return y

    def block_linear(self, x: str, name: str,
                     weight: np.ndarray | list[np.ndarray] | QuantBlocks | Rows, bits: int,
                     swiglu: bool = False) -> str:
        """4- or 8-bit blocks of 32 inputs, a scale and a minimum each, through the engine's
        BlockLinear (activations quantized per block of 32 too). A GGUF's blocks go in as
        they are (at their own width): no second rounding. `swiglu`: x is [gate, up] and
        the op multiplies silu(gate) * up, made row by row (no SwiGLU node)."""
        return self.block_op("BlockLinear", x, self.block_const(name, weight, bits),
                             self.prompt_rows, swiglu)

    def block_const(self, name: str,
                    weight: np.ndarray | list[np.ndarray] | Rows | QuantBlocks | BlockRows,
                    bits: int) -> BlockWeights:
        """Packed blocks as an initializer: `weight`'s own, or it rounded to `bits` and packed
        a chunk of rows (whole groups of 16) at a time: stacked parts (q, k, v) one part at a
        time where each fills whole groups."""
        if isinstance(weight, list):
            if all(len(part) % 16 == 0 for part in weight[:-1]):  # whole records: no concat
                k = weight[0].shape[1]
                block = self.block_width(bits, k)
                packed = (quantize_packed(part, bits, block) for part in weight)
                return BlockWeights(self.const(name, packed), k, sum(map(len, weight)), bits,
                                    block)
            weight = np.concatenate(weight)
        if isinstance(weight, QuantBlocks):
            n, num_blocks, block = weight.q.shape
            return BlockWeights(self.const(name, pack_blocks(weight)), num_blocks * block, n,
                                weight.bits, block)
        if isinstance(weight, BlockRows):  # its own blocks, a chunk of rows at a time
            (n, k), step = weight.shape, chunk_rows(weight.shape[1], multiple=16)
            packed = (pack_blocks(weight.read(lo, min(lo + step, n))) for lo in range(0, n, step))
            return BlockWeights(self.const(name, packed), k, n, weight.bits, BLOCK)
        rows = weight if isinstance(weight, Rows) else Rows.of(weight)
        (n, k), step = rows.shape, chunk_rows(rows.shape[1], multiple=16)
        block = self.block_width(bits, k)
        packed = (quantize_packed(c, bits, block) for c in rows.chunks(step, stored=True))
        return BlockWeights(self.const(name, packed), k, n, bits, block)

    def block_width(self, bits: int, k: int) -> int:
        """The inputs per block of a float weight rounded to `bits` for BlockLinear: auto's 8-bit
        blocks are of 128 where K is a multiple of it (one epilogue per 128 inputs and AMX
        products of 64: a 1B 32-row decode step 1.2x faster than in blocks of 32, perplexity
        within the noise of Q8_0's, benchmarks/README.md); q8_0 is GGUF's Q8_0, and 4 bits keep
        blocks of 32 (what 4-bit blocks of 128 cost in quality is not measured)."""
        return WIDE_BLOCK if self.weights == "auto" and bits == 8 and k % WIDE_BLOCK == 0 else BLOCK

    def block_op(self, op_type: str, x: str, weights: BlockWeights,
                 prompt_rows: str | None = None, swiglu: bool = False) -> str:
        """BlockLinear (x [..., K] -> [..., N]; `prompt_rows`: which rows are prompt tokens;
        `swiglu`: x is [gate, up], [..., 2K]) or BlockGather (token ids -> rows [..., K])."""
        inputs = [x, weights.name] + ([prompt_rows] if prompt_rows else [])
        fused = {"swiglu": 1} if swiglu else {}
        (y,) = self.op(op_type, inputs, domain=DOMAIN, K=weights.k, N=weights.n,
                       bits=weights.bits, block=weights.block, **fused)
        return y

    def rms_norm(self, x: str, name: str, weight: np.ndarray, eps: float) -> str:
        (y,) = self.op("SimplifiedLayerNormalization", [x, self.const(name, weight)],
                       axis=-1, epsilon=eps, stash_type=1)
        return y


def chunk_rows(columns: int, multiple: int = 1) -> int:
    """Rows of a `columns`-wide weight converted at a time: CHUNK_BYTES of float32."""
    return max(multiple, CHUNK_BYTES // (4 * columns) // multiple * multiple)


def quantize_blocks(weight: np.ndarray, bits: int, symmetric: bool | None = None,
                    block: int = BLOCK) -> QuantBlocks:
    """Blocks of `block` inputs (32 or 128), K padded to whole blocks (with zeros). From each
    block's minimum to its maximum (GGUF's Q4_1 rounding: BlockLinear takes a float minimum at
    no cost), or symmetric, max |w| / (2^(bits-1) - 1) (Q8_0's rounding, so a Q8_0 source comes
    back exactly); by default symmetric only for 8 bits in blocks of 32 (blocks of 128 from min
    to max: perplexity 1.0019x fp32's against 1.0095x symmetric). Scales and minimums are
    rounded to fp16, as BlockLinear stores them: symmetric ones to nearest (minimum -2^(bits-1)
    scale), the others outwards (minimum down, scale (max - minimum) / (2^bits - 1) up) so that
    the extremes need no code past the range; codes are the nearest. Run by the kernels
    library (see kernels/quantize.py)."""
    symmetric = default_symmetric(bits, block) if symmetric is None else symmetric
    return QuantBlocks(*quantize.quantize_blocks(weight, bits, symmetric, block), bits)


def default_symmetric(bits: int, block: int) -> bool:
    """Whether quantize_blocks rounds symmetrically unless told: Q8_0's blocks of 32 only."""
    return bits == 8 and block == BLOCK


def quantize_packed(weight: np.ndarray, bits: int, block: int = BLOCK) -> np.ndarray:
    """pack_blocks(quantize_blocks(weight, bits, block=block)), in one pass of the kernels
    library."""
    return quantize.quantize_packed(weight, bits, default_symmetric(bits, block), block)


def pack_blocks(blocks: QuantBlocks) -> np.ndarray:
    """BlockLinear's weights: one record per 16 output rows x a block's inputs (32 or 128), its
    parts of 32 inputs each 8 vectors of [16 rows, 4 inputs] (VNNI's layout; at 4 bits vectors
    2p and 2p + 1 share bytes, low and high nibbles), then 16 fp16 scales and 16 fp16 minimums
    (w = q * scale + min). Rows padded to a multiple of 16."""
    return quantize.pack_blocks(blocks.q, blocks.scale, blocks.minimum, blocks.bits)


def rotary_cache(head_dim: int, max_pos: int, rope: dict) -> np.ndarray:
    """cos and sin tables [max_pos, head_dim/2] for rotate-half rotary embeddings. YaRN's
    attention factor scales both, as transformers scales its cos and sin."""
    inv_freq, attention_factor = inverse_frequencies(head_dim, max_pos, rope)
    tables = np.empty((2, max_pos, len(inv_freq)), np.float32)
    # A slice of positions at a time: Llama-3's 131,072 whole took 3x the CPU (its float64
    # temporaries, 400 MB at head_dim 128, in fresh pages).
    for lo in range(0, max_pos, ROTARY_POSITIONS):
        freqs = np.outer(np.arange(lo, min(lo + ROTARY_POSITIONS, max_pos), dtype=np.float64),
                         inv_freq)
        tables[0, lo:lo + len(freqs)] = np.cos(freqs) * attention_factor
        tables[1, lo:lo + len(freqs)] = np.sin(freqs) * attention_factor
    return tables


def inverse_frequencies(head_dim: int, max_pos: int, rope: dict) -> tuple[np.ndarray, float]:
    """The rotary frequencies and attention factor of `rope_parameters`
    (hf_config.rope_parameters) as transformers' ROPE_INIT_FUNCTIONS compute them."""
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    attention_factor = 1.0
    kind = rope["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_scaling(inv_freq, rope)
    elif kind == "yarn":
        inv_freq, attention_factor = _yarn_scaling(inv_freq, head_dim, max_pos, rope)
    elif kind not in ("default", "dynamic"):  # dynamic: see hf_config.ROPE_TYPES
        raise ValueError(f"rope_type {kind!r} is not supported")
    if "freq_factors" in rope:  # a GGUF's rope_freqs: llama.cpp divides each frequency by its own
        inv_freq = inv_freq / np.asarray(rope["freq_factors"], np.float64)
    return inv_freq, attention_factor


def _llama3_scaling(inv_freq: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return np.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def _yarn_scaling(inv_freq: np.ndarray, dim: int, max_pos: int, s: dict
                  ) -> tuple[np.ndarray, float]:
    """transformers' _compute_yarn_parameters (llama.cpp's YaRN with ext_factor 1 is the same)."""
    base, original = s["rope_theta"], s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else \
            mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / ((high - low) or 0.001), 0, 1)
    extrapolation = 1 - ramp  # the share of each frequency left as it was
    return inv_freq / factor * ramp + inv_freq * extrapolation, float(attention_factor)


def build_graph(src: ModelSource, cfg: ModelConfig,
                weight_file: WeightFile | None = None) -> onnx.ModelProto:
    """The graph; its weights go to `weight_file` as they are made, when one is given."""
    w, hf = src.tensors, src.config
    g = GraphBuilder(cfg.weights, weight_file, prompt_rows=PROMPT_ROWS)
    # The block formats' prompt tokens go through AMX's bf16 tiles, their attention too; fp32
    # and int8 keep theirs in float.
    prompt_roles = [] if cfg.weights in ("fp32", "int8") else [PROMPT_ROWS]
    eps = float(hf["rms_norm_eps"])
    heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qk_norm = cfg.architecture == "Qwen3ForCausalLM"

    def stacked(names: list[str]) -> list[np.ndarray] | QuantBlocks:
        """The named weights stacked by rows: a GGUF's own blocks for auto (float ones beside
        them in 8-bit blocks; 4-bit ones widened to 8 beside 8-bit ones), and for int4 where
        all are 4-bit; otherwise the float parts (linear stacks them without a float copy)."""
        own = src.quant_blocks
        if cfg.weights == "auto" and any(n in own for n in names):
            return QuantBlocks.concat([own[n] if n in own else quantize_blocks(w[n], 8)
                                       for n in names])
        if cfg.weights in FOUR_BIT_FORMATS and all(n in own for n in names):
            parts = [own[n] for n in names]
            if all(p.bits == 4 for p in parts):
                return QuantBlocks.concat(parts)
        return [src.matrix(n) for n in names]

    def table(name: str) -> Rows | BlockRows:
        """The embedding or LM head: a GGUF's own blocks for auto; otherwise 8-bit blocks, as
        GGUF files keep the output matrix at 6-8 bits: SmolLM2's Q8_0 embedding comes back
        exactly (int4 perplexity 12.55 vs 14.26 in 4-bit blocks; int8 13.16 vs 13.25 per
        channel, at the same speed); int4_all rounds it to 4-bit blocks, as asked."""
        if cfg.weights == "auto" and name in src.block_rows:
            return src.block_rows[name]
        return src.rows(name)

    cos_sin = rotary_cache(hd, cfg.max_position_embeddings, hf["rope_parameters"])
    cos, sin = g.const("rotary.cos", cos_sin[0]), g.const("rotary.sin", cos_sin[1])
    # fp32 gathers from a float table; every other format from the embedding's blocks, one row
    # dequantized per token (no float copy of the vocabulary), and a tied LM head reads the
    # same blocks.
    embed_name = "model.embed_tokens.weight"
    table_bits = 4 if cfg.weights == "int4_all" else 8
    if cfg.weights == "fp32":
        embed = src.rows(embed_name)
        (x,) = g.op("Gather", [g.const(embed_name, embed.chunks(chunk_rows(embed.shape[1]))),
                               "input_ids"])
    else:
        embed = g.block_const(embed_name, table(embed_name), bits=table_bits)
        x = g.block_op("BlockGather", "input_ids", embed)
    residual: str | None = None
    pre = "model.layers"
    for i in tqdm(range(cfg.num_layers), desc="Building graph", unit="layer"):
        p = f"{pre}.{i}"
        if residual is None:
            h, residual = g.rms_norm(x, f"{p}.input_layernorm.weight",
                                     w[f"{p}.input_layernorm.weight"], eps), x
        else:
            h, residual = _skip_norm(g, x, residual, f"{p}.input_layernorm.weight",
                                     w[f"{p}.input_layernorm.weight"], eps)
        qkv_w = stacked([f"{p}.self_attn.{n}_proj.weight" for n in "qkv"])
        qkv_b = None
        if f"{p}.self_attn.q_proj.bias" in w:
            qkv_b = np.concatenate([w[f"{p}.self_attn.{n}_proj.bias"] for n in "qkv"])
        qkv = g.linear(h, f"{p}.self_attn.qkv_proj.weight", qkv_w, qkv_b)
        if qk_norm:
            qkv = _qk_norm(g, qkv, p, w, heads, kv_heads, hd, eps)
        attn, _, _ = g.op(
            "SlotAttention",
            [qkv, f"past_key.{i}", f"past_value.{i}", "past_lens", "query_lens", cos, sin,
             *prompt_roles],
            n_out=3, domain=DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
            scale=float(hd) ** -0.5,
        )
        # Route the present outputs to the graph outputs bound to the same buffers.
        g.nodes[-1].output[1], g.nodes[-1].output[2] = f"present_key.{i}", f"present_value.{i}"
        o_name = f"{p}.self_attn.o_proj.weight"
        o = g.linear(attn, o_name, stacked([o_name]))
        h, residual = _skip_norm(g, o, residual, f"{p}.post_attention_layernorm.weight",
                                 w[f"{p}.post_attention_layernorm.weight"], eps)
        gate_up_w = stacked([f"{p}.mlp.gate_proj.weight", f"{p}.mlp.up_proj.weight"])
        gate_up = g.linear(h, f"{p}.mlp.gate_up_proj.weight", gate_up_w)
        # int8: down_proj per token, SiLU(gate) * up has outlier tokens (see _int8_linear);
        # SwiGLU divides each token by its max |act| itself. The other projections stay per
        # tensor: per token there gains 0.04 (o_proj) to 0.3 (qkv and gate_up together)
        # perplexity but costs 3-10% of a one-row decode (5 nodes each).
        down = f"{p}.mlp.down_proj.weight"
        if cfg.weights == "int8":
            act, scale = g.op("SwiGLU", [gate_up], n_out=2, domain=DOMAIN)
            x = g.linear(act, down, stacked([down]), token_scale=scale)
        elif cfg.weights == "fp32":
            (act,) = g.op("SwiGLU", [gate_up], domain=DOMAIN)
            x = g.linear(act, down, stacked([down]))
        else:  # BlockLinear takes gate_up as it is (SwiGLU fused into its input)
            x = g.block_linear(gate_up, down, stacked([down]), g.block_bits, swiglu=True)

    (last,) = g.op("Add", [x, residual])
    (last,) = g.op("Gather", [last, "logits_index"])
    last = g.rms_norm(last, "model.norm.weight", w["model.norm.weight"], eps)
    tied = "lm_head.weight" not in w or hf.get("tie_word_embeddings", False)
    if cfg.weights != "fp32":  # the LM head is the largest matmul of a decode step (its rows,
        # the sampled ones, take the int8 path: no prompt_rows)
        head = embed if tied else g.block_const("lm_head.weight", table("lm_head.weight"),
                                                table_bits)
        g.block_op("BlockLinear", last, head)
    elif tied:  # reuse the embedding table, transposed by Gemm rather than copied
        g.op("Gemm", [last, embed_name], transB=1)
    else:
        head = src.rows("lm_head.weight")
        g.op("Gemm", [last, g.const("lm_head.weight", head.chunks(chunk_rows(head.shape[1])))],
             transB=1)
    g.nodes[-1].output[0] = "logits"
    return _make_model(g, cfg)


def _skip_norm(g: GraphBuilder, x: str, residual: str, name: str, weight: np.ndarray,
               eps: float) -> tuple[str, str]:
    """residual += x; return (rms_norm(residual), residual)."""
    out, new_residual = g.op("SkipRMSNorm", [x, residual, g.const(name, weight)], n_out=2,
                             domain=DOMAIN, epsilon=eps)
    return out, new_residual


def _qk_norm(g: GraphBuilder, qkv: str, p: str, w: Mapping[str, np.ndarray], heads: int,
             kv_heads: int, hd: int, eps: float) -> str:
    """Qwen3: RMSNorm over each head of q and k, before rotary."""
    q, k, v = g.op("Split", [qkv, g.const(f"{p}.qk_norm_split",
                                          np.array([heads * hd, kv_heads * hd, kv_heads * hd]))],
                   n_out=3, axis=-1)
    normed = []
    for name, t, n in (("q_norm", q, heads), ("k_norm", k, kv_heads)):
        (t,) = g.op("Reshape", [t, g.const(f"{p}.{name}.shape", np.array([-1, n, hd]))])
        t = g.rms_norm(t, f"{p}.self_attn.{name}.weight", w[f"{p}.self_attn.{name}.weight"], eps)
        (t,) = g.op("Reshape", [t, g.const(f"{p}.{name}.flat", np.array([-1, n * hd]))])
        normed.append(t)
    (out,) = g.op("Concat", [*normed, v], axis=-1)
    return out


def _make_model(g: GraphBuilder, cfg: ModelConfig) -> onnx.ModelProto:
    kvh, hd = cfg.num_kv_heads, cfg.head_dim
    shapes = {"key": ["batch", kvh, "key_tiles", hd, KEY_TILE],  # see KVCache
              "value": ["batch", kvh, "capacity", hd]}
    i64, i32, f32 = TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["tokens"]),
        helper.make_tensor_value_info("logits_index", i64, ["sampled"]),
        helper.make_tensor_value_info("past_lens", i32, ["batch"]),
        helper.make_tensor_value_info("query_lens", i32, ["batch"]),
    ]
    if any(PROMPT_ROWS in node.input for node in g.nodes):
        inputs.append(helper.make_tensor_value_info(PROMPT_ROWS, TensorProto.UINT8, ["tokens"]))
    outputs = [helper.make_tensor_value_info("logits", f32, ["sampled", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for kind, shape in shapes.items():
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", f32, shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", f32, shape))
    graph = helper.make_graph(g.nodes, "nano_vllm_onnx", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(MS, 1),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    return model
