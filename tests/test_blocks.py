"""Building blocks of the HF NVLM-D model checked against formulas written out here.

Every expected value below is computed with explicit torch math in this file (matmuls, sums,
erf, exp): nothing calls back into the module's own helpers, so a test fails when the module's
formula is wrong, not when two copies of the same mistake agree. Each check also shows that the
plausible wrong variant (mean over the padded width, layer scale before the bias, position
embedding before the class token, ...) gives a measurably different answer, so the test is
sensitive to exactly that mistake.

Sizes come from the tiny preset: ViT width 80 = 5 real heads of 16, plus 3 zero (dummy) heads,
so the padded attention width is 128; 64x64 tiles of 8x8 patches (8x8 grid, 16 LLM tokens per
tile after the 0.5 pixel shuffle); projector 320 -> 256 -> 128.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from modeling import NVLM_D_Model, get_config
from modeling.modeling_intern_vit import (
    InternAttention,
    InternRMSNorm,
    InternVisionEmbeddings,
    InternVisionEncoderLayer,
)
from modeling.modeling_nvlm_d import pixel_shuffle

REAL_HEADS, DUMMY_HEADS, HEAD_DIM = 5, 7, 16  # 7 dummy heads, as the release
REAL = REAL_HEADS * HEAD_DIM  # 80
PADDED = (REAL_HEADS + DUMMY_HEADS) * HEAD_DIM  # 192
EPS = 1e-6


def vision_config(attn_implementation: str | None = None):
    cfg = copy.deepcopy(get_config("tiny").vision_config)
    if attn_implementation is not None:
        # PretrainedConfig._attn_implementation is a property backed by _attn_implementation_internal;
        # InternAttention reads `self.config._attn_implementation` at every call.
        cfg._attn_implementation = attn_implementation
    return cfg


def test_tiny_vision_geometry():
    cfg = vision_config()
    assert (cfg.num_attention_heads, cfg.num_dummy_heads, cfg.head_dim) == (REAL_HEADS, DUMMY_HEADS, HEAD_DIM)
    assert cfg.hidden_size == REAL and cfg.num_padded_heads * cfg.head_dim == PADDED
    assert cfg.layer_norm_eps == EPS


# ------------------------------------------------------------------------------------------
# independent reference math
# ------------------------------------------------------------------------------------------


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * weight


def softmax_ref(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def attention_ref(x, qkv_w, qn_w, kn_w, proj_w, proj_b, eps=EPS, stat_width=REAL):
    """5 real heads only. qkv rows are [Q all 8 heads; K; V], dummy heads last in each block.

    `stat_width` is the divisor of the QK-norm sum of squares: 80 (correct) or 128 (the bug).
    """
    wq, wk, wv = (qkv_w[i * PADDED : i * PADDED + REAL] for i in range(3))
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T  # [B, N, 80]
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) / stat_width + eps) * qn_w[:REAL]
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) / stat_width + eps) * kn_w[:REAL]
    b, n, _ = x.shape
    out = torch.empty(b, n, REAL, dtype=x.dtype)
    for h in range(REAL_HEADS):
        sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        p = softmax_ref(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(HEAD_DIM))
        out[..., sl] = p @ v[..., sl]
    return out @ proj_w[:, :REAL].T + proj_b


def randomize_attention(attn: InternAttention, gen: torch.Generator) -> None:
    """Random weights everywhere, dummy heads zero in qkv (Q, K and V blocks) and in proj columns."""
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.randn(attn.qkv.weight.shape, generator=gen) * 0.3)
        attn.qkv.weight.view(3, PADDED, REAL)[:, REAL:] = 0
        attn.q_norm.weight.copy_(1 + 0.5 * torch.randn(PADDED, generator=gen))
        attn.k_norm.weight.copy_(1 + 0.5 * torch.randn(PADDED, generator=gen))
        attn.proj.weight.copy_(torch.randn(attn.proj.weight.shape, generator=gen) * 0.2)
        attn.proj.weight[:, REAL:] = 0
        attn.proj.bias.copy_(torch.randn(REAL, generator=gen) * 0.5)


def attn_params64(attn: InternAttention):
    return [
        t.detach().double()
        for t in (attn.qkv.weight, attn.q_norm.weight, attn.k_norm.weight, attn.proj.weight, attn.proj.bias)
    ]


@pytest.fixture
def count_sdpa(monkeypatch):
    """Counts calls to torch's scaled_dot_product_attention (used by both towers' sdpa paths)."""
    calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


# ------------------------------------------------------------------------------------------
# 1. InternRMSNorm
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: mean(x^2) ~ eps, so eps placement matters
def test_rms_norm_float32(scale):
    gen = torch.Generator().manual_seed(1)
    norm = InternRMSNorm(REAL, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(REAL, generator=gen))
    x = torch.randn(3, 7, REAL, generator=gen) * scale
    y = norm(x)
    assert y.dtype == torch.float32
    expected = rms_norm_ref(x.double(), norm.weight.detach().double(), EPS)
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    if scale < 1:  # eps outside the sqrt would be a different formula at this scale
        x64 = x.double()
        wrong = x64 / (torch.sqrt((x64**2).mean(-1, keepdim=True)) + EPS) * norm.weight.double()
        assert (y.double() - wrong).abs().max() > 1e-2


def test_rms_norm_bfloat16_statistics_in_float32():
    """bf16 input: the module computes x * rsqrt(mean(x^2) + eps) in float32, casts the normalised
    value back to the INPUT dtype (bf16), and only then multiplies by the weight. With a bf16 weight
    the product is bf16; with a float32 weight type promotion makes the result float32 (as in
    HF's LlamaRMSNorm)."""
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 9, REAL, generator=gen) * 3).to(torch.bfloat16)
    w32 = torch.randn(REAL, generator=gen)

    x32 = x.float()
    normalised32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)

    # bf16 weight (a model cast to bf16)
    norm = InternRMSNorm(REAL, eps=EPS).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(w32.to(torch.bfloat16))
    y = norm(x)
    assert y.dtype == torch.bfloat16
    expected = normalised32.to(torch.bfloat16) * w32.to(torch.bfloat16)
    assert torch.equal(y, expected)
    # sensitivity: weight applied in float32 before the cast, or statistics taken in bf16, differ
    weight_first = (normalised32 * w32.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert not torch.equal(y, weight_first)
    stats_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w32.to(torch.bfloat16)
    assert not torch.equal(y, stats_bf16)

    # float32 weight with bf16 input: result is float32 = bf16(normalised) * w32
    norm32 = InternRMSNorm(REAL, eps=EPS)
    with torch.no_grad():
        norm32.weight.copy_(w32)
    y32 = norm32(x)
    assert y32.dtype == torch.float32
    assert torch.equal(y32, normalised32.to(torch.bfloat16).float() * w32)


# ------------------------------------------------------------------------------------------
# 2. QK-norm over the whole flattened Q/K, statistics over the real channels only
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl, sdpa_calls", [("eager", 0), ("sdpa", 1), (None, 1)])
def test_attention_matches_independent_five_head_reference(impl, sdpa_calls, count_sdpa):
    attn = InternAttention(vision_config(impl)).eval()
    assert attn.config._attn_implementation == impl
    assert attn.config._attn_implementation_internal == impl
    assert attn.qkv.weight.shape == (3 * PADDED, REAL) and attn.proj.weight.shape == (REAL, PADDED)
    assert attn.qkv.bias is None
    gen = torch.Generator().manual_seed(3)
    randomize_attention(attn, gen)
    x = torch.randn(2, 11, REAL, generator=gen)

    with torch.no_grad():
        y = attn(x)
    assert len(count_sdpa) == sdpa_calls  # the implementation switch is really honoured

    params = attn_params64(attn)
    expected = attention_ref(x.double(), *params)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)

    # the bug this guards against: mean of squares over the padded 128 channels (dummy included)
    naive = attention_ref(x.double(), *params, stat_width=PADDED)
    assert (y.double() - naive).abs().max() > 1e-2
    assert (expected - naive).abs().max() > 100 * (y.double() - expected).abs().max()


