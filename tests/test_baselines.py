"""Baselines on the shared trainer: KD, pause tokens, KD + pause (spec section 3)."""

import math
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_overrides
from cocomix.config import ConfigError, load_config
from cocomix.methods import get_method
from cocomix.trainer import Trainer, train

SHORT = ["train.tokens=40960", "train.log_every_steps=5"]  # 40 steps of 1024 tokens


def _cfg(tmp_path, data, *extra):
    return load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, data, *extra))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(final: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(final["checkpoint"]) / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# KD
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_kl_equals_reference(temperature):
    from baselines.kd import kd_kl

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 3
    # Reference: the textbook sum over the vocabulary, in float64, one position at a time.
    total = 0.0
    for b in range(2):
        for t in range(5):
            p = torch.softmax(teacher[b, t].double() / temperature, -1)
            q = torch.softmax(student[b, t].double() / temperature, -1)
            total += float((p * (p / q).log()).sum())
    expected = temperature**2 * total / 10
    assert kd_kl(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    # And torch's own KL between categoricals agrees.
    dist = torch.distributions.Categorical
    ref = torch.distributions.kl_divergence(dist(logits=teacher / temperature), dist(logits=student / temperature))
    assert kd_kl(student, teacher, temperature).item() == pytest.approx(temperature**2 * ref.mean().item(), rel=1e-5)
    assert kd_kl(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_kl_compares_the_real_vocabulary_of_padded_logits():
    from baselines.kd import kd_kl

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=g) * 3, torch.randn(2, 5, 7, generator=g) * 3

    def pad(logits, width):  # padding columns as the model fills them
        return torch.cat([logits, torch.full((*logits.shape[:-1], width), float("-inf"))], dim=-1)

    expected = kd_kl(student, teacher)
    assert torch.equal(kd_kl(pad(student, 3), teacher, vocab_size=7), expected)  # padded student
    assert torch.equal(kd_kl(student, pad(teacher, 9), vocab_size=7), expected)  # padded teacher
    assert torch.equal(kd_kl(pad(student, 3), pad(teacher, 3), vocab_size=7), expected)  # both
    # Over the padded columns themselves the KL would be 0 * (-inf - -inf) = NaN: why vocab_size exists.
    assert kd_kl(pad(student, 3), pad(teacher, 3)).isnan()
    with pytest.raises(ValueError, match="vocab_size"):
        kd_kl(pad(student, 3), teacher)


def _kd_method(teacher, vocab_size, lam=0.1, temperature=2.0):
    """The KD method as `KD.setup` leaves it, without a trainer."""
    from baselines.kd import KD
    from cocomix.device import autocast

    kd = get_method("kd")
    assert isinstance(kd, KD)
    kd.lam, kd.temperature, kd.vocab_size, kd.teacher = lam, temperature, vocab_size, teacher
    kd.teacher_autocast = autocast(torch.device("cpu"), "fp32")
    return kd


def _with_padded_vocab(model, rows: int):
    """A copy of `model` whose vocabulary is padded to `rows` (large random padding rows)."""
    from cocomix.model import CocomixConfig, CocomixForCausalLM

    c = model.config
    padded = CocomixForCausalLM(CocomixConfig(vocab_size=rows, real_vocab_size=c.vocab_size, n_positions=c.n_positions,
                                              n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head))
    state = model.state_dict()
    pad = torch.randn(rows - c.vocab_size, c.n_embd) * 50
    for name in ("transformer.wte.weight", "lm_head.weight"):  # tied: one tensor under two names
        state[name] = torch.cat([state[name], pad])
    padded.load_state_dict(state)
    return padded.train(model.training)


def test_kd_loss_of_a_padded_student_equals_the_unpadded_students():
    from cocomix.methods.base import Batch
    from cocomix.model import CocomixConfig, CocomixForCausalLM

    V = 100
    torch.manual_seed(0)

    def tiny(seed):
        torch.manual_seed(seed)
        return CocomixForCausalLM(CocomixConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                                init_std=0.3))

    student, teacher = tiny(0).train(), tiny(1).eval().requires_grad_(False)
    padded_student, padded_teacher = _with_padded_vocab(student, 128), _with_padded_vocab(teacher, 192)
    batch = Batch(torch.randint(0, V, (3, 16), generator=torch.Generator().manual_seed(2)))
    loss, parts = _kd_method(teacher, V).loss(student, batch)
    assert parts["kd_loss"] > 0.1  # different models: a real KL
    loss.backward()
    for pair_teacher in (teacher, padded_teacher):  # padded student with an unpadded, then a padded teacher
        padded_student.zero_grad()
        got, got_parts = _kd_method(pair_teacher, V).loss(padded_student, batch)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(got_parts["kd_loss"], parts["kd_loss"], rtol=1e-6, atol=0)
        got.backward()
        torch.testing.assert_close(padded_student.transformer.wte.weight.grad[:V], student.transformer.wte.weight.grad,
                                   rtol=1e-5, atol=1e-8)
        assert bool((padded_student.transformer.wte.weight.grad[V:] == 0).all())


def test_kd_trains_a_padded_student_against_an_unpadded_or_padded_teacher(tmp_path, tiny_data, tiny_teacher):
    # The tiny corpus has 512 ids; vocab_multiple=384 pads the student to 768 rows, the teacher keeps 512.
    trainer = Trainer(_cfg(tmp_path, tiny_data, "method=kd", f"teacher.path={tiny_teacher}", "model.vocab_multiple=384"),
                      progress=False)
    assert (trainer.model.config.vocab_size, trainer.model.config.real_vocab_size) == (768, 512)
    assert trainer.method.teacher.config.vocab_size == 512
    batch = trainer.next_micro_batches()[0]
    loss, parts = trainer.method.loss(trainer.model, batch)
    assert torch.isfinite(loss) and parts["kd_loss"].item() > 0.5
    # Both padded (the teacher is the student's initial weights): a KL of exactly the same
    # distributions is 0, not the NaN of 0 * (-inf - -inf) in the padding columns.
    init = Trainer(_cfg(tmp_path, tiny_data, "run_name=init", "model.vocab_multiple=384"), progress=False)
    both = Trainer(_cfg(tmp_path, tiny_data, "method=kd", f"teacher.path={init.save_checkpoint()}",
                        "model.vocab_multiple=384"), progress=False)
    assert both.method.teacher.config.vocab_size == 768
    _, parts = both.method.loss(both.model, both.next_micro_batches()[0])
    assert parts["kd_loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_kd_teacher_equal_to_student_init_gives_zero_kl(tmp_path, tiny_data, tiny_teacher):
    # The student's initial weights (same seed, same config), saved as a checkpoint: the teacher.
    init = Trainer(_cfg(tmp_path, tiny_data, "run_name=init"), progress=False)
    init_ckpt = init.save_checkpoint()

    trainer = Trainer(_cfg(tmp_path, tiny_data, "method=kd", f"teacher.path={init_ckpt}"), progress=False)
    for name, p in trainer.model.state_dict().items():
        assert torch.equal(p, trainer.method.teacher.state_dict()[name]), name
    batch = trainer.next_micro_batches()[0]
    loss, parts = trainer.method.loss(trainer.model, batch)
    assert parts["kd_loss"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(parts["ntp_loss"].item() + 0.1 * parts["kd_loss"].item(), rel=1e-6)
    assert not trainer.method.teacher.training
    assert all(not p.requires_grad for p in trainer.method.teacher.parameters())

    # Not vacuous: a trained teacher is far from the random student (its KL is large).
    trained = Trainer(_cfg(tmp_path, tiny_data, "method=kd", f"teacher.path={tiny_teacher}"), progress=False)
    _, parts = trained.method.loss(trained.model, batch)
    assert parts["kd_loss"].item() > 0.5


def test_kd_with_zero_weight_reproduces_ntp(tmp_path, tiny_data, tiny_teacher):
    # Dropout on: the teacher must not shift the student's RNG stream either.
    common = [*SHORT, "model.dropout=0.1"]
    ntp = train(_cfg(tmp_path, tiny_data, *common), progress=False)
    kd_cfg = _cfg(tmp_path, tiny_data, *common, "method=kd", "kd.lam=0", f"teacher.path={tiny_teacher}")
    kd = train(kd_cfg, progress=False)

    ntp_log, kd_log = _metrics(_cfg(tmp_path, tiny_data, *common).run_dir), _metrics(kd_cfg.run_dir)
    assert len(ntp_log) == len(kd_log) > 2
    for a, b in zip(ntp_log, kd_log):
        for key in ("step", "train/loss", "train/ntp_loss", "val/loss"):
            assert a.get(key) == b.get(key), (key, a, b)
        assert "train/kd_loss" not in a and b["train/kd_loss"] > 0  # the teacher really ran
    ntp_w, kd_w = _weights(ntp), _weights(kd)
    assert ntp_w.keys() == kd_w.keys()
    for name in ntp_w:
        assert torch.equal(ntp_w[name], kd_w[name]), name
    assert kd["teacher_flops_per_token"] > 0 and ntp["teacher_flops_per_token"] == 0


def test_kd_refuses_a_teacher_with_another_vocabulary(tmp_path, tiny_data, tiny_teacher):
    with pytest.raises(ConfigError, match=r"^config key 'teacher.path': .*vocab_size.*tokenizer"):
        Trainer(_cfg(tmp_path, tiny_data, "method=kd", f"teacher.path={tiny_teacher}", "model.vocab_size=600"),
                progress=False)


def test_kd_refuses_a_teacher_with_another_tokenizer(tmp_path, tiny_data, tiny_teacher):
    import shutil

    from cocomix.data import DataError

    other = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped: a different tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DataError, match=r"tokenizer .*teacher.* does not match the tokenizer of"):
        Trainer(_cfg(tmp_path, tiny_data, "method=kd", f"teacher.path={other}"), progress=False)


# ---------------------------------------------------------------------------------------------
# Pause tokens
# ---------------------------------------------------------------------------------------------


def _pause_model(tmp_path, readout="pause"):
    """A pause model as the `pause` method builds it: 3 blocks, pause slot after block 1."""
    cfg = load_config(ROOT / "config/tiny.yaml", tiny_overrides(tmp_path, tmp_path, "model.n_layer=3",
                                                                "concept.insert_layer=1", "train.block_size=32",
                                                                f"pause.readout={readout}"))
    torch.manual_seed(0)
    model = get_method("pause").build_model(cfg, vocab_size=512, eos_id=0).eval()
    assert model.config.slot == "pause" and model.config.insert_layer == 1
    assert model.config.slot_options == {"readout": readout}
    return model


READOUTS = pytest.mark.parametrize("readout", ["pause", "token"])


@READOUTS
def test_pause_training_forward_is_causal(tmp_path, readout):
    model = _pause_model(tmp_path, readout).train()  # dropout 0: train mode is deterministic
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    logits = model(input_ids=ids, use_cache=False).logits  # (1, T, V)
    assert logits.shape == (1, 32, 512)
    # Row t of `changed` differs from `ids` only at token t+1: one forward checks every t.
    changed = ids.repeat(31, 1)  # (31, T)
    rows = torch.arange(31)
    changed[rows, rows + 1] = (ids[0, rows + 1] + 1) % 512
    other = model(input_ids=changed, use_cache=False).logits  # (31, T, V)
    for t in range(31):
        torch.testing.assert_close(other[t, : t + 1], logits[0, : t + 1], rtol=0, atol=1e-6)
        assert (other[t, t + 1] - logits[0, t + 1]).abs().max() > 1e-3  # position t+1 does see it
    # The pause slots are really read: a different pause vector changes every prediction, except, with
    # the token read-out, the first one (token 0's slot comes before any pause slot).
    with torch.no_grad():
        model.slot.embedding.add_(torch.randn(model.config.n_embd))  # not a constant: LayerNorm removes those
    shifted = model(input_ids=ids, use_cache=False).logits
    first = 1 if readout == "token" else 0
    assert (shifted - logits)[0, first:].abs().amax(dim=-1).min() > 1e-3
    if readout == "token":
        torch.testing.assert_close(shifted[0, 0], logits[0, 0], rtol=0, atol=1e-6)


@READOUTS
def test_pause_cached_generation_matches_and_is_causal(tmp_path, readout):
    model = _pause_model(tmp_path, readout)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        for prefill in (1, 10):
            # Prefill, then one token at a time over the KV cache: the same logits at every position.
            out = model(input_ids=ids[:, :prefill], use_cache=True)
            steps, cache = [out.logits], out.past_key_values
            for t in range(prefill, 24):
                out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits)
                cache = out.past_key_values
            torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
        # Causality inside a cached prefill: changing token t+1 leaves positions <= t alone.
        changed = ids.clone()
        changed[:, 6] = (ids[:, 6] + 1) % 512
        a = model(input_ids=ids[:, :10], use_cache=True).logits
        b = model(input_ids=changed[:, :10], use_cache=True).logits
        torch.testing.assert_close(b[:, :6], a[:, :6], rtol=0, atol=1e-6)
        assert (b[:, 6] - a[:, 6]).abs().max() > 1e-3
        # generate() with the cache picks the same tokens as without it.
        prompt = ids[:, :5]
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 17) and torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------
# Accounting: FLOPs per token by hand, parameter matching at the paper's scales
# ---------------------------------------------------------------------------------------------


