"""`cocomix export`: a trained CoCoMix checkpoint becomes a Hub-ready folder that loads, generates and
reproduces its own eval.json through the stock `lm_eval` CLI in processes where cocomix cannot be
imported."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow  # trains a model, runs lm-eval's CLI

N_POSITIONS = 64  # train.block_size of the tiny config
EVAL = ["--tasks", "synthetic", "--limit", "8", "--no-progress", "eval.synthetic_docs=16", "eval.ppl_max_blocks=8"]

# Imported first in every Python process of the checks below: any `import cocomix...` fails there.
BLOCK_COCOMIX = '''
import sys


class _RefuseCocomix:
    def find_spec(self, name, path=None, target=None):
        if name == "cocomix" or name.startswith("cocomix."):
            raise ImportError(f"{name} is blocked: the exported folder must work without the cocomix package")
        return None


sys.meta_path.insert(0, _RefuseCocomix())
'''

LOAD_AND_GENERATE = BLOCK_COCOMIX + '''
import json
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import cocomix  # noqa: F401
    sys.exit("cocomix was importable")
except ImportError:
    pass
folder, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
prompt = tokenizer("the", return_tensors="pt").input_ids
out = model.generate(prompt, max_new_tokens=12, do_sample=False)
torch.save({"logits": logits, "module": type(model).__module__, "max_length": tokenizer.model_max_length,
            "generated": out[0, prompt.shape[1]:].tolist(), "text": tokenizer.decode(out[0]),
            "cocomix_loaded": any(m == "cocomix" or m.startswith("cocomix.") for m in sys.modules)}, out_file)
'''


def _random_teacher(folder: Path, data_dir: Path) -> Path:
    """An untrained 2-block teacher on the tiny tokenizer: online concept labels need only its shape."""
    from cocomix.data.tokenizer import load_tokenizer
    from cocomix.model import CocomixConfig, CocomixForCausalLM

    tok = load_tokenizer(data_dir / "tokenizer")
    torch.manual_seed(0)
    config = CocomixConfig(vocab_size=len(tok), n_positions=N_POSITIONS, n_embd=64, n_layer=2, n_head=4,
                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    CocomixForCausalLM(config).save_pretrained(folder)
    shutil.copytree(data_dir / "tokenizer", folder, dirs_exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_data):
    """One tiny CoCoMix run (2 checkpoints), its final checkpoint evaluated by `cocomix eval` on the
    synthetic tasks, and `cocomix export` of the run folder, all under umask 022."""
    from test_baselines import _random_sae

    from cocomix.cli import main
    from cocomix.config import load_config
    from cocomix.trainer import train

    root = tmp_path_factory.mktemp("export")
    teacher = _random_teacher(root / "teacher", tiny_data)
    sae = _random_sae(root / "sae", 64, 64, 8, layer=1)
    overrides = tiny_overrides(root, tiny_data, "method=cocomix", f"teacher.path={teacher}", f"sae.path={sae}",
                               "sae.n_latents=64", "sae.k=8", "concept.k=8", "concept.labels=online",
                               "train.tokens=16384", "checkpoint.every_tokens=8192", "eval.every_tokens=16384",
                               "eval.max_blocks=16")
    cfg = load_config(ROOT / "config/tiny.yaml", overrides)
    old = os.umask(0o022)
    try:
        final = train(cfg, progress=False)
        ckpt = Path(final["checkpoint"])
        assert main(["eval", str(ckpt), *EVAL]) == 0  # the final checkpoint only
        out = root / "hub" / "tiny-cocomix"
        assert main(["export", str(cfg.run_dir), str(out)]) == 0  # a run folder: its newest checkpoint
    finally:
        os.umask(old)
    return {"cfg": cfg, "checkpoint": ckpt, "out": out, "root": root}


def _files(folder: Path) -> dict[str, os.stat_result]:
    return {p.relative_to(folder).as_posix(): p.stat() for p in sorted(folder.rglob("*"))}


def test_export_is_a_clean_hub_folder_with_a_model_card(exported):
    from cocomix.files import read_sealed_json
    from cocomix.model import CocomixForCausalLM

    out, ckpt = exported["out"], exported["checkpoint"]
    files = _files(out)
    print("\n".join(f"{stat.filemode(st.st_mode)} {st.st_size:>8} {name}" for name, st in files.items()))
    top = {name for name in files if "/" not in name}
    assert top == {"README.md", "config.json", "generation_config.json", "model.safetensors", "model.py", "slots.py",
                   "tokenizer.json", "tokenizer_config.json", "eval_tasks", "sae"}, top
    # A CoCoMix model ships the SAE its concept ids index (SAELens's format) and their descriptions
    from cocomix.sae import TopKSAE, load_sae
    ours, shipped = load_sae(exported["cfg"]), TopKSAE.from_saelens(out / "sae")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), shipped.state_dict().values()))
    desc = json.loads((out / "sae" / "descriptions.json").read_text())
    assert len(desc["latents"]) == 64 and (out / "sae" / "descriptions.md").read_text().startswith("#")
    assert not any(Path(name).name in ("trainer_state.pt", "optimizer.pt", "trainer", "checkpoint.json", "eval.json",
                                       "lm_eval_results.json") for name in files)
    assert (ckpt / "trainer" / "optimizer.pt").is_file()  # the training checkpoint keeps it, apart
    # Group-readable under umask 022: 0644 files (safetensors writes 0600), 0755 folders.
    for name, st in files.items():
        assert stat.S_IMODE(st.st_mode) == (0o755 if stat.S_ISDIR(st.st_mode) else 0o644), (name, oct(st.st_mode))
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary folder left beside it
    assert ".tmp" not in "".join(files)

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "model.CocomixForCausalLM" and config["slot"] == "concept"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == N_POSITIONS
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["model_max_length"] == N_POSITIONS  # checkpoint too
    assert (out / "model.py").read_text() == (ROOT / "cocomix" / "model.py").read_text()

    card = (out / "README.md").read_text()
    print(card)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and {"cocomix", "custom_code"} <= set(front["tags"])
    assert front["license"] == "mit" and "datasets" not in front  # no dataset id for the synthetic corpus
    # huggingface_hub's own parsers read the card: the license and the evaluation results (model-index)
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load
    hub_card = ModelCard.load(out / "README.md")
    assert hub_card.data.license == "mit" and metadata_load(out / "README.md")["license"] == "mit"
    assert "arxiv.org/abs/2502.08524" in card and "facebookresearch/RAM" in card
    model = CocomixForCausalLM.from_pretrained(out)
    record = read_sealed_json(next(ckpt.glob("eval-limit8-*.json")))  # --limit: beside the run's eval.json
    assert "CoCoMix (Continuous Concept Mixing" in card and "synthetic concept-driven corpus" in card
    assert f"tokens trained: {record['tokens_seen']:,}" in card and record["tokens_seen"] == 16384
    assert f"{model.num_params():,} total" in card and "| context | 64 tokens" in card
    metrics = record["metrics"]
    for key in ("synth_topic/acc", "synth_recall/acc", "synth_recall/acc_norm"):
        task, metric = key.split("/")
        assert f"| {task} | {metric} | {metrics[key]:.4f} ± {metrics[key + '_stderr']:.4f} | 8 |" in card, key
    assert f"perplexity {metrics['val_ppl']:.2f}" in card
    results = {(r.dataset_type, r.metric_name): r.metric_value for r in hub_card.data.eval_results}
    assert results[("synth_topic", "acc")] == pytest.approx(metrics["synth_topic/acc"])
    assert results[("synth_recall", "acc_norm")] == pytest.approx(metrics["synth_recall/acc_norm"])
    assert results[("heldout", "held-out perplexity")] == pytest.approx(metrics["val_ppl"])


def test_export_loads_generates_and_reproduces_its_eval_json_without_cocomix(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    from cocomix.files import read_sealed_json

    out, ckpt = exported["out"], exported["checkpoint"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    env.pop("PYTHONPATH", None)
    work = tmp_path / "elsewhere"  # outside the repository: nothing there to import
    work.mkdir()

    # (a) load with trust_remote_code and generate
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.save(ids, work / "ids.pt")
    subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out), str(work / "ids.pt"), str(work / "out.pt")],
                   check=True, cwd=work, env=env, capture_output=True, timeout=300)
    remote = torch.load(work / "out.pt")
    assert remote["module"].startswith("transformers_modules.") and not remote["cocomix_loaded"]
    assert remote["max_length"] == N_POSITIONS and len(remote["generated"]) == 12
    local = AutoModelForCausalLM.from_pretrained(ckpt).eval()  # the training checkpoint, through cocomix
    with torch.no_grad():
        assert torch.equal(remote["logits"], local(ids).logits)
    print("generated:", repr(remote["text"]))

    # (b) the model card's lm_eval command, exactly as written, run from inside the folder; every
    # Python process it starts refuses cocomix (sitecustomize installs the finder first).
    card = (out / "README.md").read_text()
    command = card.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert " ".join(command.replace("\\\n", " ").split()).startswith(
        "lm_eval --model hf --model_args pretrained=.,trust_remote_code=True")
    (work / "sitecustomize.py").write_text(BLOCK_COCOMIX)
    bin_dir = str(Path(sys.executable).parent)
    proc = subprocess.run(["bash", "-c", command], cwd=out, capture_output=True, text=True, timeout=600,
                          env={**env, "PYTHONPATH": str(work), "PATH": bin_dir + os.pathsep + env["PATH"]})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (out / "lm_eval_out").rglob("results_*.json")
    results = json.loads(result_file.read_text())["results"]
    shutil.rmtree(out / "lm_eval_out")  # leave the export as it was
    metrics = read_sealed_json(next(ckpt.glob("eval-limit8-*.json")))["metrics"]  # --limit: beside eval.json
    compared = 0
    for key, value in metrics.items():
        if "/" in key:
            task, metric = key.split("/", 1)
            assert results[task][f"{metric},none"] == value, (key, results[task][f"{metric},none"], value)
            compared += 1
    assert compared == 8  # acc, acc_norm and their standard errors, for both tasks


def test_export_refuses_a_non_empty_folder_and_exports_a_checkpoint_folder(exported, tmp_path, capsys):
    from cocomix.cli import main

    run_dir = exported["cfg"].run_dir
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(run_dir), str(taken)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cocomix: error: {taken}: exists and is not empty"), err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: not found" in err and not (tmp_path / "out").exists()

    # A checkpoint folder (the older one, never evaluated) into an existing empty folder.
    older = sorted((run_dir / "checkpoints").glob("step_*"))[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(older), str(empty)]) == 0
    card = (empty / "README.md").read_text()
    assert "Not evaluated" in card and "lm_eval --model" not in card and not (empty / "eval_tasks").exists()
    assert "step 8," in card and not list(empty.rglob("*.pt"))


TOKENIZER_ONLY = BLOCK_COCOMIX + """
import json
from transformers import AutoTokenizer, PreTrainedTokenizerFast
folder = sys.argv[1]
fast = PreTrainedTokenizerFast.from_pretrained(folder)
auto = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
print(json.dumps({"fast": fast("the cat sat").input_ids, "auto": auto("the cat sat").input_ids,
                  "eos": fast.eos_token, "max_length": fast.model_max_length}))