def test_attention_qk_norm_is_over_whole_vector_not_per_head():
    """Per-head RMSNorm (statistics per 16-channel head) is a different formula: check it differs."""
    attn = InternAttention(vision_config("eager")).eval()
    gen = torch.Generator().manual_seed(4)
    randomize_attention(attn, gen)
    x = torch.randn(1, 9, REAL, generator=gen)
    with torch.no_grad():
        y = attn(x).double()
    qkv_w, qn_w, kn_w, proj_w, proj_b = attn_params64(attn)
    x64 = x.double()
    wq, wk, wv = (qkv_w[i * PADDED : i * PADDED + REAL] for i in range(3))

    def per_head_norm(t, w):
        t = t.view(*t.shape[:-1], REAL_HEADS, HEAD_DIM)
        t = t / torch.sqrt((t * t).mean(-1, keepdim=True) + EPS)
        return t.reshape(*t.shape[:-2], REAL) * w[:REAL]

    q, k, v = per_head_norm(x64 @ wq.T, qn_w), per_head_norm(x64 @ wk.T, kn_w), x64 @ wv.T
    out = torch.empty_like(q)
    for h in range(REAL_HEADS):
        sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(HEAD_DIM)
        out[..., sl] = softmax_ref(scores) @ v[..., sl]
    per_head = out @ proj_w[:, :REAL].T + proj_b
    assert (y - per_head).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------