def test_flops_per_token_of_every_method_by_hand(tmp_path, tiny_data, tiny_teacher):
    from cocomix.flops import concept_label_flops_per_token

    V, d, T, L, ell = 512, 64, 64, 2, 1      # TINY: vocab, width, block, student blocks, insert_layer
    L_teacher = 3                            # the tiny teacher: same width, 3 blocks
    P = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)  # one block
    head = 2 * d + V * d                     # ln_f + the LM-head matmul (tied, still a matmul)
    ntp = 6 * (L * P + head) + 12 * L * d * T
    # Pause: the upper L - ell blocks run on 2 positions per token, attending over 2T keys.
    pause = 6 * (ell * P + 2 * (L - ell) * P + head) + 12 * d * T * (ell + 4 * (L - ell))
    teacher_forward = 2 * (L_teacher * P + head) + 4 * L_teacher * d * T
    expected = {"ntp": (ntp, 0), "kd": (ntp, teacher_forward), "pause": (pause, 0),
                "kd_pause": (pause, teacher_forward)}
    for method, (student, teacher) in expected.items():
        trainer = Trainer(_cfg(tmp_path, tiny_data, f"method={method}", f"teacher.path={tiny_teacher}"),
                          progress=False)
        got = trainer.accounting
        assert (got["flops_per_token"], got["teacher_flops_per_token"]) == (student, teacher), method
        # total = active for the baselines; the pause vector is d more parameters
        extra = d if "pause" in method else 0
        assert got["params"] == got["active_params"] == (V + T) * d + L * P + 2 * d + extra, method

    # Online CoCoMix labels (cocomix/flops.py): teacher forward, activation-gradient backward from the
    # loss to the output of block `layer` (LM head, ln_f, the blocks above; 8dT attention each), and the
    # SAE's dense encode and g @ W_dec (2dC each). Activation labels: the forward to `layer` + encode.
    from cocomix.teacher import load_teacher

    teacher_model = load_teacher(_cfg(tmp_path, tiny_data, f"teacher.path={tiny_teacher}"))
    C, layer = 256, 1
    above = L_teacher - layer - 1
    backward = 2 * (above * P + head) + 8 * above * d * T
    assert concept_label_flops_per_token(teacher_model, layer, C, T) == teacher_forward + backward + 4 * d * C
    assert concept_label_flops_per_token(teacher_model, layer, C, T, "activation") == \
        2 * (layer + 1) * P + 4 * (layer + 1) * d * T + 2 * d * C


