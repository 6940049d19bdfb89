"""vittle_fast.integrations.transformers: a stock HF model + apply_vittle computes what our LlavaVittle
computes (CE, KL terms, gradients), saves/loads its bottleneck, and refuses what it cannot handle."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tolerances import TOL

from vittle_fast.integrations.transformers import apply_vittle, vittle_loss, vittle_step
from vittle_fast.models import llava_from_hf, save_pretrained
from vittle_fast.models.hf import LLAVA_PREFIXES, _rename
from vittle_fast.nn import VittleConfig
from vittle_fast.train.noise import noise_offset, noise_seed

VOCAB, IMAGE_TOKEN, PATCHES = 64, 63, 4  # 28 // 14 = 2 -> 4 image tokens per image


def text_config(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaConfig(**{**fields, **overrides})


def hf_llava():
    vision = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=28, patch_size=14)
    config = transformers.LlavaConfig(text_config=text_config(), vision_config=vision, image_token_index=IMAGE_TOKEN)
    return transformers.LlavaForConditionalGeneration(config)


def llava_batch():
    """Two rows: an image early in row 0, an image late in row 1 followed by right padding; labels on
    the answers only (prompt text, image tokens and padding ignored)."""
    input_ids = torch.randint(0, IMAGE_TOKEN, (2, 14))
    input_ids[0, 2:2 + PATCHES] = IMAGE_TOKEN
    input_ids[1, 7:7 + PATCHES] = IMAGE_TOKEN
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 12:] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, 8:] = input_ids[0, 8:]
    labels[1, 11:12] = input_ids[1, 11:12]
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                pixel_values=torch.randn(2, 3, 28, 28))


def hf_to_ours(name: str) -> str:
    return _rename({"lm_head.": "language_model.lm_head."}.get(name, name), LLAVA_PREFIXES)


@pytest.mark.parametrize("prior", ["fixed", "learnable"])
@pytest.mark.parametrize("layers", [(1, 1), (0, 2)])
def test_hf_llava_with_vittle_matches_llava_vittle(tmp_path, prior, layers):
    """Same weights (the HF model saved, loaded by llava_from_hf): same CE, KL terms and gradients."""
    vittle = VittleConfig(layer_v=layers[0], layer_t=layers[1], prior=prior, beta_t=0.2)
    hf = apply_vittle(hf_llava(), vittle)
    if prior == "learnable":
        with torch.no_grad():
            for name, param in hf.vittle_bottleneck.named_parameters(recurse=False):
                param.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    ours = llava_from_hf(tmp_path)
    assert ours.bottleneck.config == vittle  # read from config.json "vittle"
    hf.model.vision_tower.requires_grad_(False)  # ours keeps CLIP frozen
    batch = llava_batch()

    hf.train(), ours.train()
    hf.vittle_state.run_seed = 7
    vittle_step(hf, 3, 0.3)
    out = hf(**batch)
    hf_loss = out.loss + vittle_loss(hf)
    hf_loss.backward()
    expected = ours(**batch, vittle_alpha=0.3, noise_seed=noise_seed(7, 3, 0), noise_offset=noise_offset(0))
    (expected.ce_sum / expected.n_targets + expected.vittle_loss).backward()

    torch.testing.assert_close(out.loss, expected.ce_sum / expected.n_targets, **TOL["float32"])
    kl = hf.vittle_state.hook.kl
    torch.testing.assert_close(kl["visual"], expected.kl_v, **TOL["float32"])
    torch.testing.assert_close(kl["text"], expected.kl_t, **TOL["float32"])
    assert expected.kl_v > 0 and expected.kl_t > 0
    ours_params = dict(ours.named_parameters())
    compared = 0
    for name, param in hf.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, ours_params[hf_to_ours(name)].grad, **TOL["float32"], msg=name)
            compared += 1
    assert compared == sum(p.requires_grad for p in ours.parameters())


def test_second_forward_of_a_step_draws_new_noise_and_eval_uses_the_mean():
    hf = apply_vittle(hf_llava(), VittleConfig(layer_v=1, layer_t=1)).train()
    batch = llava_batch()
    vittle_step(hf, 0, 0.5)
    first, second = hf(**batch).logits, hf(**batch).logits
    assert not torch.equal(first, second)  # micro-batch 0 and 1 of the step: different noise
    vittle_step(hf, 0, 0.5)
    torch.testing.assert_close(hf(**batch).logits, first, rtol=0, atol=0)  # the step's stream again
    hf.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, hf(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    hf = apply_vittle(hf_llava(), VittleConfig(layer_v=1, layer_t=2, prior="learnable")).train()
    hf.model.vision_tower.requires_grad_(False)
    batch = llava_batch()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
            enable = getattr(hf, "activation_checkpointing_enable", hf.gradient_checkpointing_enable)
            enable({"use_reentrant": use_reentrant})
            assert hf.model.language_model.layers[1].gradient_checkpointing
        hf.zero_grad()
        vittle_step(hf, 5, 0.4)
        (hf(**batch).loss + vittle_loss(hf)).backward()
        grads.append({name: p.grad.clone() for name, p in hf.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, **TOL["float32"], msg=name)


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_text_models_bottleneck_every_valid_token(family):
    """Text-only models: every token is text; alpha = 0 leaves the logits unchanged; padding is excluded."""
    config_class = getattr(transformers, family.replace("ForCausalLM", "Config"))
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    model = getattr(transformers, family)(config).train()
    input_ids = torch.randint(0, VOCAB, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 7:] = 0
    with torch.no_grad():
        plain = model(input_ids=input_ids, attention_mask=attention_mask).logits
    apply_vittle(model, VittleConfig(layer_v=0, layer_t=0, kl_text_tokens="all"))
    vittle_step(model, 0, 0.0)
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(out.logits, plain, **TOL["float32"])
    kl = dict(model.vittle_state.hook.kl)
    assert kl["visual"] == 0 and kl["text"] > 0 and vittle_loss(model).ndim == 0
    input_ids[0, 7:] = (input_ids[0, 7:] + 1) % VOCAB  # other padding ids: the valid tokens' KL is unchanged
    model(input_ids=input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(model.vittle_state.hook.kl["text"], kl["text"], rtol=0, atol=0)
    attention_mask[0, 7:] = 1  # counted when not padding
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert model.vittle_state.hook.kl["text"] != kl["text"]


def test_bottleneck_round_trip_and_other_layouts(tmp_path):
    vittle = VittleConfig(layer_v=1, layer_t=1, prior="learnable")
    hf = apply_vittle(hf_llava(), vittle)
    with torch.no_grad():
        hf.vittle_bottleneck.prior_mu_t.normal_()
    hf.save_pretrained(tmp_path / "hf")
    reloaded = apply_vittle(transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf"), vittle)
    for name, tensor in hf.vittle_bottleneck.state_dict().items():
        torch.testing.assert_close(reloaded.vittle_bottleneck.state_dict()[name], tensor, rtol=0, atol=0)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vittle"]["prior"] == "learnable"

    ours = llava_from_hf(tmp_path / "hf")  # our export's bottleneck.* layout, read back by apply_vittle
    save_pretrained(ours, tmp_path / "ours")
    assert "drops the bottleneck.* tensors" in (tmp_path / "ours" / "README.md").read_text()
    assert "apply_vittle" in json.loads((tmp_path / "ours" / "config.json").read_text())["vittle_note"]
    from_ours = apply_vittle(transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ours"), vittle)
    torch.testing.assert_close(from_ours.vittle_bottleneck.mlp_t[2].weight, hf.vittle_bottleneck.mlp_t[2].weight,
                               rtol=0, atol=0)

    released = tmp_path / "released"  # the released code's names and [1, 1, d] priors
    released.mkdir()
    tensors = {f"model.bottleneck_layer_{m}.{k}": v for m in "vt"
               for k, v in getattr(hf.vittle_bottleneck, f"mlp_{m}").state_dict().items()}
    tensors.update({f"model.learnable_prior.{key}_{m}": getattr(hf.vittle_bottleneck, f"prior_{name}_{m}")
                    .detach().view(1, 1, -1) for m in "vt" for key, name in (("mean", "mu"), ("logsigma_sq", "logvar"))})
    tensors["model.embed_tokens.weight"] = torch.zeros(VOCAB, 32)
    save_file(tensors, released / "model.safetensors")
    model = hf_llava()
    model.name_or_path = str(released)  # as from_pretrained(released) sets it
    apply_vittle(model, vittle)
    torch.testing.assert_close(model.vittle_bottleneck.prior_mu_t, hf.vittle_bottleneck.prior_mu_t, rtol=0, atol=0)


def test_fresh_bottleneck_when_the_checkpoint_has_none(tmp_path):
    hf_llava().save_pretrained(tmp_path)
    model = apply_vittle(transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path),
                         VittleConfig(layer_v=0, layer_t=0, prior="learnable"))
    assert not model.vittle_bottleneck.prior_mu_v.any()
    assert model.vittle_bottleneck.mlp_v[0].weight.std() > 0


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="supports.*get_decoder"):
        apply_vittle(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)), VittleConfig(0, 0))
    with pytest.raises(ValueError, match="layer_t=3 but the decoder has 3 layers"):
        apply_vittle(hf_llava(), VittleConfig(layer_v=0, layer_t=3))
    with pytest.raises(ValueError, match="routing='exact' only"):
        apply_vittle(hf_llava(), VittleConfig(layer_v=0, layer_t=0, routing="positional"))
    model = apply_vittle(hf_llava(), VittleConfig(layer_v=0, layer_t=0))
    with pytest.raises(ValueError, match="already applied"):
        apply_vittle(model, VittleConfig(layer_v=0, layer_t=0))
    with pytest.raises(ValueError, match="alpha must be in"):
        vittle_step(model, 0, 1.5)
    with pytest.raises(ValueError, match="no Vittle bottleneck"):
        vittle_loss(hf_llava())
    with pytest.raises(RuntimeError, match="call the model itself"):
        model.model.language_model(input_ids=torch.randint(0, IMAGE_TOKEN, (1, 5)))


@pytest.mark.slow  # ~60 s: Dynamo traces the HF LLaVA frame by frame
def test_compiled_hf_model_does_not_recompile_as_alpha_and_noise_change():
    """The hooks' per-step Python scalars (alpha, seed, micro-batch) stay out of the compiled graphs: after
    two warm-up steps (HF's generic wrappers compile once per calling frame), steps with a new alpha and
    new noise streams compile nothing."""
    from torch._dynamo.testing import CompileCounter

    model = apply_vittle(hf_llava(), VittleConfig(layer_v=1, layer_t=1, prior="learnable")).train()
    eager = apply_vittle(hf_llava(), VittleConfig(layer_v=1, layer_t=1, prior="learnable")).train()
    eager.load_state_dict(model.state_dict())
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    batch = {**llava_batch(), "use_cache": False}
    frames = []
    for step in range(5):
        losses = []
        for net, run in ((model, compiled), (eager, eager)):
            vittle_step(net, step, 0.1 * step)
            losses.append(run(**batch).loss + vittle_loss(net))
        torch.testing.assert_close(losses[0], losses[1], **TOL["float32"])
        losses[0].backward()
        frames.append(counter.frame_count)
    assert frames[1] > 0 and frames[-1] == frames[1], frames


@pytest.mark.slow  # ~60 s: two torchrun processes
def test_fsdp2_fully_shard_trains_on_two_gloo_processes():
    """Sharded gradients equal the unsharded model's (rank-averaged) every step; the loss falls."""
    worker = Path(__file__).with_name("fsdp_hf_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(losses) == 4 and losses[2] < losses[0] and losses[3] < losses[1], losses  # two batches, alternating


def test_trainer_callback_schedule_noise_loss_scaling_and_logs():
    """The callback's hooks called as transformers.Trainer calls them (no Trainer run: that is the slow
    example test): alpha from the schedule, the step and seed drive the noise, the KL term joins out.loss
    scaled like the Trainer's CE (num_items_in_batch: divided by accumulation steps x ranks), KL in the logs."""
    from types import SimpleNamespace

    from vittle_fast.integrations.transformers import VittleTrainerCallback
    from vittle_fast.train.schedules import vittle_alpha

    model = apply_vittle(hf_llava(), VittleConfig(layer_v=1, layer_t=1)).train()
    callback = VittleTrainerCallback(kind="sigmoid")
    args = SimpleNamespace(seed=3, gradient_accumulation_steps=2, world_size=1, average_tokens_across_devices=True)
    state = SimpleNamespace(global_step=5, max_steps=10, log_history=[{"loss": 1.0, "step": 5}])
    callback.on_train_begin(args, state, None, model=model)
    callback.on_step_begin(args, state, None, model=model)
    assert model.vittle_state.alpha == vittle_alpha(5, 10, kind="sigmoid") and model.vittle_state.step == 5
    batch = llava_batch()
    n_targets = (batch["labels"][:, 1:] != -100).sum()
    with_kl = model(**batch, num_items_in_batch=n_targets).loss
    kl_term = vittle_loss(model)
    model.vittle_state.trainer_kl_scale = None  # the same micro-batch without the callback's addition
    vittle_step(model, 5, model.vittle_state.alpha)
    plain = model(**batch, num_items_in_batch=n_targets).loss
    torch.testing.assert_close(with_kl, plain + kl_term / 2, **TOL["float32"])
    assert model.vittle_state.run_seed == 3
    logs = {"loss": 1.0}
    callback.on_log(args, state, None, logs=logs, model=model)
    kl = model.vittle_state.hook.kl
    torch.testing.assert_close(torch.tensor(logs["kl_v"]), kl["visual"], **TOL["float32"])  # 2 forwards, same KL
    assert state.log_history[-1]["kl_t"] == logs["kl_t"] and logs["alpha"] == callback.alpha
    callback.on_train_end(args, state, None, model=model)
    assert model.vittle_state.alpha == 0.5 and model.vittle_state.trainer_kl_scale is None


@pytest.mark.slow  # minutes on 2 busy cores: 20 Trainer steps, then 20 compiled steps
@pytest.mark.parametrize("script,extra", [("hf_trainer_llava.py", []),
                                          ("compile_loop_llava.py", ["--backend", "aot_eager"])])
def test_examples_run_and_the_loss_falls(tmp_path, script, extra):
    """Both README examples as documented (the compiled loop with a cheaper backend: inductor's C++
    compilation alone takes minutes here); each asserts its own loss fell."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "examples" / script), "--out", str(tmp_path), *extra],
                            cwd=root, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "loss (CE + KL): first" in result.stdout


def test_noise_is_rank_aware(monkeypatch):
    """Rank r draws at offset noise_offset(r) = r << 44: another rank, other noise for the same batch."""
    import vittle_fast.integrations.transformers as integration

    model = apply_vittle(hf_llava(), VittleConfig(layer_v=1, layer_t=1)).train()
    batch = llava_batch()
    logits = {}
    for rank in (0, 1):
        monkeypatch.setattr(integration.dist, "is_initialized", lambda: True)
        monkeypatch.setattr(integration.dist, "get_rank", lambda rank=rank: rank)
        vittle_step(model, 2, 0.5)
        logits[rank] = model(**batch).logits
        assert model.vittle_state.noise["noise_offset"] == noise_offset(rank)
    assert not torch.equal(logits[0], logits[1])
