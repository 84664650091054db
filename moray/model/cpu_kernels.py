"""moray's own CPU kernels for bf16 decode (AVX-512 BF16 dot products, `_mm512_dpbf16_ps`).

Routed experts. At decode sizes (a few tokens, top-k of many experts) a MoE layer is bound by
reading the weights of the experts its tokens hit. PyTorch's CPU products cannot read just those at
speed (benchmarks/bench_decode.py; measured per layer at 8 tokens, top-6 of 64, 37 experts hit,
bf16): `F.grouped_mm` over the hit experts 4.4 ms, a blocked oneDNN product per hit expert 3.5 ms,
the dense form over all 64 experts 1.77 ms. `hit_experts_matmul` takes 0.85 ms: each hit expert's
rows are read once for all of that expert's pairs, the work split over the threads by (expert,
block of 16 output rows).

MLA's absorbed attention. A decode step's queries (heads x new tokens) meet the cached latents
[c_kv | k_pe] of their row; PyTorch's bf16 `bmm` runs these skinny products (8 query rows against
543 keys) at a fraction of the machine, and needs the cache slice copied to a contiguous one.
`latent_scores` and `latent_values` read each cached latent in place, once for a block of query
rows, with a PyTorch softmax between them in fp32: 280-300 us a layer against 570-600 at batch 8.

The kernels are compiled with `torch.utils.cpp_extension.load_inline` the first time they are used
in a process (about 30-60 s, then cached on disk for every later process). Where that fails (no
compiler, a CPU without AVX-512 BF16), `kernel()` is None and callers keep PyTorch's products.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// out[p, o] = sum_k W[experts[g], o, k] * x[rows[p], k] for the pairs p of group g, which are
// offsets[g] .. offsets[g + 1]. x (N, K) and W (E, O, K) bf16 contiguous, K a multiple of 32.
torch::Tensor hit_experts_matmul(torch::Tensor x, torch::Tensor W, torch::Tensor experts,
                                 torch::Tensor offsets, torch::Tensor rows) {
  const int64_t K = x.size(1), O = W.size(1), G = experts.size(0), P = rows.size(0);
  auto out = torch::empty({P, O}, torch::dtype(torch::kFloat32));
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = W.data_ptr<at::BFloat16>();
  const int64_t* ep = experts.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  float* outp = out.data_ptr<float>();
  const int64_t OB = 16;  // output rows per task
  const int64_t blocks = (O + OB - 1) / OB;
  at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks, ob = t % blocks;
      const int64_t p0 = op[g], n = op[g + 1] - p0;
      const at::BFloat16* We = wp + ep[g] * O * K;
      for (int64_t o = ob * OB; o < std::min(O, (ob + 1) * OB); ++o) {
        const at::BFloat16* wrow = We + o * K;
        for (int64_t i0 = 0; i0 < n; i0 += 4) {  // four pairs at a time share each load of the row
          const int64_t m = std::min<int64_t>(4, n - i0);
          __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
          for (int64_t k = 0; k < K; k += 32) {
            __m512bh w = (__m512bh)_mm512_loadu_si512((const void*)(wrow + k));
            for (int64_t i = 0; i < m; ++i) {
              __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(xp + rp[p0 + i0 + i] * K + k));
              acc[i] = _mm512_dpbf16_ps(acc[i], w, xv);
            }
          }
          for (int64_t i = 0; i < m; ++i) outp[(p0 + i0 + i) * O + o] = _mm512_reduce_add_ps(acc[i]);
        }
      }
    }
  });
  return out;
}

// MLA's absorbed decode attention over the latent cache, in two passes around a PyTorch softmax.
// q (B, R, D) bf16 contiguous: R query rows (heads x new tokens, row r is token r % T);
// kv (B, S, D) bf16, any batch and row strides, unit stride inside a row: the cached [c_kv | k_pe];
// mask (B, T, S) float32 or empty. D a multiple of 32.
// scores[b, r, s] = scale * q[b, r] . kv[b, s] + mask[b, r % T, s]       (B, R, S) float32
torch::Tensor latent_scores(torch::Tensor q, torch::Tensor kv, torch::Tensor mask, double scale) {
  const int64_t B = q.size(0), R = q.size(1), D = q.size(2), S = kv.size(1);
  const int64_t kb = kv.stride(0), ks = kv.stride(1);
  const bool masked = mask.numel() > 0;
  const int64_t T = masked ? mask.size(1) : 1;
  auto out = torch::empty({B, R, S}, torch::dtype(torch::kFloat32));
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = kv.data_ptr<at::BFloat16>();
  const float* mp = masked ? mask.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  const float sc = (float)scale;
  const int64_t RB = 4;  // query rows per task: each key row is loaded once for all of them
  const int64_t blocks = (R + RB - 1) / RB;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, r0 = (t % blocks) * RB, m = std::min(RB, R - r0);
      for (int64_t s = 0; s < S; ++s) {
        const at::BFloat16* krow = kp + b * kb + s * ks;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t k = 0; k < D; k += 32) {
          __m512bh w = (__m512bh)_mm512_loadu_si512((const void*)(krow + k));
          for (int64_t i = 0; i < m; ++i) {
            __m512bh x = (__m512bh)_mm512_loadu_si512((const void*)(qp + (b * R + r0 + i) * D + k));
            acc[i] = _mm512_dpbf16_ps(acc[i], w, x);
          }
        }
        for (int64_t i = 0; i < m; ++i) {
          const int64_t r = r0 + i;
          float v = _mm512_reduce_add_ps(acc[i]) * sc;
          if (masked) v += mp[(b * T + r % T) * S + s];
          outp[(b * R + r) * S + s] = v;
        }
      }
    }
  });
  return out;
}

// out[b, r, :] = sum_s probs[b, r, s] * kv[b, s, :C]          (B, R, C) float32
// probs (B, R, S) float32 contiguous; kv as above; C a multiple of 16.
torch::Tensor latent_values(torch::Tensor probs, torch::Tensor kv, int64_t C) {
  const int64_t B = probs.size(0), R = probs.size(1), S = probs.size(2);
  const int64_t kb = kv.stride(0), ks = kv.stride(1);
  auto out = torch::empty({B, R, C}, torch::dtype(torch::kFloat32));
  const float* pp = probs.data_ptr<float>();
  const at::BFloat16* kp = kv.data_ptr<at::BFloat16>();
  float* outp = out.data_ptr<float>();
  const int64_t RB = 4;
  const int64_t blocks = (R + RB - 1) / RB;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<__m512> acc(RB * (C / 16));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, r0 = (t % blocks) * RB, m = std::min(RB, R - r0);
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t s = 0; s < S; ++s) {
        const at::BFloat16* vrow = kp + b * kb + s * ks;
        for (int64_t j = 0; j < C / 16; ++j) {
          // bf16 -> fp32: the 16 bits become the high half of each 32-bit lane
          __m256i h = _mm256_loadu_si256((const __m256i*)(vrow + 16 * j));
          __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
          for (int64_t i = 0; i < m; ++i) {
            const __m512 p = _mm512_set1_ps(pp[(b * R + r0 + i) * S + s]);
            acc[i * (C / 16) + j] = _mm512_fmadd_ps(p, v, acc[i * (C / 16) + j]);
          }
        }
      }
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < C / 16; ++j)
          _mm512_storeu_ps(outp + (b * R + r0 + i) * C + 16 * j, acc[i * (C / 16) + j]);
    }
  });
  return out;
}
"""