@pytest.mark.parametrize("config, scale", [("paper", "69M"), ("paper", "386M"), ("paper", "1.38B"),
                                           ("gutenberg", "small"), ("gutenberg", "medium")])
def test_baselines_are_parameter_matched_to_cocomix_at_every_shipped_scale(config, scale):
    from cocomix.params import count_params_for, head_counts, matching_ntp_width

    vocab = 50257 if config == "paper" else 8192

    def counts(method):
        cfg = load_config(ROOT / f"config/{config}.yaml", [f"scale={scale}", f"method={method}"])
        model_config = get_method(method).model_config(cfg, vocab, 0)
        return cfg, model_config, count_params_for(model_config)

    cocomix_cfg, cocomix_model, cocomix = counts("cocomix")
    cocomix_head = cocomix_cfg.model.n_embd // cocomix_cfg.model.n_head
    assert cocomix_head % 8 == 0
    for method in ("ntp", "kd", "pause", "kd_pause"):
        cfg, model_config, got = counts(method)
        m = cfg.model
        assert m.n_layer == cocomix_cfg.model.n_layer
        # The width is the one whose parameters come closest to CoCoMix's active parameters (spec 1.7; the
        # padded vocabulary included): the paper's (a multiple of 16) if it splits into heads whose width is a
        # multiple of 8, else the closest multiple of 8 that does (issue 15), and the pause slot sits where
        # CoCoMix interleaves.
        args = (cocomix.active, m.n_layer, model_config.vocab_size, model_config.n_positions)
        paper = matching_ntp_width(*args)
        if config == "paper" and head_counts(paper):
            assert m.n_embd == paper, method
        else:
            assert m.n_embd == matching_ntp_width(*args, multiple_of=8, head_dim_multiple=8), method
        # Heads: a multiple-of-8 head width, the one closest to CoCoMix's own head width.
        assert m.n_head in head_counts(m.n_embd), method
        assert m.n_head == min(head_counts(m.n_embd), key=lambda h: abs(m.n_embd // h - cocomix_head)), method
        assert abs(got.active / cocomix.active - 1) < 0.02, (method, got.active, cocomix.active)
        assert got.total == got.active
        assert cfg.concept.insert_layer == cocomix_cfg.concept.insert_layer


# ---------------------------------------------------------------------------------------------
# Every method trains on the tiny config and logs the same metric names to MLflow
# ---------------------------------------------------------------------------------------------


def _random_sae(folder: Path, d_model: int, n_latents: int, k: int, layer: int) -> Path:
    """An untrained SAE in `cocomix.sae`'s folder format: enough for online labels to be computed."""
    from safetensors.torch import save_file

    from cocomix.sae import SAE_CONFIG, WEIGHTS, TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(d_model, n_latents, k)
    torch.nn.init.normal_(sae.encoder.weight)
    torch.nn.init.normal_(sae.decoder.weight)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(folder / WEIGHTS))
    meta = {"format": "cocomix-topk-sae-v1", "d_model": d_model, "n_latents": n_latents, "k": k, "normalize": True,
            "layer": layer}
    (folder / SAE_CONFIG).write_text(json.dumps(meta))
    return folder


def test_every_method_trains_and_logs_the_same_metrics_to_mlflow(tmp_path, tiny_data, tiny_teacher):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sae = _random_sae(tmp_path / "sae", 64, 64, 8, layer=1)
    common = ["train.tokens=16384", "eval.max_blocks=16", "tracking.enabled=true", f"tracking.uri={uri}",
              f"teacher.path={tiny_teacher}", f"sae.path={sae}", "sae.n_latents=64", "sae.k=8", "concept.k=8",
              "concept.labels=online"]
    finals = {}
    for method in ("ntp", "kd", "pause", "kd_pause", "cocomix"):
        finals[method] = train(_cfg(tmp_path, tiny_data, *common, f"method={method}"), progress=False)

    shared = {"train/loss", "train/ntp_loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
              "val/loss", "val/ppl"}
    readout = {"val/readout_self_attn", "val/readout_self_attn_uniform"}  # interleaving models (cocomix/diagnostics.py)
    own = {"ntp": set(), "pause": readout, "kd": {"train/kd_loss"}, "kd_pause": {"train/kd_loss"} | readout,
           "cocomix": {"train/concept_loss", "train/slot_norm_ratio", "val/concept_loss", "val/concept_acc", "val/concept_acc_any",
                       "val/loss_no_concept"} | readout}
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert sorted(r.data.tags["method"] for r in runs) == sorted(own)
    for run in runs:
        method, final = run.data.tags["method"], finals[run.data.tags["method"]]
        assert run.info.status == "FINISHED" and run.info.run_id == final["mlflow_run_id"]
        assert set(run.data.metrics) == shared | own[method], method
        assert run.data.metrics["val/loss"] == pytest.approx(final["val/loss"])
        history = client.get_metric_history(run.info.run_id, "train/ntp_loss")
        assert [m.step for m in history] == [10240, 16384]  # step axis = tokens seen
        for key in ("params", "active_params", "flops_per_token", "teacher_flops_per_token", "tokens_per_step"):
            assert run.data.params[f"accounting.{key}"] == str(final[key]), (method, key)
        assert (final["teacher_flops_per_token"] > 0) == (method in ("kd", "kd_pause", "cocomix")), method
    assert finals["cocomix"]["active_params"] < finals["cocomix"]["params"]
    # The compute ledger: the student and online teacher over the tokens seen, and the one-off items the
    # run shares (the teacher's training from its own run's metrics; CoCoMix online: the SAE's too).
    teacher_final = json.loads((tiny_teacher.parent.parent / "final_metrics.json").read_text())
    teacher_flops = teacher_final["flops_per_token"] * json.loads((tiny_teacher / "checkpoint.json").read_text())["tokens_seen"]
    for method, final in finals.items():
        assert final["compute/student_flops"] == final["flops_per_token"] * final["tokens_seen"], method
        assert final["compute/online_teacher_flops"] == final["teacher_flops_per_token"] * final["tokens_seen"], method
        one_off = {k for k in final if k.startswith("compute/") and k.split("/")[1] not in ("student_flops", "online_teacher_flops")}
        want = {"ntp": set(), "pause": set(), "kd": {"teacher_training"}, "kd_pause": {"teacher_training"},
                "cocomix": {"teacher_training", "sae_training"}}[method]  # online labels: no extraction
        assert one_off == {f"compute/{k}_flops" for k in want} and set(final["compute_notes"]) == want, method
        if "teacher_training" in want:
            assert final["compute/teacher_training_flops"] == teacher_flops
            assert final["compute_notes"]["teacher_training"].startswith("counted: teacher run")
    assert finals["cocomix"]["compute/sae_training_flops"] is None  # a given SAE (sae.path): not counted, said so
    assert finals["cocomix"]["compute_notes"]["sae_training"] == "not counted (a given SAE, sae.path)"


@pytest.mark.parametrize("method,extra", [("ntp", []), ("kd", []), ("pause", []), ("kd_pause", []), ("cocomix", []),
                                          ("cocomix", ["concept.mix=none"]), ("cocomix", ["concept.target=hidden_l2"])],
                         ids=["ntp", "kd", "pause", "kd_pause", "cocomix", "cocomix-pred_only", "cocomix-hidden"])
def test_every_method_trains_under_bf16_autocast_and_torch_compile(tmp_path, tiny_data, tiny_teacher, method, extra):
    # What a GPU run does (bf16 autocast, a compiled forward), exercised on CPU. The trainer's step
    # took `train_model or model`: a compiled module has no truth value, so train.compile=true failed
    # at the first step. Dynamo and AOTAutograd trace here (backend aot_eager: no C++ build, seconds);
    # benchmarks/gpu_check.py --quick runs the inductor backend for NTP and CoCoMix.
    sae = _random_sae(tmp_path / "sae", 64, 64, 8, layer=1)
    common = ["train.tokens=4096", "eval.max_blocks=16", f"teacher.path={tiny_teacher}", f"sae.path={sae}",
              "sae.n_latents=64", "sae.k=8", "concept.k=8", "concept.labels=online", f"method={method}", *extra]
    eager = train(_cfg(tmp_path / "eager", tiny_data, *common), progress=False)
    trainer = Trainer(_cfg(tmp_path / "bf16", tiny_data, *common, "train.precision=bf16"), progress=False)
    assert trainer.autocast.fast_dtype == torch.bfloat16
    trainer.train_model = torch.compile(trainer.model, backend="aot_eager")
    fast = trainer.train()
    assert math.isfinite(fast["val/loss"])
    assert fast["val/loss"] == pytest.approx(eager["val/loss"], abs=0.05)  # bf16 rounding, same 4 steps