"""


def test_the_exported_tokenizer_loads_alone_without_custom_code_or_a_prompt(exported, tmp_path):
    # The card showed AutoTokenizer.from_pretrained(folder), which (transformers 5 reads config.json
    # first) stops at "Do you wish to run the custom code? [y/N]" for 15 s in a terminal. The card's
    # PreTrainedTokenizerFast, and AutoTokenizer with trust_remote_code=False, load it without asking:
    # here with stdin an open pipe (a prompt would wait its 15 s) and cocomix not importable.
    from cocomix.data.tokenizer import load_tokenizer

    out = exported["out"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", TOKENIZER_ONLY, str(out)], cwd=tmp_path, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=120)  # stdin stays open meanwhile
    finally:
        proc.kill()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, stderr[-2000:]
    assert time.monotonic() - start < 12 and "Do you wish" not in stdout + stderr, (time.monotonic() - start, stdout)
    got = json.loads(stdout.strip().splitlines()[-1])
    expected = load_tokenizer(exported["cfg"].data_dir / "tokenizer")("the cat sat").input_ids
    assert got["fast"] == got["auto"] == expected and got["eos"] == "<|endoftext|>"
    assert got["max_length"] == N_POSITIONS
    card = (out / "README.md").read_text()
    assert 'tokenizer = PreTrainedTokenizerFast.from_pretrained("<this folder or repo>")' in card
    # Plain AutoTokenizer.from_pretrained(folder) in a batch job (no terminal: stdin is /dev/null) loads at
    # once too: transformers' question gets end-of-file, counts as "no", and the tokenizer loads alone.
    plain = ("import json, sys\nfrom transformers import AutoTokenizer\n"
             "print(json.dumps(AutoTokenizer.from_pretrained(sys.argv[1])('the cat sat').input_ids))")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", BLOCK_COCOMIX + plain, str(out)], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and time.monotonic() - start < 12, proc.stderr[-2000:]
    assert json.loads(proc.stdout.rsplit("[y/N] ", 1)[-1].strip()) == expected  # after the question's text
