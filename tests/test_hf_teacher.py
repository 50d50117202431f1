"""Any Hugging Face causal LM as the teacher (cocomix/hf_teacher.py): tiny randomly initialised GPT-NeoX
(Pythia) and Llama models built from transformers configs, offline. The residual stream read through the
forward hook equals the model's own hidden states; labels extract as with our teachers; a teacher whose
vocabulary differs from the students' is one line."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cocomix.config import ConfigError, load_config
from conftest import ROOT, tiny_overrides
from test_baselines import _random_sae

ARCHS = {
    "gpt_neox": lambda vocab: __import__("transformers").GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64),
    "llama": lambda vocab: __import__("transformers").LlamaConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64),
}


def _teacher(folder: Path, arch: str, tiny_data: Path, vocab: int = 512, tokenizer: bool = True) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(ARCHS[arch](vocab)).save_pretrained(folder)
    if tokenizer:
        shutil.copytree(tiny_data / "tokenizer", folder, dirs_exist_ok=True)
    return folder


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_hooked_residual_stream_is_the_models_own_and_edits_reach_the_logits(arch, tiny_data, tmp_path):
    from transformers import AutoModelForCausalLM

    from cocomix.hf_teacher import HFTeacher
    from cocomix.teacher import load_teacher, run_teacher

    folder = _teacher(tmp_path / arch, arch, tiny_data)
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, tiny_data, f"teacher.path={folder}"))
    teacher = load_teacher(cfg)
    assert isinstance(teacher, HFTeacher) and teacher.config.n_embd == 64 and teacher.config.n_layer == 2
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = reference(input_ids=ids, output_hidden_states=True)
    logits, h = run_teacher(teacher, ids, 0)
    assert torch.allclose(h, ref.hidden_states[1], atol=1e-5) and torch.allclose(logits, ref.logits, atol=1e-5)
    edited, _ = run_teacher(teacher, ids, 0, edit=lambda x: x * 0)
    assert not torch.allclose(edited, logits)
    (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()), h)
    assert g.shape == h.shape and g.abs().sum() > 0  # attribution's dL/dh
    assert run_teacher(teacher, ids, 1, stop_at_layer=True)[0] is None
    # FLOPs by our convention: 6 per weight of the blocks and the head, attention 12 L d T
    blocks = sum(p.numel() for layer in teacher.transformer.h for p in layer.parameters())
    assert teacher.flops_per_token(16) == 6 * (blocks + teacher.lm_head.weight.numel()) + 12 * 2 * 64 * 16


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_labels_extract_from_the_teacher_and_equal_a_direct_computation(arch, tiny_data, tmp_path):
    from cocomix.concepts import LabelCache, concept_labels, extract_concepts
    from cocomix.data.shards import TokenBlocks
    from cocomix.sae import load_sae
    from cocomix.teacher import load_teacher

    folder = _teacher(tmp_path / arch, arch, tiny_data)
    sae = _random_sae(tmp_path / "sae", 64, 64, 8, layer=0)
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(
        tmp_path, tiny_data, "method=cocomix", f"teacher.path={folder}", f"sae.path={sae}", "sae.layer=0",
        "sae.n_latents=64", "sae.k=8", "concept.k=8", "concept.extract_batch_size=64"))
    extract_concepts(cfg, progress=False)
    cache = LabelCache(cfg)
    idx = np.arange(4)
    got = cache.get("val", idx)
    ids = TokenBlocks(cfg.data_dir, "val", cfg.train.block_size).get_batch(idx)
    want = concept_labels(load_teacher(cfg), load_sae(cfg), ids, cfg.concept, 0)
    assert torch.equal(got.long(), want) and (want[:, :-1] >= 0).all()


def test_a_teacher_with_another_vocabulary_is_one_line(tiny_data, tmp_path):
    from cocomix.teacher import load_teacher

    small = _teacher(tmp_path / "small", "llama", tiny_data, vocab=300, tokenizer=False)
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, tiny_data, f"teacher.path={small}"))
    with pytest.raises(ConfigError, match=r"^config key 'teacher.path': teacher .*small has 300 token ids but the data "
                                          r"\(.*\) uses ids up to \d+: the teacher must share the students' tokenizer$"):
        load_teacher(cfg)


def test_a_hub_id_offline_is_one_line_saying_how_to_download_it(tiny_data, tmp_path, monkeypatch):
    from cocomix.teacher import teacher_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, tiny_data, "teacher.path=EleutherAI/pythia-70m"))
    with pytest.raises(ConfigError, match=r"^config key 'teacher.path': 'EleutherAI/pythia-70m' is not a folder, and as a Hub id it is offline "
                                          r"\(HF_HUB_OFFLINE=1\) and not in the Hugging Face cache; download it once where "
                                          r"the Hub is reachable: `HF_HUB_OFFLINE=0 hf download EleutherAI/pythia-70m "
                                          r"--local-dir models/pythia-70m`, then set teacher.path to that folder$"):
        teacher_dir(cfg)
