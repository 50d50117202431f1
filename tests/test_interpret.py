"""Concept inspection and steering (cocomix/interpret.py, cocomix/steering.py) on a tiny trained CoCoMix
run: descriptions cached per SAE, factor 1 = no intervention, amplifying the latent matched to a
ground-truth synthetic concept raises that concept's word frequency, and the two commands' outputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from cocomix.cli import main
from cocomix.config import load_config
from cocomix.data import DataError, load_concepts
from cocomix.interpret import _merge_top, describe_concepts, descriptions_path, encode_prompt, load_cocomix
from cocomix.sae import load_sae, save_sae
from cocomix.steering import generate, steer_teacher, steering_check
from cocomix.teacher import load_teacher

from conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# A language small enough that 640 steps of a 2-layer, 64-wide model learn its topics (4 topics of 8 words
# per part of speech, 2 professions; most words are single BPE tokens). On the session's tiny corpus the
# models write mostly non-words after their short training and an SAE detects concepts no better than an
# untrained one, so a steering effect there would be noise.
EASY = ["data.synthetic.n_tokens=150000", "data.synthetic.n_topics=4", "data.synthetic.words_per_topic=8",
        "data.synthetic.parts_of_speech=true", "data.synthetic.max_topics_per_doc=2",
        "data.synthetic.n_professions=2", "tokenizer.vocab_size=512", "model.n_embd=64", "model.n_layer=2",
        "model.n_head=4", "train.block_size=64", "train.global_batch_size=16", "train.micro_batch_size=16",
        "train.tokens=655360", "train.lr=3e-3", "train.warmup_steps=10", "eval.every_tokens=655360",
        "eval.max_blocks=64", "checkpoint.every_tokens=655360", "tracking.enabled=false", "concept.insert_layer=1",
        "sae.layer=0", "sae.n_latents=128", "sae.k=4", "sae.tokens=100000", "sae.dead_after_tokens=50000",
        "concept.k=4", "concept.k_attr=2", "concept.labels=online",
        "interpret.describe_tokens=20000", "interpret.match_tokens=10000"]


@pytest.fixture(scope="module")
def cocomix_run(tmp_path_factory):
    """A teacher, its SAE and a CoCoMix run (labels computed online) on the EASY corpus; returns
    (run folder, overrides, teacher checkpoint). About 45 s on 2 CPU cores."""
    from cocomix.data.shards import prepare_data
    from cocomix.sae import train_sae
    from cocomix.trainer import train

    root = tmp_path_factory.mktemp("interpret")
    base = EASY + [f"results_dir={root}", f"data.dir={root / 'data'}"]
    prepare_data(load_config(ROOT / "config/tiny.yaml", base), progress=False)
    teacher = train(load_config(ROOT / "config/tiny.yaml", base + ["run_name=teacher"]), progress=False)["checkpoint"]
    overrides = base + [f"teacher.path={teacher}"]
    train_sae(load_config(ROOT / "config/tiny.yaml", overrides), progress=False)
    cfg = load_config(ROOT / "config/tiny.yaml", overrides + ["method=cocomix", "run_name=cocomix"])
    train(cfg, progress=False)
    return cfg.run_dir, overrides, teacher


def test_top_contexts_merged_batch_by_batch_equal_one_full_sort():
    gen = torch.Generator().manual_seed(0)
    C, m, n = 6, 3, 200
    acts = torch.rand(n, generator=gen) + 0.01
    latents = torch.randint(0, C - 1, (n,), generator=gen)  # latent C-1 never fires: its slots stay empty
    where = torch.arange(n)
    best, best_where = torch.zeros(C, m), torch.full((C, m), -1)
    for a in range(0, n, 37):
        best, best_where = _merge_top(best, best_where, acts[a : a + 37], latents[a : a + 37], where[a : a + 37])
    for j in range(C):
        mine = acts[latents == j].sort(descending=True).values[:m]
        assert torch.equal(best[j, : len(mine)], mine)
        assert torch.equal(acts[best_where[j, : len(mine)]], mine) and (best_where[j, len(mine):] == -1).all()


@pytest.mark.slow
def test_descriptions_are_saved_once_per_sae_and_rebuilt_when_it_changes(cocomix_run, tmp_path, capsys):
    run_dir, overrides, _ = cocomix_run
    cfg = load_config(ROOT / "config/tiny.yaml", overrides)
    desc = describe_concepts(cfg)
    path = descriptions_path(cfg)
    assert path.parent == cfg.experiment_dir / "sae" and path.with_suffix(".md").is_file()
    latents = desc["latents"]
    assert [d["index"] for d in latents] == list(range(128)) and desc["n_tokens"] >= 20000
    active = [d for d in latents if d["contexts"]]
    assert len(active) > 64
    for d in active:
        assert len(d["contexts"]) <= 5 and all("⟦" + c["token"] + "⟧" in c["text"] for c in d["contexts"])
        assert [c["activation"] for c in d["contexts"]] == sorted((c["activation"] for c in d["contexts"]), reverse=True)
        assert d["contexts"][0]["activation"] == d["max_activation"] > 0 and d["frequency"] > 0
        assert len(d["promoted_tokens"]) == 8 and d["summary"].startswith("fires on")
    # the synthetic corpus: every ground-truth concept gets its best-detecting latent
    names = {c["name"] for c in load_concepts(cfg.data_dir)["concepts"]} - {"none"}
    assert {m["concept"] for m in desc["concept_matches"]} == names
    assert all(0.5 < m["auroc"] <= 1 for m in desc["concept_matches"])
    assert "# SAE concept descriptions" in path.with_suffix(".md").read_text()
    mtime = path.stat().st_mtime_ns
    assert describe_concepts(cfg) == desc and path.stat().st_mtime_ns == mtime  # reused, not rebuilt

    # Another SAE: a copy is described beside itself; changing its weights rebuilds its descriptions.
    copy = tmp_path / "sae"
    shutil.copytree(cfg.experiment_dir / "sae", copy)
    (copy / "descriptions.json").unlink()
    cfg_copy = load_config(ROOT / "config/tiny.yaml", overrides + [f"sae.path={copy}"])
    first = describe_concepts(cfg_copy)
    assert descriptions_path(cfg_copy) == copy / "descriptions.json"
    assert first["latents"] == latents  # same SAE, same teacher and data: the same descriptions
    sae = load_sae(cfg_copy)
    with torch.no_grad():
        sae.W_dec.mul_(-1)  # a different dictionary
    save_sae(sae, copy, json.loads((copy / "sae_config.json").read_text()))
    capsys.readouterr()
    second = describe_concepts(cfg_copy)
    assert "rebuilding" in capsys.readouterr().err
    assert second["key"]["sae_sha256"] != first["key"]["sae_sha256"]
    assert json.loads((copy / "descriptions.json").read_text())["key"] == second["key"]
    assert [d["promoted_tokens"] for d in second["latents"]] != [d["promoted_tokens"] for d in first["latents"]]


@pytest.mark.slow
@torch.no_grad()
def test_factor_one_leaves_generation_unchanged(cocomix_run):
    run_dir, _, _ = cocomix_run
    model, tokenizer, cfg, _ = load_cocomix(run_dir)
    teacher, sae = load_teacher(cfg), load_sae(cfg)
    prompt = encode_prompt(tokenizer, "")
    concept = 0
    for lm, steering in ((model, lambda f: model.steer_concepts({concept: f})),
                         (teacher, lambda f: steer_teacher(teacher, sae, cfg.sae.layer, {concept: f}))):
        plain = generate(lm, prompt, 8, 24, seed=3, temperature=1.0)
        with steering(1.0):
            assert torch.equal(generate(lm, prompt, 8, 24, seed=3, temperature=1.0), plain)
        with steering(-10.0):
            assert not torch.equal(generate(lm, prompt, 8, 24, seed=3, temperature=1.0), plain)
    with pytest.raises(DataError, match=r"outside \[0, 128\)"):
        with steer_teacher(teacher, sae, cfg.sae.layer, {128: 2.0}):
            pass


@pytest.mark.slow
def test_amplifying_the_matched_latent_raises_its_concepts_word_frequency(cocomix_run):
    run_dir, _, _ = cocomix_run
    model, tokenizer, cfg, _ = load_cocomix(run_dir)
    teacher, sae = load_teacher(cfg), load_sae(cfg)
    # The latent that best detects a ground-truth concept, amplified 30x, beyond the paper's 10: on three
    # training seeds CoCoMix's gain in topic words was 5-26 points at 10 and 9-26 points at 30 (teacher:
    # 7-29 and 6-48), so 30 leaves the wider margin. Measured here: 6.9% -> 34.4% and 11.1% -> 17.5%.
    result = steering_check(cfg, model, tokenizer, teacher, sae, describe_concepts(cfg), concept=None,
                            factor=30.0, n_samples=64, max_new_tokens=48, seed=0)
    print(json.dumps(result))
    assert result["concept"].startswith("topic_") and result["auroc"] > 0.5
    for name in ("cocomix", "teacher"):
        r = result[name]
        assert r["factor_one_identical"] and r["factor_one"] == r["unsteered"], name
        assert r["steered"] > r["unsteered"] + 0.05, (name, r)


@pytest.mark.slow
def test_inspect_and_steer_commands_write_text_and_png(cocomix_run, tmp_path, capsys):
    run_dir, overrides, teacher_checkpoint = cocomix_run
    teacher_run = Path(teacher_checkpoint).parent.parent  # <run>/checkpoints/step_N -> <run>
    topic = load_concepts(load_config(ROOT / "config/tiny.yaml", overrides).data_dir)["concepts"][1]
    prompt = f"the {topic['adjectives'][0]} {topic['nouns'][0]} {topic['verbs'][0]} the {topic['nouns'][1]} ."
    out = tmp_path / "inspect"
    assert main(["inspect", str(run_dir), "--prompt", prompt, "--out", str(out), "--top", "3"]) == 0
    text = (out / "inspect.txt").read_text()
    assert (out / "inspect.png").read_bytes()[:8] == PNG_MAGIC
    result = json.loads((out / "inspect.json").read_text())
    tokens = [p["token"] for p in result["positions"]]
    assert len(tokens) > 6 and "".join(tokens[1:]) == prompt  # EOS, then the prompt
    assert len(result["heatmap"]) == len(tokens) and len(result["heatmap"][0]) == len(result["heatmap_concepts"])
    for p in result["positions"]:
        assert f"position {p['position']:>3}" in text
        for c in p["concepts"]:
            assert f"concept {c['index']:>5}  p={c['probability']:.3f}" in text

    out = tmp_path / "steer"
    assert main(["steer", str(run_dir), "--prompt", prompt, "--concepts", "3,7", "--factor", "-10",
                 "--samples", "2", "--temperature", "1", "--max-new-tokens", "12", "--out", str(out)]) == 0
    assert (out / "steer.png").read_bytes()[:8] == PNG_MAGIC
    text = (out / "steer.txt").read_text()
    teacher = load_config(ROOT / "config/tiny.yaml", overrides).teacher.path
    assert text.splitlines()[0].endswith(f"and its teacher {teacher}")  # the folder actually loaded
    assert "concept 3 x -10" in text and "concept 7 x -10" in text
    assert text.count("unsteered:") == 4 and text.count("\n    steered:") == 4  # 2 samples x (CoCoMix, teacher)
    result = json.loads((out / "steer.json").read_text())
    assert len(result["cocomix"]["steered"]) == len(result["teacher"]["unsteered"]) == 2

    # A run whose teacher.path is the teacher's run folder: the header names the checkpoint loaded
    # from it (its latest), not the folder as written in the config.
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    tree = yaml.safe_load((copy / "config.yaml").read_text())
    tree["teacher"]["path"] = str(teacher_run)
    (copy / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    out = tmp_path / "steer-run-folder"
    assert main(["steer", str(copy), "--concepts", "3", "--max-new-tokens", "4", "--out", str(out)]) == 0
    header = (out / "steer.txt").read_text().splitlines()[0]
    assert header.endswith(f"and its teacher {teacher_checkpoint}"), header

    out = tmp_path / "check"
    capsys.readouterr()
    assert main(["steer", str(run_dir), "--check", "--ground-truth", "topic_2", "--samples", "4",
                 "--max-new-tokens", "16", "--out", str(out)]) == 0
    check = json.loads((out / "steer_check.json").read_text())
    assert check["concept"] == "topic_2" and check["n_samples"] == 4 and check["factor"] == 10
    assert check["cocomix"]["factor_one_identical"] and check["teacher"]["factor_one_identical"]
    printed = capsys.readouterr().out
    assert f"topic_2: latent {check['latent']}" in printed and "cocomix: topic_2 words" in printed


@pytest.mark.slow
def test_bad_input_is_one_line_naming_what_was_expected(cocomix_run, tmp_path, capsys):
    run_dir, _, teacher = cocomix_run

    def error(*argv):
        code = main(list(argv))
        lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("cocomix: error:")]
        assert code != 0 and len(lines) == 1
        return lines[0]

    out = str(tmp_path / "out")
    assert "not found (expected a run folder or a checkpoint folder)" in error(
        "inspect", str(tmp_path / "missing"), "--prompt", "x", "--out", out)
    assert "not a CoCoMix checkpoint" in error("inspect", str(teacher), "--prompt", "x", "--out", out)
    assert "concept indices [128] are outside [0, 128)" in error(
        "steer", str(run_dir), "--concepts", "128", "--out", out)
    assert "exceeds the models' 64 positions" in error(
        "steer", str(run_dir), "--concepts", "1", "--max-new-tokens", "64", "--out", out)
    assert "expected comma-separated concept indices" in error("steer", str(run_dir), "--concepts", "a", "--out", out)
    assert "steer needs --concepts" in error("steer", str(run_dir), "--out", out)
    assert "ground-truth concept 'topic_9': not in the corpus" in error(
        "steer", str(run_dir), "--check", "--ground-truth", "topic_9", "--out", out)
    assert not (tmp_path / "out").exists()
