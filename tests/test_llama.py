"""Slim Llama vs Hugging Face transformers, packed attention, KV-cache generation, RMSNorm dispatch."""
import pytest
import torch
import transformers
from tolerances import TOL

from vittle_fast.models import Llama, llama_from_hf
from vittle_fast.models.llama import (
    _flash_varlen_attention,
    causal_attention,
    rms_norm_torch,
    rope_inverse_frequencies,
    segment_ids_from,
    select_rms_norm_kernel,
)

VOCAB = 64
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
CONFIGS = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "gqa_llama3_rope": dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "mqa_linear_rope_tied": dict(num_key_value_heads=1, tie_word_embeddings=True,
                                 rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
}


def tiny_config(**overrides) -> transformers.LlamaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaConfig(**{**fields, **overrides})


def hf_and_ours(tmp_path, **overrides):
    """A random HF Llama, saved with save_pretrained and loaded back with our llama_from_hf."""
    hf = transformers.LlamaForCausalLM(tiny_config(**overrides)).eval()
    hf.save_pretrained(tmp_path)
    return hf, llama_from_hf(tmp_path).eval()


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf, ours = hf_and_ours(tmp_path, **CONFIGS[name])
    input_ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), hf(input_ids).logits, **TOL["float32"])


def test_llama3_rope_scaling_changes_frequencies():
    """Guards the scaled-RoPE parity test: the tiny config really hits all three frequency bands."""
    plain = rope_inverse_frequencies(8, 100.0, None)
    scaled = rope_inverse_frequencies(8, 100.0, LLAMA3_ROPE)
    assert scaled[0] == plain[0]  # high frequency: kept
    assert torch.isclose(scaled[-1], plain[-1] / 8)  # low frequency: divided by the factor
    assert plain[1] / 8 < scaled[1] < plain[1]  # medium: blended


def test_padded_batch_matches_transformers(tmp_path):
    hf, ours = hf_and_ours(tmp_path)
    input_ids = torch.randint(0, VOCAB, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.bool)
    attention_mask[1, 8:] = False  # right padding
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=attention_mask.long()).logits
        got = ours(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(got[attention_mask], expected[attention_mask], **TOL["float32"])


def test_packed_sequences_equal_separate_runs():
    model = Llama(tiny_config()).eval()
    lengths = [5, 7, 4]
    sequences = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    packed = torch.cat(sequences, dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=position_ids).split(lengths, dim=1)
        for sequence, logits in zip(sequences, packed_logits):
            torch.testing.assert_close(logits, model(sequence), **TOL["float32"])


def test_flash_varlen_plumbing_matches_sdpa_mask():
    """The flash-attn path's unpad/cu_seqlens/scatter logic, with SDPA standing in for the kernel."""
    calls = []

    def varlen_standin(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        calls.append(cu_q.tolist())
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            segment = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                *segment, is_causal=causal, scale=softmax_scale, enable_gqa=True)[0].transpose(0, 1)
        return out

    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    attention_mask = torch.ones(2, 9, dtype=torch.bool)
    attention_mask[1, 6:] = False
    segments = segment_ids_from(position_ids, attention_mask, (2, 9), q.device)
    got = _flash_varlen_attention(q, k, v, segments, 8 ** -0.5, varlen_standin)
    expected = causal_attention(q, k, v, segments, flash_varlen=None)
    assert calls == [[0, 3, 7, 9, 15]]
    valid = attention_mask
    torch.testing.assert_close(got[valid], expected[valid], **TOL["float32"])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kv_cache_generation_equals_no_cache(temperature):
    model = Llama(tiny_config()).eval()
    prompt = torch.randint(0, VOCAB, (2, 6))
    outputs = [
        model.generate(prompt, max_new_tokens=10, temperature=temperature, use_cache=use_cache,
                       generator=torch.Generator().manual_seed(7))
        for use_cache in (True, False)
    ]
    assert torch.equal(outputs[0], outputs[1])


def test_greedy_generation_matches_transformers(tmp_path):
    hf, ours = hf_and_ours(tmp_path)
    prompt = torch.randint(0, VOCAB, (2, 6))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[:, 6:]
    assert torch.equal(ours.generate(prompt, max_new_tokens=8), expected)


def test_eos_rows_keep_emitting_eos():
    model = Llama(tiny_config()).eval()
    prompt = torch.randint(0, VOCAB, (1, 4))
    first = model.generate(prompt, max_new_tokens=1)[0, 0]
    out = model.generate(prompt, max_new_tokens=5, eos_token_id=int(first))
    assert torch.equal(out, torch.full((1, 5), int(first)))


def test_rms_norm_dispatch_seam():
    def fake_apex(*args):
        raise AssertionError("apex kernel must not run on CPU tensors")

    assert select_rms_norm_kernel(fake_apex, torch.device("cuda")) is fake_apex  # apex present, GPU
    assert select_rms_norm_kernel(None, torch.device("cuda")) is None  # apex absent: torch
    assert select_rms_norm_kernel(fake_apex, torch.device("cpu")) is None  # CPU tensors: torch
    from vittle_fast.models.llama import RMSNorm

    norm = RMSNorm(16, 1e-6, apex_kernel=fake_apex)
    x = torch.randn(3, 16)
    torch.testing.assert_close(norm(x), rms_norm_torch(x, norm.weight, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(16, eps=1e-5)
    torch.nn.init.normal_(hf.weight)
    x = torch.randn(5, 16).to(dtype)
    hf = hf.to(dtype)
    torch.testing.assert_close(rms_norm_torch(x, hf.weight, 1e-5), hf(x), rtol=0, atol=0)


def test_bad_arguments_raise():
    model = Llama(tiny_config())
    ids = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        Llama(tiny_config(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)))
    with pytest.raises(ValueError, match="hidden_act"):
        Llama(tiny_config(hidden_act="gelu"))
