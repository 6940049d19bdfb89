"""LLaVA assembly: parity with transformers' LlavaForConditionalGeneration, exact modality routing of the
Vittle bottleneck (checked against the reference math with boolean masks), losses, generation, errors."""
import pytest
import torch
import torch.nn.functional as F
import transformers
from tolerances import TOL

from vittle_fast.models import LlavaVittle, llava_from_hf
from vittle_fast.nn import VittleConfig
from vittle_fast.ops import available_backends
from vittle_fast.ops.philox import normal_noise
from vittle_fast.ops.reference import vib_sample_kl_reference

VOCAB, IMAGE_TOKEN, TOKENS_PER_IMAGE, D = 64, 63, 4, 32
SEED, OFFSET, ALPHA = 99, 1 << 44, 0.3


def text_config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2)


def vision_config():
    return transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=28, patch_size=14)


def make_batch():
    """Two rows; the <image> (4 tokens) sits after a 3- and a 2-token prefix; row 0 is right-padded."""
    torch.manual_seed(1)
    input_ids = torch.randint(0, IMAGE_TOKEN, (2, 14))
    input_ids[0, 3:7] = IMAGE_TOKEN
    input_ids[1, 2:6] = IMAGE_TOKEN
    attention_mask = torch.ones(2, 14, dtype=torch.bool)
    attention_mask[0, 12:] = False
    labels = input_ids.clone()
    labels[0, :9] = -100  # prompt: prefix, image, some text
    labels[1, :8] = -100
    labels[~attention_mask] = -100
    return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                position_ids=torch.arange(14).expand(2, 14), pixel_values=torch.randn(2, 3, 28, 28))


def reference_forward(model, batch, training):
    """The method with boolean masks: splice features, bottleneck the tokens of each modality after
    its layer (visual call at offset + 0 << 38, text call at offset + 1 << 38), masked KL means."""
    lm, bottleneck = model.language_model, model.bottleneck
    ids, valid, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    is_visual = ids == IMAGE_TOKEN
    embeds = lm.embed_tokens(ids.masked_fill(is_visual, 0))
    with torch.no_grad():
        patches = model.vision_tower(batch["pixel_values"], -2)
    embeds[is_visual] = model.projector(patches).reshape(-1, D)
    modality_masks = {"visual": is_visual, "text": ~is_visual}
    kl_selected = {"visual": is_visual & valid, "text": ~is_visual & valid}
    if bottleneck.config.kl_text_tokens == "prompt":
        kl_selected["text"] &= labels == -100
    kl = {}

    def hook(layer_index, hidden, first_position):
        flat = hidden.reshape(-1, D).clone()
        for call_index, modality in enumerate(("visual", "text")):
            if bottleneck.config.layer_of(modality) != layer_index:
                continue
            mask = modality_masks[modality].flatten()
            tokens = flat[mask]
            noise = normal_noise(SEED, OFFSET + (call_index << 38), len(tokens), D) if training else None
            prior_mu, prior_logvar = bottleneck.prior(modality)
            z_hat, kl_tokens = vib_sample_kl_reference(
                tokens, bottleneck.mlp(modality)(tokens), ALPHA, noise, prior_mu, prior_logvar,
                bottleneck.config.logvar_clamp, bottleneck.config.kl_form, training)
            flat[mask] = z_hat
            kl[modality] = kl_tokens[kl_selected[modality].flatten()[mask]].mean()
        return flat.view_as(hidden)

    hidden = lm.hidden_states(inputs_embeds=embeds, attention_mask=valid, position_ids=batch["position_ids"],
                              after_layer=hook)
    logits = lm.lm_head(hidden)
    ce_sum = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
    return logits, ce_sum, kl


ROUTING_CASES = [  # (layer_v, layer_t, kl_text_tokens, prior, training, backend)
    *[(1, 1, "prompt", "fixed", True, backend) for backend in available_backends()],
    (0, 2, "prompt", "learnable", True, "reference"),
    (2, 0, "all", "fixed", True, "reference"),
    (0, 2, "all", "learnable", False, "reference"),
]


