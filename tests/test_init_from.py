"""`model.init_from` (continued pretraining): a run starts from another checkpoint's weights, ours or a
transformers GPT-2 folder's; a slot module the checkpoint lacks keeps its fresh init; a tensor of
another shape is one line naming it."""

from pathlib import Path

import pytest
import torch

from cocomix.config import ConfigError, load_config
from cocomix.methods import get_method
from cocomix.teacher import init_from
from conftest import ROOT, tiny_overrides


def _cfg(root: Path, data: Path, *extra: str):
    return load_config(ROOT / "config/tiny.yaml", tiny_overrides(root, data, "train.tokens=8192", "eval.every_tokens=8192",
                                                                 "checkpoint.every_tokens=8192", *extra))


def _model(cfg, data_vocab: int):
    torch.manual_seed(1)
    return get_method(cfg.method).build_model(cfg, data_vocab, 0)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_data):
    from cocomix.trainer import train

    cfg = _cfg(tmp_path_factory.mktemp("source"), tiny_data, "run_name=source")
    final = train(cfg, progress=False)
    return cfg, Path(final["checkpoint"])


def test_a_run_starts_from_another_runs_weights_and_trains_on(source_run, tiny_data, tmp_path):
    from cocomix.model import CocomixForCausalLM
    from cocomix.trainer import Trainer, train

    src_cfg, ckpt = source_run
    source = CocomixForCausalLM.from_pretrained(ckpt).state_dict()
    cfg = _cfg(tmp_path, tiny_data, f"model.init_from={src_cfg.run_dir}", "seed=5")  # a run folder: its latest
    trainer = Trainer(cfg, progress=False)
    assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in source.items())
    fresh = train(_cfg(tmp_path / "fresh", tiny_data, "seed=5", "train.tokens=2048"), progress=False)
    started = train(_cfg(tmp_path / "cont", tiny_data, f"model.init_from={ckpt}", "seed=5", "train.tokens=2048"),
                    progress=False)
    assert started["val/loss"] < fresh["val/loss"] - 0.3  # 8 steps on from 8 steps in, against 2 from scratch


def test_cocomix_from_an_ntp_checkpoint_keeps_its_fresh_concept_head(source_run, tiny_data, tmp_path):
    src_cfg, ckpt = source_run
    cfg = _cfg(tmp_path, tiny_data, "method=cocomix")
    model = _model(cfg, 512)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = init_from(model, ckpt)
    assert got["unused"] == [] and got["kept"] and all(k.startswith("slot.") for k in got["kept"])
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in got["kept"])  # the head: as initialised
    assert not torch.equal(model.state_dict()["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])


def test_a_gpt2_folder_is_imported_and_gives_gpt2s_logits(tiny_data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    gpt2.save_pretrained(tmp_path / "gpt2")
    cfg = _cfg(tmp_path, tiny_data)  # 64 wide, 2 blocks, 4 heads; vocabulary 500 padded to 512 rows
    model = _model(cfg, 500).eval()
    got = init_from(model, tmp_path / "gpt2")
    assert got["kept"] == [] and got["unused"] == []
    ids = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits[..., :500], gpt2(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("model.n_embd=32", r"^config key 'model.init_from': tensor transformer.wte.weight is \(512, 64\) in .* but "
                        r"\(512, 32\) in the model \(model.n_embd, n_layer, vocab_size must match\)$"),
])
def test_a_checkpoint_of_another_shape_is_one_line_naming_the_tensor(source_run, tiny_data, tmp_path, override, message):
    _, ckpt = source_run
    with pytest.raises(ConfigError, match=message):
        init_from(_model(_cfg(tmp_path, tiny_data, override, "model.n_head=4"), 512), ckpt)
    with pytest.raises(ConfigError, match=r"^config key 'model.init_from': .* is not a model folder"):
        init_from(_model(_cfg(tmp_path, tiny_data), 512), tmp_path)
