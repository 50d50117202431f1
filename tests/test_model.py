"""The backbone against independent references: transformers' GPT-2, full forwards, hand formulas."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.cache_utils import DynamicCache

import cocomix  # registers the "cocomix" model type
from cocomix.model import CocomixConfig, CocomixForCausalLM, padded_vocab_size, token_nll

VOCAB, N_POSITIONS, PAD = 300, 64, 0


def tiny_config(**overrides):
    fields = dict(vocab_size=VOCAB, n_positions=N_POSITIONS, n_embd=64, n_layer=2, n_head=4,
                  bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
    return CocomixConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=N_POSITIONS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def model(gpt2):
    return CocomixForCausalLM.from_gpt2(gpt2).eval()


@pytest.fixture(scope="module")
def generator():
    # At init_std=0.02 a tiny random model greedily repeats one token whatever the context, which would
    # hide cache or padding bugs; large weights make each continuation depend on the whole prefix.
    torch.manual_seed(0)
    return CocomixForCausalLM(tiny_config(init_std=1.0)).eval()


def random_ids(batch, length, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)  # 0..2 are pad/bos/eos


# ---- parity with transformers' GPT-2 ----------------------------------------------------------

@torch.no_grad()
def test_logits_match_gpt2(gpt2, model):
    ids = random_ids(3, 20)
    assert (model(ids).logits - gpt2(ids).logits).abs().max() < 1e-4
    # inputs_embeds is the same computation entered one step later
    embeds = model.transformer.wte(ids)
    assert (model(inputs_embeds=embeds).logits - model(ids).logits).abs().max() == 0


@torch.no_grad()
def test_logits_match_gpt2_with_left_padding(gpt2, model):
    ids = random_ids(3, 20)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0   # left padding
    mask[2, :19] = 0  # a single real token
    ids = ids.masked_fill(mask == 0, PAD)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes
    ours = model(ids, attention_mask=mask, position_ids=positions).logits
    theirs = gpt2(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.isfinite(ours).all()  # fully masked rows (pad queries) must not produce NaN
    real = mask.bool()  # outputs at pad slots are meaningless; compare real tokens only
    assert (ours[real] - theirs[real]).abs().max() < 1e-4


@torch.no_grad()
def test_loss_and_hidden_states_match_gpt2(gpt2, model):
    ids = random_ids(2, 16)
    labels = ids.clone()
    labels[0, 3:7] = -100
    ours = model(ids, labels=labels, output_hidden_states=True)
    theirs = gpt2(ids, labels=labels, output_hidden_states=True)
    assert abs(ours.loss.item() - theirs.loss.item()) < 1e-5
    # and against a hand-written shifted cross-entropy
    manual = torch.nn.functional.cross_entropy(
        ours.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(ours.loss.item() - manual.item()) < 1e-6
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for mine, ref in zip(ours.hidden_states, theirs.hidden_states):
        assert (mine - ref).abs().max() < 1e-4


def test_from_gpt2_ties_and_transposes(gpt2, model):
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.n_layer == 2 and model.config.dropout == 0.0
    torch.testing.assert_close(model.transformer.h[1].mlp.c_fc.weight, gpt2.transformer.h[1].mlp.c_fc.weight.t())


# ---- causality, cache, generation -------------------------------------------------------------

@torch.no_grad()
def test_changing_a_future_token_leaves_the_past_unchanged(model):
    ids = random_ids(2, 16)
    t = 9
    changed = ids.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % VOCAB
    before, after = model(ids).logits, model(changed).logits
    assert (before[:, : t + 1] - after[:, : t + 1]).abs().max() == 0
    assert (before[:, t + 1] - after[:, t + 1]).abs().max() > 0


@torch.no_grad()
def test_chunked_prefill_with_cache_equals_full_forward(model):
    ids = random_ids(2, 14)
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    first = model(ids[:, :6], past_key_values=cache, use_cache=True).logits
    second = model(ids[:, 6:], past_key_values=cache, use_cache=True).logits  # 8 queries over 14 keys
    assert cache.get_seq_length() == 14
    assert (torch.cat([first, second], dim=1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_greedy_generate_cached_equals_uncached_equals_manual_loop(generator):
    model = generator
    prompt = random_ids(2, 5, seed=1)
    new_tokens = 12
    cached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
    manual = prompt
    for _ in range(new_tokens):
        next_token = model(manual, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        manual = torch.cat([manual, next_token], dim=1)
    assert cached.shape == (2, 5 + new_tokens)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, manual)
    assert all(len(set(row[5:].tolist())) > 3 for row in cached)  # a non-degenerate continuation


@torch.no_grad()
def test_left_padded_batch_generation_equals_one_prompt_at_a_time(generator):
    model = generator
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 8, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=10, do_sample=False, pad_token_id=PAD)
        assert torch.equal(batched[row, width:], alone[0, len(prompt):]), f"row {row}"
        assert len(set(alone[0, len(prompt):].tolist())) > 3  # a non-degenerate continuation


# ---- save / load in a fresh process ------------------------------------------------------------

LOAD_AND_DUMP = """
import sys, torch
{prelude}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], {kwargs}).eval()
with torch.no_grad():
    logits = model(torch.load(sys.argv[2])).logits