# 3. zero dummy heads contribute nothing; the test is sensitive to a non-zero one
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_dummy_heads_contribute_nothing(impl):
    attn = InternAttention(vision_config(impl)).eval()
    gen = torch.Generator().manual_seed(5)
    randomize_attention(attn, gen)
    x = torch.randn(2, 10, REAL, generator=gen)
    with torch.no_grad():
        base = attn(x)

        # arbitrary q_norm / k_norm weights at the dummy positions: output bit-identical
        attn.q_norm.weight[REAL:] = torch.randn(PADDED - REAL, generator=gen) * 7
        attn.k_norm.weight[REAL:] = torch.randn(PADDED - REAL, generator=gen) * 7 + 3
        assert torch.equal(attn(x), base)

        # dummy head 6 (channels 96:112) with V rows only, or proj columns only: still nothing
        head = slice(REAL + HEAD_DIM, REAL + 2 * HEAD_DIM)
        v_rows = attn.qkv.weight.view(3, PADDED, REAL)[2, head]
        v_rows.copy_(torch.randn(v_rows.shape, generator=gen))
        torch.testing.assert_close(attn(x), base, rtol=0, atol=1e-6)
        v_rows.zero_()
        attn.proj.weight[:, head] = torch.randn(REAL, HEAD_DIM, generator=gen)
        torch.testing.assert_close(attn(x), base, rtol=0, atol=1e-6)

        # V rows AND proj columns non-zero: the dummy head now adds its output
        v_rows.copy_(torch.randn(v_rows.shape, generator=gen))
        changed = attn(x)
    assert (changed - base).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------
# 4. pixel shuffle
# ------------------------------------------------------------------------------------------
#
# The release's sequence for x [n, w, h, c] (w indexes grid rows r, h grid columns c, since the ViT
# patches are flattened row-major and reshaped to [n, side, side, C]), s = 0.5:
#   a = x.view(n, w, h/2, 2c)       a[r, j]  = cat(x[r, 2j], x[r, 2j+1])
#   b = a.permute(0, 2, 1, 3)       b[j, r]  = a[r, j]
#   d = b.view(n, h/2, w/2, 4c)     d[j, i]  = cat(b[j, 2i], b[j, 2i+1])
#                                            = cat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1])
#   v2: out = d.permute(0, 2, 1, 3) out[i, j] = d[j, i]   (grid in row-major order again)
#   v1: out = d                     out[j, i] = the same block (transposed grid)


def shuffle_ref(x: torch.Tensor) -> torch.Tensor:
    n, side, _, c = x.shape
    half = side // 2
    out = torch.empty(n, half, half, 4 * c, dtype=x.dtype)
    for t in range(n):
        for i in range(half):
            for j in range(half):
                r, c = 2 * i, 2 * j
                out[t, i, j] = torch.cat([x[t, r, c], x[t, r, c + 1], x[t, r + 1, c], x[t, r + 1, c + 1]])
    return out


@pytest.mark.parametrize("n, side, c", [(1, 4, 3), (2, 8, 5)])
def test_pixel_shuffle_v2_and_v1(n, side, c):
    x = torch.arange(n * side * side * c, dtype=torch.float64).reshape(n, side, side, c)
    expected = shuffle_ref(x)

    v2 = pixel_shuffle(x, 0.5, "v2")
    assert v2.shape == (n, side // 2, side // 2, 4 * c)
    assert torch.equal(v2, expected)

    v1 = pixel_shuffle(x, 0.5, "v1")
    assert torch.equal(v1, expected.transpose(1, 2))
    assert not torch.equal(v1, v2)

    if side == 4:  # the brief's explicit statement on the [1, 4, 4, C] case
        for i in range(2):
            for j in range(2):
                top = [x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1]]
                bottom = [x[0, 2 * i + 1, 2 * j], x[0, 2 * i + 1, 2 * j + 1]]
                want = torch.cat(top + bottom)
                assert torch.equal(v2[0, i, j], want)
                assert torch.equal(v1[0, j, i], want)