_kernel = None
_tried = False


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def kernel():
    """The compiled extension, or None where it cannot be built or run here."""
    global _kernel, _tried
    if not _tried:
        _tried = True
        if _cpu_has_avx512_bf16():
            try:
                from torch.utils.cpp_extension import load_inline

                _kernel = load_inline(
                    "moray_cpu_kernels",
                    cpp_sources=_SOURCE,
                    functions=["hit_experts_matmul", "latent_scores", "latent_values"],
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"],
                )
            except Exception as e:  # no compiler, or the build failed: PyTorch's products instead
                warnings.warn(
                    f"moray's expert decode kernel did not build ({e}); using PyTorch's products",
                    stacklevel=2,
                )
    return _kernel


def usable(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether the kernel takes these stacks: bf16 on the CPU, both inner sizes multiples of 32."""
    H, I = gate_up_proj.shape[-1], down_proj.shape[-1]  # noqa: E741
    ok = gate_up_proj.dtype == down_proj.dtype == torch.bfloat16 and gate_up_proj.device.type == "cpu"
    return ok and H % 32 == 0 and I % 32 == 0 and kernel() is not None


def attention_usable(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, c: int) -> bool:
    """Whether `latent_attention` takes these: bf16 CPU inference, the width a multiple of 32 and the
    latent's of 16, one mask for all heads (no per-head relative biases)."""
    ok = q.dtype == keys.dtype == torch.bfloat16 and q.device.type == "cpu" and not torch.is_grad_enabled()
    ok = ok and q.shape[-1] % 32 == 0 and c % 16 == 0 and keys.stride(-1) == 1
    return ok and (mask is None or mask.shape[1] == 1) and kernel() is not None


def latent_attention(
    q: torch.Tensor,  # (B, R, D) R query rows: heads x T new tokens, row r is token r % T
    keys: torch.Tensor,  # (B, S, D) the cached [c_kv | k_pe]; any batch and row strides
    mask: torch.Tensor | None,  # (B, 1, T, S) additive, or None
    scale: float,
    c: int,  # the latent's width: values are keys[..., :c]
) -> torch.Tensor:
    """softmax(scale * q . keys + mask) @ keys[..., :c]: (B, R, c) float32. Scores and softmax in fp32;
    the keys are read in place (no copy of the cache slice)."""
    m = torch.empty(0) if mask is None else mask[:, 0].float().contiguous()  # (B, T, S)
    run = kernel()
    probs = run.latent_scores(q.contiguous(), keys, m, scale).softmax(dim=-1)  # (B, R, S)
    return run.latent_values(probs, keys, c)


def hit_experts_ffn(
    x: torch.Tensor,  # (N, H)
    experts: torch.Tensor,  # (N, k)
    weights: torch.Tensor,  # (N, k)
    keep: torch.Tensor | None,  # (N, k) bool
    gate_up_proj: torch.Tensor,  # (E, 2I, H) bf16
    down_proj: torch.Tensor,  # (E, H, I) bf16
) -> torch.Tensor:
    """The weighted sum over each token's experts of down_e(silu(gate_e(x)) * up_e(x)): (N, H), in
    x's dtype. Inference only (no autograd)."""
    N, k = experts.shape
    I = down_proj.shape[-1]  # noqa: E741
    flat, w = experts.reshape(-1), weights.reshape(-1)
    if keep is not None:
        w = w * keep.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // k  # (P,) the pairs by expert
    hit, counts = torch.unique_consecutive(flat[order], return_counts=True)  # (G,)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (G + 1,)
    run = kernel().hit_experts_matmul
    xb = x.to(torch.bfloat16).contiguous()
    h = run(xb, gate_up_proj.contiguous(), hit, offsets, token)  # (P, 2I) fp32
    act = (F.silu(h[:, :I]) * h[:, I:]).to(torch.bfloat16)  # (P, I)
    out_rows = run(act, down_proj.contiguous(), hit, offsets, torch.arange(len(token)))  # (P, H) fp32
    out_rows *= w[order, None].float()
    return torch.zeros(N, x.shape[1]).index_add_(0, token, out_rows).to(x.dtype)