torch.save({{"logits": logits, "module": type(model).__module__,
             "cocomix_imported": sys.modules.get("cocomix") is not None}}, sys.argv[3])
"""


def load_in_subprocess(tmp_path, checkpoint, ids, prelude, kwargs, name):
    ids_file, out_file = tmp_path / "ids.pt", tmp_path / f"{name}.pt"
    torch.save(ids, ids_file)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                        "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}  # keep copied code out of ~/.cache
    script = LOAD_AND_DUMP.format(prelude=prelude, kwargs=kwargs)
    subprocess.run([sys.executable, "-c", script, str(checkpoint), str(ids_file), str(out_file)],
                   check=True, cwd=tmp_path, env=env, capture_output=True)
    return torch.load(out_file)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [None, "concept", "padded"])
def test_save_and_load_in_a_fresh_process_both_ways(tmp_path, variant):
    torch.manual_seed(0)
    extra = {None: {}, "concept": dict(slot="concept", insert_layer=1, slot_options={"n_concepts": 40, "k": 4}),
             "padded": dict(vocab_size=320, real_vocab_size=VOCAB)}[variant]
    original = CocomixForCausalLM(tiny_config(**extra)).eval()
    checkpoint = tmp_path / "checkpoint"
    original.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "cocomix" and "AutoModelForCausalLM" in config["auto_map"]
    assert config["real_vocab_size"] == VOCAB
    assert (checkpoint / "model.py").exists() and (checkpoint / "slots.py").exists()  # remote code: both files
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = original(ids).logits

    # (a) the package is imported: its registration wins over auto_map, no trust_remote_code needed
    local = load_in_subprocess(tmp_path, checkpoint, ids, "import cocomix", "", "local")
    assert local["module"] == "cocomix.model"
    assert torch.equal(local["logits"], expected)  # torch.equal: padded columns are -inf on both sides

    # (b) the package is made unimportable: the copied model.py is used
    remote = load_in_subprocess(tmp_path, checkpoint, ids, "sys.modules['cocomix'] = None  # import fails",
                                "trust_remote_code=True", "remote")
    assert remote["module"].startswith("transformers_modules.")
    assert not remote["cocomix_imported"]
    assert torch.equal(remote["logits"], expected)
    assert expected.shape[-1] == extra.get("vocab_size", VOCAB)
    assert bool((expected[..., VOCAB:] == float("-inf")).all())


@pytest.mark.parametrize("padded", [False, True])
def test_auto_class_round_trip_in_process(tmp_path, padded):
    original = CocomixForCausalLM(tiny_config(**(dict(vocab_size=320, real_vocab_size=VOCAB) if padded else {}))).eval()
    original.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is CocomixForCausalLM
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert (loaded.config.vocab_size, loaded.config.real_vocab_size) == (original.config.vocab_size, VOCAB)
    ids = random_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)


def test_a_config_without_real_vocab_size_is_unpadded():
    # Checkpoints saved before vocabulary padding have no real_vocab_size: every row is a token.
    config = CocomixConfig.from_dict(tiny_config().to_dict() | {"real_vocab_size": None})
    assert config.real_vocab_size == config.vocab_size == VOCAB
    with pytest.raises(ValueError, match="real_vocab_size"):
        tiny_config(vocab_size=100, real_vocab_size=101)


# ---- accounting and init -----------------------------------------------------------------------

def test_num_params_and_flops_per_token():
    model = CocomixForCausalLM(tiny_config(n_embd=48, n_layer=3, n_head=4))
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    # by hand: each block = 2 LayerNorms + qkv + attn proj + mlp in + mlp out, all with biases
    d, layers, vocab, seq_len = 48, 3, VOCAB, 32
    per_block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    non_embedding = layers * per_block + 2 * d  # + ln_f
    assert model.num_params(non_embedding=True) == non_embedding
    assert model.num_params() == non_embedding + vocab * d + N_POSITIONS * d
    expected_flops = 6 * (non_embedding + vocab * d) + 12 * layers * d * seq_len
    assert model.flops_per_token(seq_len) == expected_flops
    # A padded vocabulary is counted as it runs: 320 stored rows, a 320-wide LM-head matmul.
    padded = CocomixForCausalLM(tiny_config(n_embd=48, n_layer=3, n_head=4, vocab_size=320, real_vocab_size=VOCAB))
    assert padded.num_params() == non_embedding + 320 * d + N_POSITIONS * d
    assert padded.flops_per_token(seq_len) == 6 * (non_embedding + 320 * d) + 12 * layers * d * seq_len


def test_init_scales_residual_projections():
    layers, std = 4, 0.02
    model = CocomixForCausalLM(tiny_config(n_embd=128, n_layer=layers, n_head=4, init_std=std))
    residual = torch.cat([torch.cat([b.attn.c_proj.weight.flatten(), b.mlp.c_proj.weight.flatten()])
                          for b in model.transformer.h])
    assert residual.std().item() == pytest.approx(std / math.sqrt(2 * layers), rel=0.05)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(std, rel=0.05)
    assert (model.transformer.h[0].mlp.c_fc.bias == 0).all()
    assert (model.transformer.ln_f.weight == 1).all()


# ---- vocabulary padding (model.vocab_multiple) ---------------------------------------------------

REAL, PADDED = 100, 128  # a real vocabulary of 100 ids padded to a multiple of 64


def test_the_vocabulary_is_padded_to_a_multiple_of_64_by_default():
    from conftest import ROOT
    from cocomix.config import load_config
    from cocomix.methods import get_method

    assert [padded_vocab_size(v) for v in (50257, 100, 512, 1)] == [50304, 128, 512, 64]
    assert padded_vocab_size(50257, 1) == 50257
    cfg = load_config(ROOT / "config/paper.yaml", ["scale=69M"])
    assert cfg.model.vocab_multiple == 64
    config = get_method("ntp").model_config(cfg, 50257, 50256)
    assert (config.vocab_size, config.real_vocab_size) == (50304, 50257)
    unpadded = get_method("ntp").model_config(load_config(ROOT / "config/paper.yaml", ["model.vocab_multiple=1"]),
                                              50257, 50256)
    assert (unpadded.vocab_size, unpadded.real_vocab_size) == (50257, 50257)


def padded_pair(init_std=0.5, pad_scale=50.0, **extra):
    """(unpadded model with REAL ids, the same weights padded to PADDED rows). The padding rows are
    large random vectors, so without the -inf mask they would win every argmax and most of the mass."""
    torch.manual_seed(0)
    plain = CocomixForCausalLM(tiny_config(vocab_size=REAL, init_std=init_std, **extra)).eval()
    padded = CocomixForCausalLM(tiny_config(vocab_size=PADDED, real_vocab_size=REAL, init_std=init_std, **extra)).eval()
    state = plain.state_dict()
    pad = torch.randn(PADDED - REAL, plain.config.n_embd) * pad_scale
    for name in ("transformer.wte.weight", "lm_head.weight"):  # tied: one tensor under two names
        state[name] = torch.cat([state[name], pad])
    padded.load_state_dict(state)
    assert padded.lm_head.weight is padded.transformer.wte.weight
    return plain, padded


def real_ids(batch, length, seed=0):
    return torch.randint(3, REAL, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_padded_vocabulary_gives_the_unpadded_logits_loss_and_gradients():
    plain, padded = padded_pair()
    plain.train(), padded.train()  # dropout is 0: train mode only to exercise the training path
    ids = real_ids(3, 20)
    labels = ids.clone()
    labels[0, 4:9] = -100
    a, b = plain(ids, labels=labels), padded(ids, labels=labels)
    assert b.logits.shape == (3, 20, PADDED)
    assert bool((b.logits[..., REAL:] == float("-inf")).all())
    assert torch.equal(b.logits[..., :REAL], a.logits)
    assert torch.equal(b.loss, a.loss)
    assert torch.equal(token_nll(b.logits, ids), token_nll(a.logits, ids))  # held-out loss and perplexity
    assert torch.equal(b.logits.log_softmax(-1)[..., :REAL], a.logits.log_softmax(-1))  # what lm-eval scores
    a.loss.backward(), b.loss.backward()
    grad_a, grad_b = plain.transformer.wte.weight.grad, padded.transformer.wte.weight.grad
    torch.testing.assert_close(grad_b[:REAL], grad_a, rtol=1e-6, atol=1e-9)
    assert bool((grad_b[REAL:] == 0).all())  # padding rows: never looked up, probability exactly 0
    for (name, p), q in zip(plain.named_parameters(), padded.parameters()):
        if name != "transformer.wte.weight":
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-9, msg=name)


@torch.no_grad()
def test_generate_with_a_padded_vocabulary_never_emits_a_padding_id():
    plain, padded = padded_pair(init_std=1.0)
    prompt = real_ids(2, 5, seed=1)
    greedy = padded.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert torch.equal(greedy, plain.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=PAD))
    torch.manual_seed(0)
    sampled = padded.generate(prompt.repeat(8, 1), max_new_tokens=20, do_sample=True, temperature=5.0,
                              top_k=0, top_p=1.0, pad_token_id=PAD)
    assert int(sampled.max()) < REAL
    assert len(set(sampled[:, 5:].flatten().tolist())) > 20  # a flat distribution, really sampled


def test_padded_vocabulary_perplexity_and_lm_eval_equal_the_unpadded_model(tiny_data):
    from transformers import AutoTokenizer

    from cocomix.data.shards import TokenBlocks
    from evals.harness import make_lm
    from evals.perplexity import heldout_perplexity

    torch.manual_seed(0)  # the tiny corpus has 512 ids (a multiple of 64 already): pad to 576 here
    plain = CocomixForCausalLM(tiny_config(vocab_size=512, init_std=0.2)).eval()
    padded = CocomixForCausalLM(tiny_config(vocab_size=576, real_vocab_size=512, init_std=0.2)).eval()
    state = plain.state_dict()
    pad = torch.randn(64, 64) * 50
    for name in ("transformer.wte.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], pad])
    padded.load_state_dict(state)
    ppl = [heldout_perplexity(m, tiny_data, block_size=64, batch_size=8, max_blocks=16) for m in (plain, padded)]
    assert ppl[0] == ppl[1]

    tok = AutoTokenizer.from_pretrained(tiny_data / "tokenizer")
    block = TokenBlocks(tiny_data, "val", 64).get_batch([0])[0].tolist()
    requests = [(("ctx", "cont"), block[:a], block[a:b]) for a, b in ((5, 9), (20, 21), (30, 64), (1, 40))]
    scores = [make_lm(m, tok, batch_size=2)._loglikelihood_tokens(requests, disable_tqdm=True) for m in (plain, padded)]
    assert scores[0] == scores[1]
    assert all(math.isfinite(logp) for logp, _ in scores[1])


@torch.no_grad()
def test_from_gpt2_can_pad_the_vocabulary(gpt2, model):
    padded = CocomixForCausalLM.from_gpt2(gpt2, vocab_multiple=64).eval()
    assert (padded.config.vocab_size, padded.config.real_vocab_size) == (320, VOCAB)
    assert bool((padded.transformer.wte.weight[VOCAB:] == 0).all())
    assert padded.lm_head.weight is padded.transformer.wte.weight
    ids = random_ids(2, 12)
    logits = padded(ids).logits
    assert torch.equal(logits[..., :VOCAB], model(ids).logits)
    assert bool((logits[..., VOCAB:] == float("-inf")).all())


# ---- attention implementations, attention maps, gradient checkpointing -------------------------

CONCEPT = dict(slot="concept", insert_layer=1, slot_options={"n_concepts": 40, "k": 4})
VARIANTS = {"backbone": {}, "concept": CONCEPT}  # the concept model interleaves: 2T positions above block 1


def saved_model(tmp_path, variant, **extra):
    """A saved tiny model (init_std 0.2: attention far from uniform), and its folder."""
    torch.manual_seed(0)
    model = CocomixForCausalLM(tiny_config(init_std=0.2, **VARIANTS[variant], **extra)).eval()
    model.save_pretrained(tmp_path / variant)
    return model, tmp_path / variant


def left_padded(lengths, width, seed=0):
    ids, mask = random_ids(len(lengths), width, seed=seed), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, : width - n] = PAD
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_eager_attention_equals_sdpa_and_returns_causal_maps(tmp_path, variant):
    _, folder = saved_model(tmp_path, variant)
    sdpa = AutoModelForCausalLM.from_pretrained(folder).eval()
    eager = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    T, n_layer, streams = 12, sdpa.config.n_layer, 2 if variant == "concept" else 1
    ids = random_ids(2, T)
    padded_ids, mask = left_padded([12, 7], T, seed=3)

    # Logits: no padding, left padding, and a chunked prefill over a cache (8 queries over 14 keys).
    diffs = [(eager(ids).logits - sdpa(ids).logits).abs().max().item(),
             (eager(padded_ids, attention_mask=mask).logits - sdpa(padded_ids, attention_mask=mask).logits)[mask.bool()]
             .abs().max().item()]
    long = random_ids(2, 14, seed=5)
    chunks = []
    for m in (eager, sdpa):
        cache = DynamicCache(config=m.config)
        chunks.append(torch.cat([m(long[:, :6], past_key_values=cache, use_cache=True).logits,
                                 m(long[:, 6:], past_key_values=cache, use_cache=True).logits], dim=1))
    diffs.append((chunks[0] - chunks[1]).abs().max().item())
    print(f"{variant}: eager vs sdpa max |logit diff| {diffs}")
    assert max(diffs) < 1e-5, diffs

    # The maps: one per block, (B, n_head, T, S) with S = T (2T in interleaved blocks), rows sum to 1,
    # nothing above the diagonal, padding keys never attended by a real query.
    out = eager(padded_ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == n_layer
    for i, weights in enumerate(out.attentions):
        n = T * (streams if variant == "concept" and i >= CONCEPT["insert_layer"] else 1)
        assert weights.shape == (2, 4, n, n), (i, weights.shape)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, n), rtol=0, atol=1e-6)
        assert bool((weights.triu(1) == 0).all()), f"block {i} attends to the future"
        key_mask = mask.repeat_interleave(n // T, dim=1).bool()  # (B, n): real token positions
        real_queries = weights[key_mask[:, None, :, None].expand_as(weights) & ~key_mask[:, None, None, :]]
        assert bool((real_queries == 0).all()), f"block {i}: a real token attends to padding"
    # SDPA cannot return maps: asked for them, it runs those forwards eagerly (as transformers' models do).
    fallback = sdpa(padded_ids, attention_mask=mask, output_attentions=True)
    assert len(fallback.attentions) == n_layer
    assert all(torch.equal(a, b) for a, b in zip(fallback.attentions, out.attentions))
    assert eager(ids).attentions is None  # not asked: none computed
    # Greedy cached generation is the same token for token.
    prompt = random_ids(2, 5, seed=1)
    assert torch.equal(eager.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=PAD),
                       sdpa.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=PAD))


@torch.no_grad()
def test_attn_implementation_is_honoured(tmp_path, monkeypatch):
    _, folder = saved_model(tmp_path, "concept")
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    ids = random_ids(1, 8)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model(ids)
    assert calls == []  # the eager path never calls SDPA
    model.set_attn_implementation("sdpa")
    model(ids)
    assert len(calls) == model.config.n_layer
    model.set_attn_implementation("eager")
    model(ids)
    assert len(calls) == model.config.n_layer and model.transformer.h[1].attn.config._attn_implementation == "eager"
    with pytest.raises((ValueError, ImportError)):  # not supported: refused at load, never silently ignored
        AutoModelForCausalLM.from_pretrained(folder, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, variant):
    import copy

    torch.manual_seed(0)
    plain = CocomixForCausalLM(tiny_config(init_std=0.2, dropout=0.1, **VARIANTS[variant])).train()
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():  # transformers 5.24 renamed it activation_checkpointing_enable (a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_enable()
    assert all(b.gradient_checkpointing for b in checkpointed.transformer.h)
    recomputed = []  # a block's first LayerNorm runs twice per step when its activations are recomputed
    checkpointed.transformer.h[-1].ln_1.register_forward_hook(lambda *_: recomputed.append(1))
    ids = random_ids(2, 16)

    def step(model):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG state it saw
        out = model(ids, labels=ids)
        loss = out.loss + (out.concept_logits.square().mean() if out.concept_logits is not None else 0)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    loss_a, grads_a = step(plain)
    loss_b, grads_b = step(checkpointed)
    assert len(recomputed) == 2
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and all(g is not None for g in grads_a.values())
    worst = max((grads_a[k] - grads_b[k]).abs().max().item() for k in grads_a)
    print(f"{variant}: loss {loss_a.item():.6f} both ways, max |grad diff| {worst:.3g}")
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-8, msg=name)
    # Inference is unaffected: no gradients, no recompute, the cache is used.
    checkpointed.eval()
    with torch.no_grad():
        out = checkpointed.generate(ids[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert out.shape == (2, 9)


# ---- CoCoMix's read-out slot -------------------------------------------------------------------


@pytest.mark.parametrize("readout", ["concept", "token"])
def test_the_lm_head_reads_the_slot_the_readout_names(readout):
    # Position t's logits come from the concept slot after token t (paper, code) or from token t's own
    # slot (the ablation). Replacing the last concept slot's vector changes the last logits only when
    # the head reads that slot: token t's slot comes before it and cannot attend to it.
    torch.manual_seed(0)
    options = {"n_concepts": 40, "k": 4, "readout": readout}
    model = CocomixForCausalLM(tiny_config(init_std=0.2, slot="concept", insert_layer=1, slot_options=options)).eval()
    ids = torch.randint(3, VOCAB, (2, 12))

    def zero_last_concept(module, args, output):
        stream, prediction = output
        stream = stream.clone()
        stream[:, -1] = 0.0  # (B, 2T, d): position 2T-1 is the concept slot of the last token
        return stream, prediction

    with torch.no_grad():
        plain = model(ids).logits
        handle = model.slot.register_forward_hook(zero_last_concept)
        changed = model(ids).logits
        handle.remove()
    assert torch.equal(plain[:, :-1], changed[:, :-1])  # earlier positions never see the last slot
    moved = (plain[:, -1] - changed[:, -1]).abs().max().item()
    assert (moved > 1e-3) if readout == "concept" else (moved == 0.0), moved


def test_token_readout_needs_interleaving():
    with pytest.raises(ValueError, match="concept readout 'token' needs mix 'interleave', got 'add'"):
        CocomixForCausalLM(tiny_config(slot="concept", insert_layer=1,
                                       slot_options={"n_concepts": 40, "k": 4, "readout": "token", "mix": "add"}))


# ---- read-out diagnostics (cocomix/diagnostics.py) against the model's own attention maps ----------


@pytest.mark.parametrize("slot, options", [("concept", {"n_concepts": 40, "k": 4}),
                                           ("concept", {"n_concepts": 40, "k": 4, "readout": "token"}),
                                           ("pause", {"readout": "pause"})])
def test_readout_diagnostics_equal_the_attention_maps_and_a_zeroed_concept_code(slot, options):
    from cocomix.diagnostics import readout_diagnostics

    torch.manual_seed(0)
    model = CocomixForCausalLM(tiny_config(init_std=0.2, n_layer=3, slot=slot, insert_layer=1,
                                           slot_options=options)).eval()
    B, T = 3, 10
    ids = torch.randint(3, VOCAB, (B, T))
    got = readout_diagnostics(model, ids)
    with torch.no_grad():
        maps = model(ids, output_attentions=True).attentions[1:]  # the eager path; above block 1
    reads_token = options.get("readout") == "token"
    rows = [2 * t if reads_token else 2 * t + 1 for t in range(T)]  # the position the LM head reads for token t
    want = torch.stack([torch.stack([m[:, :, r, 2 * t] for t, r in enumerate(rows)], -1).mean(dim=(1, 2))
                        for m in maps]).mean(0)
    assert torch.allclose(got["readout_self_attn"], want, atol=1e-6)
    assert got["readout_self_attn_uniform"].tolist() == pytest.approx([sum(1 / (r + 1) for r in rows) / T] * B)
    if slot != "concept":
        assert "loss_no_concept" not in got
        return
    # The concept code removed another way: the predictor's logits zeroed, so TopK keeps value-0 concepts.
    handle = model.slot.predictor.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
    with torch.no_grad():
        logits = model(ids).logits
    handle.remove()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="none").view(B, T - 1).mean(1)
    assert torch.allclose(got["loss_no_concept"], nll, atol=1e-5)
    with torch.no_grad():
        plain = token_nll(model(ids).logits, ids).mean(1)
    assert (got["loss_no_concept"] - plain).abs().min() > 1e-4  # the code carried something


def test_models_without_an_interleaved_slot_have_no_readout_diagnostics():
    from cocomix.diagnostics import readout_diagnostics

    ids = torch.randint(3, VOCAB, (2, 8))
    assert readout_diagnostics(CocomixForCausalLM(tiny_config()).eval(), ids) == {}
    add = tiny_config(slot="concept", insert_layer=1, slot_options={"n_concepts": 40, "k": 4, "mix": "add"})
    assert readout_diagnostics(CocomixForCausalLM(add).eval(), ids) == {}


@pytest.mark.parametrize("slot", ["none", "concept"])
def test_flops_per_token_matches_torchs_flop_counter_on_a_training_step(slot):
    """An independent count: torch.utils.flop_counter.FlopCounterMode over a real forward + backward
    (eager attention, so its bmm are counted) equals flops_per_token less the one convention it does not
    share: cocomix/flops.py charges 6 FLOPs a token to every parameter, biases and LayerNorm gains
    included (PaLM / nanoGPT), where the counter sees only matmuls. The teacher's forward, a third."""
    from torch.utils.flop_counter import FlopCounterMode

    from cocomix.flops import forward_flops_per_token

    torch.manual_seed(0)
    extra = {} if slot == "none" else CONCEPT
    model = CocomixForCausalLM(tiny_config(**extra)).train()
    model.set_attn_implementation("eager")
    ids = random_ids(2, 16)
    tokens = ids.numel()
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(ids, labels=ids)
        loss = out.loss + (out.concept_logits.square().mean() if out.concept_logits is not None else 0)
        loss.backward()
    # Biases and LayerNorm weights (the blocks above the slot's insertion run over 2 streams a token);
    # and the concept slot's k gathered compression rows, which spec 1.7 counts as a matmul and the
    # counter sees as an index.
    upper = {id(p) for b in model.transformer.h[model.config.insert_layer:] for p in b.parameters()} if model.slot else set()
    vectors = sum(p.numel() * (2 if id(p) in upper else 1) for p in model.parameters() if p.dim() == 1)
    gathered = model.slot.k * model.config.n_embd if model.slot is not None else 0
    assert counter.get_total_flops() == (model.flops_per_token(16) - 6 * vectors - 6 * gathered) * tokens
    if slot == "none":
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(ids)
        assert counter.get_total_flops() == (forward_flops_per_token(model, 16) - 2 * vectors) * tokens