def test_project_groups_row_major_patches():
    """NVLM_D_Model.project: patch p = r*side + col of a tile feeds LLM token (r//2)*(side//2) + col//2,
    at slot 2*(r%2) + col%2 of the 4 concatenated patches."""
    torch.manual_seed(0)
    model = NVLM_D_Model(get_config("tiny")).eval()
    model.mlp1 = nn.Identity()  # look at the shuffle alone
    tiles, side, c = 2, 8, REAL
    feats = torch.randn(tiles, side * side, c)
    out = model.project(feats)
    assert out.shape == (tiles, (side // 2) ** 2, 4 * c)
    for t in range(tiles):
        for r in range(side):
            for col in range(side):
                token = (r // 2) * (side // 2) + col // 2
                slot = 2 * (r % 2) + col % 2
                assert torch.equal(out[t, token, slot * c : (slot + 1) * c], feats[t, r * side + col])


# ------------------------------------------------------------------------------------------
# 5. encoder layer: pre-norm, layer scale after the branch bias
# ------------------------------------------------------------------------------------------


def test_encoder_layer_layer_scale_after_bias():
    cfg = vision_config("eager")
    layer = InternVisionEncoderLayer(cfg).eval()
    gen = torch.Generator().manual_seed(6)
    randomize_attention(layer.attn, gen)
    with torch.no_grad():
        layer.norm1.weight.copy_(1 + 0.3 * torch.randn(REAL, generator=gen))
        layer.norm2.weight.copy_(1 + 0.3 * torch.randn(REAL, generator=gen))
        for lin in (layer.mlp.fc1, layer.mlp.fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / math.sqrt(lin.in_features))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen) * 0.5)
        layer.ls1.copy_(torch.rand(REAL, generator=gen) * 1.5 + 0.2)
        layer.ls2.copy_(torch.rand(REAL, generator=gen) * 1.5 + 0.2)
    assert layer.ls1.std() > 0.1 and layer.ls2.std() > 0.1
    h = torch.randn(2, 13, REAL, generator=gen)
    with torch.no_grad():
        out = layer(h).double()

    p = {k: v.detach().double() for k, v in layer.state_dict().items()}
    h64 = h.double()
    attn_params = [p[f"attn.{k}"] for k in ("qkv.weight", "q_norm.weight", "k_norm.weight", "proj.weight")]

    def mlp(t, bias2=True):
        inner = gelu_erf(t @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T
        return inner + p["mlp.fc2.bias"] if bias2 else inner

    a = attention_ref(rms_norm_ref(h64, p["norm1.weight"], EPS), *attn_params, p["attn.proj.bias"])
    h1 = h64 + a * p["ls1"]
    expected = h1 + mlp(rms_norm_ref(h1, p["norm2.weight"], EPS)) * p["ls2"]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # wrong placement: layer scale applied before the branch biases
    no_bias = torch.zeros(REAL, dtype=torch.float64)
    a_nobias = attention_ref(rms_norm_ref(h64, p["norm1.weight"], EPS), *attn_params, no_bias)
    w1 = h64 + a_nobias * p["ls1"] + p["attn.proj.bias"]
    wrong = w1 + mlp(rms_norm_ref(w1, p["norm2.weight"], EPS), bias2=False) * p["ls2"] + p["mlp.fc2.bias"]
    assert (out - wrong).abs().max() > 1e-2
    # and the tanh approximation of GELU is not what the MLP uses
    fc1_out = rms_norm_ref(h1, p["norm2.weight"], EPS) @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    tanh_act = torch.nn.functional.gelu(fc1_out, approximate="tanh")
    tanh_mlp = tanh_act @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    tanh_gelu = h1 + tanh_mlp * p["ls2"]
    assert (out - tanh_gelu).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------
# 6. embeddings: class token first, position embedding after, row-major patches
# ------------------------------------------------------------------------------------------


def test_embeddings_patch_order_is_row_major():
    cfg = vision_config()
    emb = InternVisionEmbeddings(cfg).double()
    ps, side = cfg.patch_size, cfg.image_size // cfg.patch_size  # 8, 8
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.patch_embedding.weight[0, 0, 0, 0] = 1.0  # channel 0 <- red pixel at the patch's top-left
        emb.patch_embedding.weight[1, 2, 5, 3] = 1.0  # channel 1 <- blue pixel at (5, 3) inside the patch
        emb.class_embedding.zero_()
        emb.position_embedding.zero_()
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)
    out = emb(pixels)
    assert out.shape == (2, 1 + side * side, REAL)
    for r in range(side):
        for c in range(side):
            idx = 1 + r * side + c
            assert torch.equal(out[:, idx, 0], pixels[:, 0, r * ps, c * ps])
            assert torch.equal(out[:, idx, 1], pixels[:, 2, r * ps + 5, c * ps + 3])
    assert torch.count_nonzero(out[:, :, 2:]) == 0 and torch.count_nonzero(out[:, 0]) == 0


def test_embeddings_class_token_then_position_embedding():
    cfg = vision_config()
    emb = InternVisionEmbeddings(cfg).double()
    ps, side = cfg.patch_size, cfg.image_size // cfg.patch_size
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for prm in emb.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64))
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=gen, dtype=torch.float64)
    out = emb(pixels)

    w = emb.patch_embedding.weight.detach().reshape(REAL, -1)  # [80, 3*8*8] over (channel, y, x)
    b = emb.patch_embedding.bias.detach()
    pos = emb.position_embedding.detach()[0]
    cls = emb.class_embedding.detach()[0, 0]
    expected = torch.empty(2, 1 + side * side, REAL, dtype=torch.float64)
    expected[:, 0] = cls + pos[0]
    for r in range(side):
        for c in range(side):
            patch = pixels[:, :, r * ps : (r + 1) * ps, c * ps : (c + 1) * ps].reshape(2, -1)
            expected[:, 1 + r * side + c] = patch @ w.T + b + pos[1 + r * side + c]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    # wrong order (position embedding of the patches only, then the bare class token) differs
    assert (out[:, 0] - cls).abs().max() > 1e-2
    assert (out[:, 1:] - (expected[:, 1:] - pos[1:] + pos[:-1])).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------