@pytest.mark.parametrize("layer_v,layer_t,kl_text_tokens,prior,training,backend", ROUTING_CASES)
def test_bottleneck_routing_matches_reference(layer_v, layer_t, kl_text_tokens, prior, training, backend):
    vittle = VittleConfig(layer_v=layer_v, layer_t=layer_t, beta_v=0.2, beta_t=0.05, prior=prior,
                          kl_text_tokens=kl_text_tokens, backend=backend)
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, vittle).train(training)
    if prior == "learnable":
        with torch.no_grad():
            for param in model.bottleneck.parameters(recurse=False):
                param.normal_(0.0, 0.3)
    batch = make_batch()
    out = model(**batch, vittle_alpha=ALPHA, noise_seed=SEED, noise_offset=OFFSET)
    logits, ce_sum, kl = reference_forward(model, batch, training)
    valid = batch["attention_mask"]
    torch.testing.assert_close(out.logits[valid], logits[valid], **TOL["float32"])
    torch.testing.assert_close(out.ce_sum, ce_sum, **TOL["float32"])
    torch.testing.assert_close(out.kl_v, kl["visual"], **TOL["float32"])
    torch.testing.assert_close(out.kl_t, kl["text"], **TOL["float32"])
    torch.testing.assert_close(out.vittle_loss, 0.2 * kl["visual"] + 0.05 * kl["text"], **TOL["float32"])
    assert out.n_targets.dtype == torch.int64
    assert out.n_targets.item() == (batch["labels"][:, 1:] != -100).sum().item()


def test_logits_match_transformers_llava(tmp_path):
    config = transformers.LlavaConfig(text_config=text_config(), vision_config=vision_config(),
                                      image_token_index=IMAGE_TOKEN, image_seq_length=TOKENS_PER_IMAGE)
    hf = transformers.LlavaForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    ours = llava_from_hf(tmp_path).eval()
    assert ours.bottleneck is None
    batch = make_batch()
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                      attention_mask=batch["attention_mask"].long()).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    valid = batch["attention_mask"]
    torch.testing.assert_close(got[valid], expected[valid], **TOL["float32"])


def test_batch_without_images_gives_zero_gradients():
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=1, layer_t=1)).train()
    input_ids = torch.randint(0, IMAGE_TOKEN, (2, 8))
    out = model(input_ids, labels=input_ids, pixel_values=torch.zeros(0, 3, 28, 28),
                vittle_alpha=ALPHA, noise_seed=SEED)
    assert out.kl_v.item() == 0.0
    (out.ce_sum + out.vittle_loss).backward()
    for module in (model.bottleneck.mlp_v, model.projector):
        for name, param in module.named_parameters():
            assert param.grad is not None and not param.grad.any(), name
    assert any(p.grad.any() for p in model.bottleneck.mlp_t.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())  # frozen


def test_empty_micro_batch_gives_zero_losses_and_zero_gradients():
    """A micro-batch whose records were all skipped has zero rows; every rank must still run the
    step (FSDP's collectives), so it must produce zero losses and a zero gradient everywhere."""
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=1, layer_t=1)).train()
    empty = torch.zeros(0, 0, dtype=torch.int64)
    out = model(empty, labels=empty, attention_mask=empty.bool(), position_ids=empty,
                pixel_values=torch.zeros(0, 3, 28, 28), vittle_alpha=ALPHA, noise_seed=SEED)
    assert out.n_targets.item() == 0 and out.ce_sum.item() == 0.0 and out.vittle_loss.item() == 0.0
    (out.ce_sum + out.vittle_loss).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and not param.grad.any(), name


def test_packed_sequence_boundary_is_not_a_target():
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN)
    input_ids = torch.randint(0, IMAGE_TOKEN, (1, 10))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    out = model(input_ids, labels=input_ids, position_ids=position_ids)
    assert out.n_targets.item() == 8  # 9 shifted labels minus the one at the second sequence's start
    targets = input_ids[:, 1:].clone()
    targets[0, 4] = -100
    torch.testing.assert_close(out.ce_sum, F.cross_entropy(out.logits[0, :-1], targets[0], reduction="sum"),
                               **TOL["float32"])


def test_kv_cache_generation_equals_no_cache_with_bottleneck():
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=0, layer_t=1)).eval()
    batch = make_batch()
    input_ids = batch["input_ids"][:, :10]  # equal-length prompts, both images included
    cached, uncached = (model.generate(input_ids, batch["pixel_values"], max_new_tokens=6, use_cache=use_cache)
                        for use_cache in (True, False))
    assert torch.equal(cached, uncached)


