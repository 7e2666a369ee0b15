"""Fast checks of the gguf/llama.cpp helpers: locating the converter, the converter-input tokenizer view, the
LoRA adapter screen, parameter counting and the agreement measures. No model is loaded.

    .venv/bin/python -m pytest tests/test_gguf_unit.py -q -p no:cacheprovider
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def write_adapter(folder: Path, config: dict, extra_keys=()) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    base = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none", "modules_to_save": None}
    (folder / "adapter_config.json").write_text(json.dumps(base | config))
    tensors = {LORA_KEY.format("A"): np.zeros((8, 16), np.float32), LORA_KEY.format("B"): np.zeros((16, 8), np.float32)}
    tensors |= {k: np.zeros((4, 4), np.float32) for k in extra_keys}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_converter_dir_prefers_the_environment_and_says_how_to_get_the_scripts(tmp_path, monkeypatch):
    from hubforge import llamacpp

    scripts = tmp_path / "llama.cpp"
    scripts.mkdir()
    for name in llamacpp.SCRIPTS:
        (scripts / name).write_text("")
    monkeypatch.setenv("HUBFORGE_LLAMA_CPP_DIR", str(scripts))
    assert llamacpp.converter_dir() == scripts

    monkeypatch.setenv("HUBFORGE_LLAMA_CPP_DIR", str(tmp_path / "missing"))
    with pytest.raises(llamacpp.LlamaCppError, match="HUBFORGE_LLAMA_CPP_DIR=.*make llama-cpp-scripts"):
        llamacpp.converter_dir()

    monkeypatch.delenv("HUBFORGE_LLAMA_CPP_DIR")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(llamacpp.LlamaCppError, match=r"not found.*pip download --no-deps --no-binary :all: llama-cpp-python==0\.3\.36"):
        llamacpp.converter_dir()
    (tmp_path / ".cache").mkdir()
    (scripts).rename(tmp_path / ".cache" / "llama.cpp")
    assert llamacpp.converter_dir() == tmp_path / ".cache" / "llama.cpp"


def test_architecture_follows_the_converter_dispatch(tmp_path):
    from hubforge import llamacpp

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                      "text_config": {"architectures": ["Gemma3ForCausalLM"]}}))
    assert llamacpp.architecture(tmp_path) == "Gemma3ForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert llamacpp.architecture(tmp_path) == "LlamaForCausalLM"


def test_converter_input_lists_added_and_user_defined_tokens(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    from hubforge import llamacpp

    model = tmp_path / "model"
    model.mkdir()
    proto = pb.ModelProto()
    for text, kind in (("<unk>", 2), ("<s>", 3), ("▁▁▁", 4), ("a", 1), ("<mark>", 4)):
        piece = proto.pieces.add()
        piece.piece, piece.type = text, kind
    (model / "tokenizer.model").write_bytes(proto.SerializeToString())
    (model / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 1, "content": "<s>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}]}))
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    (model / "model.safetensors").write_bytes(b"weights")

    view = llamacpp.converter_input(model, tmp_path / "view")
    config = json.loads((view / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<s>"
    assert config["added_tokens_decoder"] == {
        "1": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True},
        "2": {"content": "▁▁▁", "special": False}, "4": {"content": "<mark>", "special": False}}
    assert (view / "model.safetensors").is_symlink() and (view / "model.safetensors").read_bytes() == b"weights"
    assert "added_tokens_decoder" not in json.loads((model / "tokenizer_config.json").read_text())  # source untouched


def test_lora_screen(tmp_path):
    from hubforge.stages.gguf import lora_problems

    assert lora_problems(write_adapter(tmp_path / "plain", {})) == []
    assert "modules_to_save" in lora_problems(write_adapter(tmp_path / "mts", {"modules_to_save": ["lm_head"]}))[0]
    assert "'embed_tokens'" in lora_problems(write_adapter(tmp_path / "emb", {"target_modules": ["q_proj", "embed_tokens"]}))[0]
    assert "use_rslora=True" in lora_problems(write_adapter(tmp_path / "rs", {"use_rslora": True}))[0]
    assert "use_dora=True" in lora_problems(write_adapter(tmp_path / "dora", {"use_dora": True}))[0]
    extra = lora_problems(write_adapter(tmp_path / "extra", {}, ["base_model.model.model.embed_tokens.weight"]))
    assert extra and "non-LoRA tensors" in extra[0]


def test_count_params_reads_safetensors_headers(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from hubforge.models import count_params

    save_file({"a": np.zeros((3, 4), np.float16), "b": np.zeros((5,), np.float32)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": np.zeros((2, 2, 2), np.float16)}, str(tmp_path / "model-2.safetensors"))
    assert count_params(tmp_path) == 12 + 5 + 8


def test_agreement_measures():
    import numpy as np
    import torch

    from hubforge.stages.gguf import common_prefix, teacher_forced

    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]], dtype=torch.float64)
    same = teacher_forced([logits.log_softmax(-1)], [logits.numpy()])
    assert same[0] == pytest.approx(0, abs=1e-12) and same[1] == 1.0
    flipped = teacher_forced([logits.log_softmax(-1)], [np.array([[0.0, 2.0, -1.0], [0.0, 3.0, 0.0]])])
    assert flipped[0] > 0.1 and flipped[1] == 0.5


def logit_rows(*rows):
    """(steps, vocab) logits with the given per-step values for tokens 0..len(row)-1 and -50 elsewhere."""
    import numpy as np

    out = np.full((len(rows), 8), -50.0)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def test_greedy_check_lets_a_divergence_at_a_near_tie_pass():
    from hubforge.stages import gguf

    prompt = [5]  # one prompt token: row 0 predicts generated step 0
    ref = logit_rows([3, 0], [1.0, 1.0 + gguf.TIE_MARGIN / 2], [4, 0], [0, 0])[:3]  # HF takes 0, then 1 by a hair, then 0
    got = logit_rows([3, 0], [1.0 + gguf.TIE_MARGIN / 2, 1.0], [4, 0])  # the GGUF takes 0 at the tie
    check = gguf.greedy_check([prompt], [[0, 1, 0]], [ref], [[0, 0, 2]], [got])
    assert check["greedy_divergences"] == [{"prompt": 1, "position": 1, "hf_margin": gguf.TIE_MARGIN / 2, "tie": True}]
    assert check["decisive_agreement"] == 1.0  # the two decided steps agree when fed HF's tokens


def test_greedy_check_refuses_a_divergence_where_the_reference_was_decided():
    from hubforge.stages import gguf

    ref = logit_rows([3, 0], [0, 2.0], [4, 0])
    got = logit_rows([3, 0], [2.0, 0], [4, 0])
    check = gguf.greedy_check([[5]], [[0, 1, 0]], [ref], [[0, 0, 0]], [got])
    assert check["greedy_divergences"] == [{"prompt": 1, "position": 1, "hf_margin": 2.0, "tie": False}]
    assert check["decisive_agreement"] == round(2 / 3, 4)


def test_greedy_check_sees_a_wrong_decided_step_after_a_tie_through_teacher_forcing():
    from hubforge.stages import gguf

    # free-running decoding parted at the tie in step 0 and never reached step 2, where the GGUF is wrong
    ref = logit_rows([1.0, 1.0 + gguf.TIE_MARGIN / 5], [3, 0], [0, 3])
    got = logit_rows([1.0 + gguf.TIE_MARGIN / 5, 1.0], [3, 0], [3, 0])
    check = gguf.greedy_check([[5]], [[1, 0, 1]], [ref], [[0, 4, 4]], [got])
    assert [d["tie"] for d in check["greedy_divergences"]] == [True, False]
    assert check["greedy_divergences"][1] == {"prompt": 1, "position": 2, "hf_margin": 3.0, "tie": False, "teacher_forced": True}
    assert check["margin_noise_max"] == 6.0