# 7. projector mlp1
# ------------------------------------------------------------------------------------------


def mlp1_ref(x, ln_w, ln_b, w1, w2, eps):
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]  # biased, as LayerNorm
    y = (x - mu) / torch.sqrt(var + eps) * ln_w + ln_b
    return gelu_erf(y @ w1.T) @ w2.T


def randomized_projector_model(eps_override=None, seed=9):
    kwargs = {} if eps_override is None else {"projector_layer_norm_eps": eps_override}
    torch.manual_seed(0)
    model = NVLM_D_Model(get_config("tiny", **kwargs)).double().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prm in model.mlp1.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.3 + (prm.dim() == 1))
    return model


def test_projector_mlp1_matches_explicit_math():
    model = randomized_projector_model()
    ln, fc1, act, fc2 = model.mlp1
    assert isinstance(ln, nn.LayerNorm) and ln.elementwise_affine and ln.bias is not None
    assert fc1.bias is None and fc2.bias is None
    assert (fc1.in_features, fc1.out_features, fc2.out_features) == (4 * REAL, 256, 128)
    assert ln.eps == 1e-5 == model.config.projector_layer_norm_eps  # the release's PyTorch default
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 16, 4 * REAL, generator=gen, dtype=torch.float64) * 2 + 0.7
    with torch.no_grad():
        y = model.mlp1(x)
    expected = mlp1_ref(x, ln.weight, ln.bias, fc1.weight, fc2.weight, 1e-5).detach()
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    # the tanh GELU would differ
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    h = (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias
    tanh_out = torch.nn.functional.gelu(h @ fc1.weight.T, approximate="tanh") @ fc2.weight.T
    assert (y - tanh_out.detach()).abs().max() > 1e-6


def test_projector_layer_norm_eps_override_is_used():
    default = randomized_projector_model()
    megatron = randomized_projector_model(eps_override=1e-6)
    assert megatron.config.projector_layer_norm_eps == 1e-6
    assert megatron.mlp1[0].eps == 1e-6
    for a, b in zip(default.mlp1.parameters(), megatron.mlp1.parameters()):
        assert torch.equal(a, b)
    # input variance ~1e-6, comparable to eps: the two eps give clearly different outputs
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 4 * REAL, generator=gen, dtype=torch.float64) * 1e-3
    with torch.no_grad():
        y5, y6 = default.mlp1(x), megatron.mlp1(x)
    ln, fc1, _, fc2 = megatron.mlp1
    for y, eps in ((y5, 1e-5), (y6, 1e-6)):
        expected = mlp1_ref(x, ln.weight, ln.bias, fc1.weight, fc2.weight, eps).detach()
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    assert (y5 - y6).abs().max() > 1e-2 * y6.abs().max()