def test_eval_mode_uses_posterior_mean():
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=1, layer_t=1)).eval()
    batch = make_batch()
    first = model(**batch, vittle_alpha=ALPHA, noise_seed=1).logits
    second = model(**batch, vittle_alpha=ALPHA, noise_seed=2).logits  # a different seed changes nothing
    assert torch.equal(first, second)


def test_alpha_defaults_to_the_configs_trained_value(tmp_path):
    """forward and generate without ``vittle_alpha`` use ``VittleConfig.alpha`` (the final training
    alpha, kept by save/load) -- not 0, which silently switched the bottleneck off at evaluation."""
    from vittle_fast.models import save_pretrained

    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN,
                        VittleConfig(layer_v=1, layer_t=1, alpha=ALPHA)).eval()
    batch = make_batch()
    assert torch.equal(model(**batch).logits, model(**batch, vittle_alpha=ALPHA).logits)
    assert not torch.equal(model(**batch).logits, model(**batch, vittle_alpha=0.0).logits)
    prompt = batch["input_ids"][:, :8]
    assert torch.equal(model.generate(prompt, batch["pixel_values"], max_new_tokens=3),
                       model.generate(prompt, batch["pixel_values"], max_new_tokens=3, vittle_alpha=ALPHA))
    save_pretrained(model, tmp_path)
    assert llava_from_hf(tmp_path).bottleneck.config.alpha == ALPHA
    with pytest.raises(ValueError, match="alpha"):
        VittleConfig(layer_v=0, layer_t=0, alpha=1.5)


def test_packed_training_forward_runs_no_host_sync(monkeypatch):
    """The trainer's forward + backward (validate_inputs off, the collator's attention metadata) on the
    flash-attn varlen path (a CPU stand-in kernel): no nonzero, no scalar read anywhere in the model."""
    import vittle_fast.models.llama as llama_module
    from test_llama import SyncCounter, varlen_standin

    from vittle_fast.data.collate import varlen_metadata

    monkeypatch.setattr(llama_module, "select_flash_varlen", lambda device: varlen_standin())
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=0, layer_t=2)).train()
    model.validate_inputs = False
    batch = make_batch()
    cu_seqlens, max_seqlen = varlen_metadata([[12], [14]], 14)
    with SyncCounter() as counter:
        out = model(**batch, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, vittle_alpha=ALPHA, noise_seed=SEED)
        (out.ce_sum + out.vittle_loss).backward()
    assert counter.syncs == []


def released_positional_forward(model, batch):
    """Eval-mode logits and KL means the released code's way (vittle_llama.py): ``image_seq_len =
    L - text_tok_length`` with text_tok_length the length before each <image> placeholder was expanded
    into P tokens; ``hidden[:, :image_seq_len]`` goes through the visual bottleneck, the rest through
    the text one; the text KL masks ``(labels == IGNORE) & attention_mask`` of the text part."""
    lm, bottleneck, alpha = model.language_model, model.bottleneck, ALPHA
    ids = batch["input_ids"]
    n_images = batch["pixel_values"].shape[0] // ids.shape[0]  # the same in every row of this batch
    text_tok_length = ids.shape[1] - n_images * (TOKENS_PER_IMAGE - 1)
    image_seq_len = ids.shape[1] - text_tok_length
    embeds, _, _ = model.embed(ids, batch["pixel_values"])
    prompt = (batch["labels"] == -100) & batch["attention_mask"]
    kl = {}

    def bottleneck_part(part, modality, kl_mask):
        stats = bottleneck.mlp(modality)(part)
        prior_mu, prior_logvar = bottleneck.prior(modality)
        z_hat, kl_tokens = vib_sample_kl_reference(part.reshape(-1, D), stats.reshape(-1, 2 * D), alpha, None,
                                                   prior_mu, prior_logvar, bottleneck.config.logvar_clamp,
                                                   bottleneck.config.kl_form, False)
        kl[modality] = kl_tokens[kl_mask.flatten()].mean()
        return z_hat.view_as(part)

    def hook(layer_index, hidden, first_position):
        visual, text = hidden[:, :image_seq_len], hidden[:, image_seq_len:]
        if layer_index == bottleneck.config.layer_v:
            visual = bottleneck_part(visual, "visual", torch.ones(visual.shape[:2], dtype=torch.bool))
        if layer_index == bottleneck.config.layer_t:
            text = bottleneck_part(text, "text", prompt[:, image_seq_len:])
        return torch.cat((visual, text), dim=1)

    hidden = lm.hidden_states(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], after_layer=hook)
    return lm.lm_head(hidden), kl


