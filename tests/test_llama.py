"""Slim Llama vs Hugging Face transformers, packed attention, KV-cache generation, RMSNorm dispatch."""
import pytest
import torch
import transformers
from tolerances import TOL
from torch.utils._python_dispatch import TorchDispatchMode

import vittle_fast.models.llama as llama_module
from vittle_fast.data.collate import varlen_metadata
from vittle_fast.models import Llama, llama_from_hf
from vittle_fast.models.llama import (
    rms_norm_torch,
    rope_inverse_frequencies,
    segment_ids_from,
    segment_ids_from_varlen,
    select_rms_norm_kernel,
    varlen_from_segment_ids,
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


def varlen_standin(calls=None):
    """A stand-in for ``flash_attn_varlen_func`` on the CPU: SDPA over the flat tokens with the block
    mask of ``cu_seqlens``. With ``calls`` (a list) it checks the argument layout flash-attn expects
    and records each call (which reads the metadata on the host: not for the sync count)."""
    def standin(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        assert q.ndim == k.ndim == 3 and q.shape[0] == k.shape[0]  # flat [tokens, heads, head_dim]
        assert cu_q.dtype == torch.int32 and cu_q is cu_k and causal and type(max_q) is int and max_q == max_k
        if calls is not None:
            assert q.shape[0] == int(cu_q[-1]) and max_q == int(cu_q.diff().max())
            calls.append((cu_q.tolist(), max_q))
        segments = segment_ids_from_varlen(cu_q, (1, q.shape[0]))
        mask = segments[0, :, None] == segments[0, None, :]
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask.tril(), scale=softmax_scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    return standin


def test_varlen_derivation_from_position_ids():
    """Callers without metadata: segments from position_ids/attention_mask; padding runs are segments."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    attention_mask = torch.ones(2, 9, dtype=torch.bool)
    attention_mask[1, 6:] = False
    segments = segment_ids_from(position_ids, attention_mask, (2, 9), torch.device("cpu"))
    cu_seqlens, max_seqlen = varlen_from_segment_ids(segments, (2, 9), torch.device("cpu"))
    assert cu_seqlens.tolist() == [0, 3, 7, 9, 15, 18] and cu_seqlens.dtype == torch.int32 and max_seqlen == 6
    assert varlen_from_segment_ids(None, (2, 9), torch.device("cpu"))[0].tolist() == [0, 9, 18]
    assert segment_ids_from_varlen(cu_seqlens, (2, 9)).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2],
                                                                    [3, 3, 3, 3, 3, 3, 4, 4, 4]]


def packed_batch():
    """Row 0 packs sequences of 5 and 3 tokens + 2 padding; row 1 holds 6 tokens + 4 padding."""
    lengths = [[5, 3], [6]]
    sequences = [torch.randint(0, VOCAB, (1, n)) for row in lengths for n in row]
    input_ids = torch.zeros(2, 10, dtype=torch.int64)
    input_ids[0, :8] = torch.cat(sequences[:2], dim=1)
    input_ids[1, :6] = sequences[2]
    attention_mask = input_ids.new_zeros(2, 10, dtype=torch.bool)
    attention_mask[0, :8] = attention_mask[1, :6] = True
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4], list(range(10))])
    cu_seqlens, max_seqlen = varlen_metadata(lengths, 10)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                 cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return batch, sequences, [(0, 0, 5), (0, 5, 8), (1, 0, 6)]


@pytest.mark.parametrize("path", ["sdpa", "flash_varlen"])
def test_packed_metadata_path_equals_separate_sequences(monkeypatch, path):
    torch.manual_seed(0)
    model = Llama(tiny_config()).eval()
    calls = []
    if path == "flash_varlen":
        monkeypatch.setattr(llama_module, "select_flash_varlen", lambda device: varlen_standin(calls))
    batch, sequences, spans = packed_batch()
    with torch.no_grad():
        logits = model(**batch)
        derived = model(**{k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")})
        for sequence, (row, start, end) in zip(sequences, spans):
            alone = model(sequence)[0]
            torch.testing.assert_close(logits[row, start:end], alone, **TOL["float32"])
            torch.testing.assert_close(derived[row, start:end], alone, **TOL["float32"])
    if path == "flash_varlen":  # the collator's metadata reaches the kernel as is, in every layer
        assert calls[:2] == [([0, 5, 8, 10, 16, 20], 6)] * 2


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read a device value on the host (or need its size): the syncs."""

    SYNCS = {"aten::nonzero", "aten::_local_scalar_dense", "aten::unique_consecutive", "aten::unique_dim",
             "aten::masked_select", "aten::item"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCS:
            self.syncs.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["sdpa", "flash_varlen"])
def test_packed_forward_runs_no_host_sync(monkeypatch, path):
    """Forward + backward of a packed micro-batch with the collator's metadata: no nonzero, no
    scalar reads. Without metadata the flash-attn path derives it once per forward, not per layer."""
    if path == "flash_varlen":
        monkeypatch.setattr(llama_module, "select_flash_varlen", lambda device: varlen_standin())
    model = Llama(tiny_config(num_hidden_layers=3))
    batch, _, _ = packed_batch()
    with SyncCounter() as counter:
        model(**batch).sum().backward()
    assert counter.syncs == []
    if path == "flash_varlen":
        with SyncCounter() as counter:
            model(**{k: v for k, v in batch.items() if k not in ("cu_seqlens", "max_seqlen")})
        assert counter.syncs == ["aten::nonzero", "aten::_local_scalar_dense"]  # once for 3 layers


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