# ------------------------------------------------------------------------------------------
# 8. image embeddings scattered over the placeholders
# ------------------------------------------------------------------------------------------

IMG_ID = 989
TOKENS_PER_TILE = 16


def text_ids(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, 978, (n,), generator=gen).tolist()  # regular tokens, never 989


def image_prompt(gen: torch.Generator, tiles: int = 3) -> list[int]:
    ids = text_ids(6, gen)
    for _ in range(tiles):
        ids += text_ids(3, gen) + [IMG_ID] * TOKENS_PER_TILE  # a tile tag, then the tile's tokens
    return ids + text_ids(5, gen)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(1234)
    return NVLM_D_Model(get_config("tiny")).eval()


def test_embed_inputs_scatters_tiles_in_order(tiny_model):
    model = tiny_model
    assert model.img_context_token_id == IMG_ID and model.num_image_token == TOKENS_PER_TILE
    gen = torch.Generator().manual_seed(12)
    pixels = torch.randn(3, 3, 64, 64, generator=gen)
    with torch.no_grad():
        per_tile = torch.cat([model.extract_feature(pixels[t : t + 1]) for t in range(3)])  # [3, 16, 128]
        batched = model.extract_feature(pixels)
    torch.testing.assert_close(batched, per_tile, rtol=1e-5, atol=1e-6)
    table = model.language_model.get_input_embeddings().weight.detach()

    # one row with three tiles; then two rows: tiles 0 and 1 in row 0, tile 2 in row 1
    row = image_prompt(gen)
    first, second = image_prompt(gen, tiles=2), image_prompt(gen, tiles=1)
    second += text_ids(len(first) - len(second), gen)
    two_rows = [first, second]
    for ids in (torch.tensor([row]), torch.tensor(two_rows)):
        with torch.no_grad():
            out = model.embed_inputs(ids, pixels)
        assert out.shape == (*ids.shape, 128)
        feats = batched.reshape(-1, 128)
        k = 0
        for b in range(ids.shape[0]):
            for s in range(ids.shape[1]):
                if ids[b, s] == IMG_ID:
                    assert torch.equal(out[b, s], feats[k])
                    k += 1
                else:
                    assert torch.equal(out[b, s], table[ids[b, s]])
        assert k == 3 * TOKENS_PER_TILE
    # the tiles' features are distinct, so tile order is actually tested
    assert (per_tile[0] - per_tile[1]).abs().max() > 1e-4 and (per_tile[1] - per_tile[2]).abs().max() > 1e-4


def test_embed_inputs_count_mismatch_raises(tiny_model):
    gen = torch.Generator().manual_seed(13)
    pixels = torch.randn(3, 3, 64, 64, generator=gen)
    ids = torch.tensor([image_prompt(gen)])
    positions = (ids[0] == IMG_ID).nonzero().flatten()
    one_less = ids.clone()
    one_less[0, positions[-1]] = 5
    one_more = ids.clone()
    one_more[0, 0] = IMG_ID
    with torch.no_grad():
        for bad_ids, bad_pixels in ((one_less, pixels), (one_more, pixels), (ids, pixels[:2])):
            with pytest.raises(ValueError, match="placeholder"):
                tiny_model.embed_inputs(bad_ids, bad_pixels)


# ------------------------------------------------------------------------------------------
# 9. sdpa vs eager on the whole tiny model
# ------------------------------------------------------------------------------------------