def test_positional_routing_is_the_released_split():
    """A batch where the two routings differ: a system prompt before the image. Exact routing sends
    the 4 image tokens to the visual bottleneck; positional sends the first 4 - 1 = 3 tokens (the
    prompt prefix of row 0, prefix + one image token of row 1) and everything after to the text one."""
    torch.manual_seed(0)
    batch = make_batch()
    logits = {}
    for routing in ("exact", "positional"):
        torch.manual_seed(5)
        vittle = VittleConfig(layer_v=0, layer_t=1, prior="learnable", routing=routing)
        model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, vittle).eval()
        with torch.no_grad():
            for param in model.bottleneck.parameters(recurse=False):
                param.normal_(0.0, 0.3)
            out = model(**batch, vittle_alpha=ALPHA)
        logits[routing] = out.logits
    expected, kl = released_positional_forward(model, batch)
    torch.testing.assert_close(out.logits, expected, **TOL["float32"])
    torch.testing.assert_close(out.kl_v, kl["visual"], **TOL["fp32_sum"])
    torch.testing.assert_close(out.kl_t, kl["text"], **TOL["fp32_sum"])
    assert not torch.allclose(logits["exact"], logits["positional"])
    with pytest.raises(ValueError, match="routing"):
        VittleConfig(layer_v=0, layer_t=0, routing="by_position")


@pytest.mark.slow  # ~1 min on 2 cores: two compilations of the whole model
def test_compiled_forward_with_moving_alpha_and_noise():
    """torch.compile(fullgraph=True) of LlavaVittle.forward as a trainer calls it (validate_inputs off),
    alpha/seed/offset changing every call: at most 2 compiles (1 with tensor scalars); loss and
    gradients bitwise equal to eager."""
    from test_bottleneck import check_compiled_with_moving_scalars

    torch.manual_seed(0)
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=1, layer_t=1)).train()
    model.validate_inputs = False
    batch = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(alpha, seed, offset):
        out = model(**batch, vittle_alpha=alpha, noise_seed=seed, noise_offset=offset)
        return out.ce_sum + out.vittle_loss

    def loss_and_grads(fn, scalars):
        loss = fn(*scalars)
        return [loss.detach(), *torch.autograd.grad(loss, params)]

    check_compiled_with_moving_scalars(loss_fn, loss_and_grads)


def test_image_token_count_mismatch_raises():
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN)
    batch = make_batch()
    with pytest.raises(ValueError, match=r"8 image tokens .* 1 image\(s\) x 4 tokens = 4"):
        model(batch["input_ids"], pixel_values=batch["pixel_values"][:1])
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(batch["input_ids"], labels=batch["labels"][:, :5], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="vittle.layer_t=3"):
        LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, VittleConfig(layer_v=0, layer_t=3))


def test_bfloat16_forward_backward_tracks_float32():
    """The dtype the trainer runs in: outputs stay finite and near the fp32 model's."""
    vittle = VittleConfig(layer_v=1, layer_t=1, prior="learnable")
    model = LlavaVittle(text_config(), vision_config(), IMAGE_TOKEN, vittle).eval()
    batch = make_batch()
    reference = model(**batch, vittle_alpha=ALPHA)
    model.to(torch.bfloat16)
    out = model(**batch, vittle_alpha=ALPHA)
    assert out.logits.dtype == torch.bfloat16 and out.ce_sum.dtype == torch.float32
    torch.testing.assert_close(out.ce_sum, reference.ce_sum, **TOL["bf16_model_loss"])
    torch.testing.assert_close(out.vittle_loss, reference.vittle_loss, **TOL["bf16_model_loss"])
    (out.ce_sum + out.vittle_loss).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.bottleneck.parameters())