def test_sdpa_matches_eager_whole_model(count_sdpa):
    torch.manual_seed(4321)
    model = NVLM_D_Model(get_config("tiny")).eval()
    gen = torch.Generator().manual_seed(14)
    ids = torch.tensor([image_prompt(gen)])
    pixels = torch.randn(3, 3, 64, 64, generator=gen)

    logits = {}
    for impl in ("eager", "sdpa"):
        model.set_attn_implementation(impl)
        configs = [model.config, model.vision_model.config, model.language_model.config]
        configs += [layer.attn.config for layer in model.vision_model.encoder.layers]
        configs += [layer.self_attn.config for layer in model.language_model.model.layers]
        assert all(c._attn_implementation == impl for c in configs)
        count_sdpa.clear()
        with torch.no_grad():
            logits[impl] = model(pixel_values=pixels, input_ids=ids).logits
        n_layers = 2 + 2  # ViT layers + LLM layers, one attention call each
        assert len(count_sdpa) == (0 if impl == "eager" else n_layers)

    assert logits["eager"].shape == (1, ids.shape[1], 1024)
    assert logits["eager"].abs().max() > 1e-2  # not a trivially-zero comparison
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# 10. dummy heads at init and after loading
# ------------------------------------------------------------------------------------------


def dummy_views(attn: InternAttention):
    qkv = attn.qkv.weight.detach().view(3, PADDED, REAL)
    proj = attn.proj.weight.detach()
    return qkv[:, REAL:], qkv[:, :REAL], proj[:, REAL:], proj[:, :REAL]


def test_fresh_init_zeros_dummy_heads():
    torch.manual_seed(99)
    model = NVLM_D_Model(get_config("tiny"))
    for layer in model.vision_model.encoder.layers:
        qkv_dummy, qkv_real, proj_dummy, proj_real = dummy_views(layer.attn)
        assert torch.count_nonzero(qkv_dummy) == 0  # Q, K and V blocks
        assert torch.count_nonzero(proj_dummy) == 0
        assert torch.count_nonzero(layer.attn.q_norm.weight[REAL:]) == 0
        assert torch.count_nonzero(layer.attn.k_norm.weight[REAL:]) == 0
        # the real part was really initialised (normal, std 0.02), not just zeroed
        for real in (qkv_real, proj_real):
            assert 0.01 < real.std() < 0.03


def nonzero_dummy_model():
    torch.manual_seed(5)
    model = NVLM_D_Model(get_config("tiny")).eval()
    attn = model.vision_model.encoder.layers[1].attn
    with torch.no_grad():
        attn.qkv.weight.view(3, PADDED, REAL)[2, 96:112] = 0.37  # V rows of dummy head 6
        attn.qkv.weight.view(3, PADDED, REAL)[0, 112:128] = -0.11  # Q rows of dummy head 7
        attn.proj.weight[:, 96:112] = -0.25
        attn.q_norm.weight[100] = 3.0
    return model


def test_load_state_dict_keeps_non_zero_dummy_head():
    source = nonzero_dummy_model()
    torch.manual_seed(6)
    target = NVLM_D_Model(get_config("tiny"))
    target.load_state_dict(source.state_dict())
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_from_pretrained_keeps_non_zero_dummy_head(tmp_path):
    source = nonzero_dummy_model()
    source.save_pretrained(tmp_path)
    loaded = NVLM_D_Model.from_pretrained(tmp_path)
    src_attn = source.vision_model.encoder.layers[1].attn
    dst_attn = loaded.vision_model.encoder.layers[1].attn
    assert torch.equal(dst_attn.qkv.weight.view(3, PADDED, REAL)[2, 96:112], torch.full((16, REAL), 0.37))
    assert torch.equal(dst_attn.proj.weight[:, 96:112], torch.full((REAL, 16), -0.25))
    assert dst_attn.q_norm.weight[100] == 3.0
    assert torch.equal(dst_attn.qkv.weight, src_attn.qkv.weight)
    src, dst = source.state_dict(), loaded.state_dict()
    assert src.keys() == dst.keys()
    for k in src:
        assert torch.equal(src[k], dst[k]), k


def test_from_pretrained_missing_attention_weights_get_zero_dummy_heads(tmp_path):
    """A ViT attention weight missing from a checkpoint is initialised with zero dummy heads."""
    torch.manual_seed(7)
    NVLM_D_Model(get_config("tiny")).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for name in ("qkv.weight", "proj.weight"):
        del state[f"vision_model.encoder.layers.1.attn.{name}"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = NVLM_D_Model.from_pretrained(tmp_path)
    qkv_dummy, _, proj_dummy, _ = dummy_views(loaded.vision_model.encoder.layers[1].attn)
    assert torch.count_nonzero(qkv_dummy) == 0
    assert torch.count_nonzero(proj_dummy) == 0
