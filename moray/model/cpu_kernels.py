"""moray's own CPU kernels for bf16 decode (AVX-512 BF16 dot products, `_mm512_dpbf16_ps`), and for
the routed experts in bf16 training; each is one call where PyTorch ran many small ops, which at
decode sizes cost more than the arithmetic.

Routed experts (`hit_experts_ffn`). At decode sizes (a few tokens, top-k of many experts) a MoE layer
is bound by reading the weights of the experts its tokens hit. PyTorch's CPU products cannot read
just those at speed (benchmarks/bench_decode.py; per layer at 8 tokens, top-6 of 64, bf16):
`F.grouped_mm` over the hit experts 4.4 ms, a blocked oneDNN product per hit expert 3.5 ms, the
dense form over all 64 experts 1.77 ms. `hit_experts_matmul` reads each hit expert's rows once for
all of its pairs, split over the threads by (expert, block of 16 output rows), prefetching rows
ahead: 1.04 ms with the weights coming from memory. The same loop serves the small linears of a
decode step (`few_rows_linear`), where oneDNN's per-call cost dominates.

Where the CPU has AMX (Intel Sapphire Rapids and later), the same products run on its tiles: a tile
of 16 weight rows x 32 inner values, loaded in place from the weights' own layout, meets the pairs'
rows laid out once per call in the tiles' VNNI form. Their arithmetic is then cheap enough that the
products stay bound by reading the weights at any decode size, for the output head and every other
linear of a decode step too (the bf16 step at batch 8 on the small preset: 11.3-12.2 -> 9.9-10.6 ms).

MLA's absorbed attention (`absorbed_attention`). A decode step's queries (heads x new tokens) meet
the cached latents [c_kv | k_pe] of their row; PyTorch's bf16 `bmm` runs these skinny products (8
query rows against 543 keys) at a fraction of the machine, and needs the cache slice copied. The
kernel runs a task of up to 16 heads of a token from their queries to their outputs: W_UK in fp32,
the scores against each cached latent read in place (AMX tiles, or 16 keys at a time with one
shuffle tree for their sums), an fp32 softmax, the values, W_UV in fp32. 100 us a layer at batch 8
(142 without AMX) against 570-600.

RoPE and RMSNorm (`rope`, `rms_norm`): 14 and a dozen PyTorch ops a call, run 8 and 13 times a step.
In training, RMSNorm with its fp32 weight (`rms_norm_train` and its backward): one pass each way
where PyTorch runs 6 ops forward and a dozen backward (moray.model.norm.RMSNorm).

Training (bf16, the routed experts): `grouped_outer_into`, the stacks' weight gradients of several
micro-batches at once, accumulated in fp32 on AMX tiles (moray.jobs.pretrain.working_weights defers
them to the end of the step), with their sum of squares for the global clip; `grouped_rows_linear`,
the forward products, the decode kernel's loop with the tokens' rows gathered as it packs them;
`swiglu` / `swiglu_backward`, the activation and its backward in one
pass each (3 and 8 PyTorch ops); `combine_rows`, the weighted sum of each token's rows in fp32 (a
product and an index_add_ that rounds after every row). And the optimizer: `adamw_step_`, torch's
fused AdamW update that also writes the bf16 working copies (moray.jobs.pretrain.optim.AdamW).

The kernels are compiled with `torch.utils.cpp_extension.load_inline` the first time they are used
in a process (about 30-60 s, then cached on disk for every later process). Where that fails (no
compiler, a CPU without AVX-512 BF16), `kernel()` is None and callers keep PyTorch's products.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <memory>
#include <vector>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

// AMX (Intel's tile unit: Sapphire Rapids and later). Linux hands a process the tile state only
// after it asks (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); oneDNN asks too, harmlessly twice.
static bool amx_available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile_bf16 = (d >> 24 & 1) && (d >> 22 & 1);  // AMX-TILE, AMX-BF16
    return tile_bf16 && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}
static bool amx_wanted = true;

// Whether the products run on AMX tiles; want: 1 on, 0 off (the AVX-512 loop, for comparison), -1 ask.
bool use_amx(int64_t want) {
  if (want >= 0) amx_wanted = want != 0;
  return amx_wanted && amx_available();
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes. The decode products: tmm0, tmm6 16 weight rows x 32 k (A); tmm1, tmm7
// 16 k pairs x 16 columns (B, VNNI); tmm2-5 16 x 16 fp32 (C). grouped_outer_into: tmm0-3 C, tmm4-5 A, tmm6-7 B.
static void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// Row i of an AMX B tile set: the K values of `row` into column i of the tiles' VNNI form, where
// chunk c (32 inputs) is 16 k pairs x 16 columns x 2 bf16 = 512 values at dst + c * 512.
static void vnni_column(const uint16_t* row, int64_t K, int64_t i, uint16_t* dst) {
  for (int64_t k = 0; k < K; k += 2) {
    uint16_t* d = dst + (k / 32) * 512 + (k % 32) / 2 * 32 + i * 2;
    d[0] = row[k];
    d[1] = row[k + 1];
  }
}

// Transposes 16 x 16 32-bit words in place: r[j] becomes column j of the rows r[0..15].
static inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// A C tile (16 output rows o x 16 pairs, fp32) into the pairs' rows of out (P, O): pair i's 16 values
// at out + i * O, for the first n pairs; fp32 or rounded to bf16.
static inline void store16(float* out, __m512i v) { _mm512_storeu_si512(out, v); }
static inline void store16(at::BFloat16* out, __m512i v) {
  _mm256_storeu_si256((__m256i*)out, (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(v)));
}
template <typename Out>
static inline void store_transposed(const float (*c)[16], int64_t n, Out* out, int64_t O) {
  __m512i r[16];
  for (int m = 0; m < 16; ++m) r[m] = _mm512_loadu_si512(c[m]);
  transpose16(r);
  for (int64_t i = 0; i < n; ++i) store16(out + i * O, r[i]);
}

// hit_experts_matmul on AMX tiles: C (16 output rows x 16 pairs) += W rows (16 x 32 k) . X^T, where
// X^T is each group's rows laid out once in the tiles' VNNI form (k pairs x pairs x 2), padded to
// 16 pairs: a 16 x 16 transpose of the rows' 32-bit k pairs per chunk of 32 k. The weights stream
// from their own (E, O, K) layout; O a multiple of 16. Each chunk two W tiles (32 output rows) meet
// two pair blocks: 10-25% faster at training sizes than one W tile meeting four, which loads a pair
// tile for every product. Also the routed experts' forward products in
// training (grouped_rows_linear), whose few dozen rows per expert oneDNN's bmm runs at 500 GFLOP/s
// at best, reordering the weights (transposed views) on every call.
template <typename Out>
static void hit_experts_matmul_amx(const at::BFloat16* xp, const at::BFloat16* wp, int64_t K, int64_t O,
                                   const std::vector<int64_t>& experts, const std::vector<int64_t>& offsets,
                                   const int64_t* rp, Out* outp) {
  const int64_t G = experts.size(), chunks = K / 32;
  // group g's pair block j, chunk c: 16 k pairs x 16 pairs x 2 bf16 = 1 KB at xt[(tb[g] + j) * chunks + c]
  std::vector<int64_t> tb(G + 1, 0), group_of_block;
  for (int64_t g = 0; g < G; ++g) {
    tb[g + 1] = tb[g] + (offsets[g + 1] - offsets[g] + 15) / 16;
    group_of_block.resize(tb[g + 1], g);
  }
  // every value written below (zeros past a group's last pair): no zero-filling pass first
  std::unique_ptr<uint16_t[]> xt_buffer(new uint16_t[tb[G] * chunks * 512]);
  uint16_t* xt = xt_buffer.get();
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xp);
  at::parallel_for(0, tb[G], 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g = group_of_block[b], first = offsets[g] + (b - tb[g]) * 16;
      const int64_t n = std::min<int64_t>(16, offsets[g + 1] - first);
      for (int64_t ch = 0; ch < chunks; ++ch) {
        __m512i r[16];
        for (int64_t i = 0; i < 16; ++i)
          r[i] = i < n ? _mm512_loadu_si512(xs + rp[first + i] * K + ch * 32) : _mm512_setzero_si512();
        transpose16(r);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(xt + (b * chunks + ch) * 512 + j * 32, r[j]);
      }
    }
  });
  // tasks: (group, block of 32 output rows, or a last 16); two A tiles meet two B tiles per chunk
  const int64_t blocks = (O + 31) / 32;
  at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    alignas(64) float c[2][16][16];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks, o0 = (t % blocks) * 32;
      const bool two = o0 + 32 <= O;
      const int64_t p0 = offsets[g], n = offsets[g + 1] - p0;
      const at::BFloat16* a = wp + experts[g] * O * K + o0 * K;
      const char* next = reinterpret_cast<const char*>(a + 32 * K);  // the next block, 32 rows on
      for (int64_t j0 = 0; j0 < tb[g + 1] - tb[g]; j0 += 2) {  // up to 32 pairs a pass
        const bool nj2 = j0 + 1 < tb[g + 1] - tb[g];
        const uint16_t* b = xt + (tb[g] + j0) * chunks * 512;
        _tile_zero(2);
        if (nj2) _tile_zero(3);
        if (two) _tile_zero(4);
        if (two && nj2) _tile_zero(5);
        for (int64_t ch = 0; ch < chunks; ++ch) {
          // the next block's rows on their way to L2 while this one is multiplied, 32 lines a chunk
          if (j0 == 0)
            for (int64_t l = ch * 32; l < (ch + 1) * 32; ++l) _mm_prefetch(next + l * 64, _MM_HINT_T1);
          _tile_loadd(0, a + ch * 32, K * 2);
          if (two) _tile_loadd(6, a + 16 * K + ch * 32, K * 2);
          _tile_loadd(1, b + ch * 512, 64);
          _tile_dpbf16ps(2, 0, 1);
          if (two) _tile_dpbf16ps(4, 6, 1);
          if (nj2) {
            _tile_loadd(7, b + (chunks + ch) * 512, 64);
            _tile_dpbf16ps(3, 0, 7);
            if (two) _tile_dpbf16ps(5, 6, 7);
          }
        }
        const int64_t n0 = std::min<int64_t>(16, n - j0 * 16), n1 = std::min<int64_t>(16, n - (j0 + 1) * 16);
        Out* out = outp + (p0 + j0 * 16) * O + o0;
        _tile_stored(2, c[0], 64);
        if (nj2) _tile_stored(3, c[1], 64);
        store_transposed(c[0], n0, out, O);
        if (nj2) store_transposed(c[1], n1, out + 16 * O, O);
        if (two) {
          _tile_stored(4, c[0], 64);
          if (nj2) _tile_stored(5, c[1], 64);
          store_transposed(c[0], n0, out + 16, O);
          if (nj2) store_transposed(c[1], n1, out + 16 * O + 16, O);
        }
      }
    }
    _tile_release();
  });
}

// out[p, o] = sum_k W[experts[g], o, k] * x[rows[p], k] for the pairs p of group g, which are
// offsets[g] .. offsets[g + 1]. x (N, K) and W (E, O, K) bf16 contiguous, K a multiple of 32; out (P, O).
static void hit_experts_matmul(const at::BFloat16* xp, const at::BFloat16* wp, int64_t K, int64_t O,
                               const std::vector<int64_t>& experts, const std::vector<int64_t>& offsets,
                               const int64_t* rp, float* outp) {
  if (O % 16 == 0 && use_amx(-1)) return hit_experts_matmul_amx(xp, wp, K, O, experts, offsets, rp, outp);
  const int64_t G = experts.size();
  const int64_t OB = 16;  // output rows per task
  const int64_t blocks = (O + OB - 1) / OB;
  at::parallel_for(0, G * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / blocks, ob = t % blocks;
      const int64_t p0 = offsets[g], n = offsets[g + 1] - p0;
      const at::BFloat16* We = wp + experts[g] * O * K;
      for (int64_t o = ob * OB; o < std::min(O, (ob + 1) * OB); ++o) {
        const at::BFloat16* wrow = We + o * K;
        // the rows 4 ahead on their way from memory while this one is multiplied: 1.38 -> 1.04 ms a
        // layer at 8 tokens (the hardware prefetchers alone stream these 1 KB rows at about 20 GB/s)
        for (int64_t k = 0; k < K; k += 32) _mm_prefetch((const char*)(wrow + 4 * K + k), _MM_HINT_T0);
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
}

// The routed experts of N tokens, k (expert, weight) pairs each, in one call:
//   out[n] = sum_j weights[n, j] * down_e(silu(gate_e(x[n])) * up_e(x[n])),  e = experts[n, j]
// x (N, H) any float dtype; experts (N, k) int64; weights (N, k); gate_up (E, 2I, H) and down (E, H, I)
// bf16 contiguous, H and I multiples of 32. Returns (N, H) in x's dtype. The pairs are grouped by
// expert (a stable counting sort) so each hit expert's rows are read once for all of its pairs.
torch::Tensor hit_experts_ffn(torch::Tensor x, torch::Tensor experts, torch::Tensor weights,
                              torch::Tensor gate_up, torch::Tensor down) {
  const int64_t N = experts.size(0), k = experts.size(1), P = N * k, E = gate_up.size(0);
  const int64_t H = x.size(1), I = down.size(2);
  auto ex = experts.to(torch::kInt64).contiguous();
  auto wt = weights.to(torch::kFloat32).contiguous();
  const int64_t* ep = ex.data_ptr<int64_t>();
  const float* wp = wt.data_ptr<float>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(ep[p] >= 0 && ep[p] < E, "expert index ", ep[p], " out of range for ", E, " experts");
    ++start[ep[p] + 1];
  }
  std::vector<int64_t> hit, offsets{0};
  for (int64_t e = 0; e < E; ++e) {
    if (start[e + 1] > 0) {
      hit.push_back(e);
      offsets.push_back(offsets.back() + start[e + 1]);
    }
    start[e + 1] += start[e];
  }
  std::vector<int64_t> token(P), pair(P);  // by expert: each pair's token and its index in (N, k)
  for (int64_t p = 0; p < P; ++p) {
    const int64_t at = start[ep[p]]++;
    token[at] = p / k;
    pair[at] = p;
  }
  auto xb = x.to(torch::kBFloat16).contiguous();
  auto h = torch::empty({P, 2 * I}, torch::dtype(torch::kFloat32));  // (P, 2I) [gate | up]
  hit_experts_matmul(xb.data_ptr<at::BFloat16>(), gate_up.data_ptr<at::BFloat16>(), H, 2 * I, hit,
                     offsets, token.data(), h.data_ptr<float>());
  auto act = (at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I)).to(torch::kBFloat16);  // (P, I) vectorized
  const at::BFloat16* ap = act.data_ptr<at::BFloat16>();
  std::vector<int64_t> rows(P);
  for (int64_t p = 0; p < P; ++p) rows[p] = p;
  auto y = torch::empty({P, H}, torch::dtype(torch::kFloat32));
  hit_experts_matmul(ap, down.data_ptr<at::BFloat16>(), I, H, hit, offsets, rows.data(), y.data_ptr<float>());
  auto out = torch::zeros({N, H}, torch::dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p) {
    const float w = wp[pair[p]];
    float* orow = op + token[p] * H;
    for (int64_t j = 0; j < H; ++j) orow[j] += yp[p * H + j] * w;
  }
  return out.to(x.scalar_type());
}

// x (..., K) @ W (O, K).T for the few rows of a decode step: (..., O) bf16, fp32 accumulation. The
// experts' kernel with every row in one group: a call costs a few microseconds where oneDNN's
// blocked product costs about 20 at any size, which decides for small weights and few rows.
// W bf16 contiguous, K a multiple of 32.
torch::Tensor few_rows_linear(torch::Tensor x, torch::Tensor W) {
  const int64_t K = W.size(1), O = W.size(0), N = x.numel() / K;
  auto xb = x.to(torch::kBFloat16).contiguous();
  std::vector<int64_t> group{0}, offsets{0, N}, rows(N);
  for (int64_t n = 0; n < N; ++n) rows[n] = n;
  auto out = torch::empty({N, O}, torch::dtype(torch::kFloat32));
  hit_experts_matmul(xb.data_ptr<at::BFloat16>(), W.data_ptr<at::BFloat16>(), K, O, group, offsets, rows.data(),
                     out.data_ptr<float>());
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  return out.to(torch::kBFloat16).view(sizes);
}

// Rows of x picked by `rows` (empty: x's rows in order), grouped by expert (counts (E,): expert 0's rows
// first), each times its expert's W (E, O, K).T: (P, O) bf16, accumulated in fp32. x (R, K) and W bf16
// contiguous, K a multiple of 32, O of 16. AMX only. The routed experts' forward products in training
// and prefill, the gather done by the packing's reads.
torch::Tensor grouped_rows_linear(torch::Tensor x, torch::Tensor rows, torch::Tensor W, torch::Tensor counts) {
  TORCH_CHECK(use_amx(-1), "grouped_rows_linear runs on AMX tiles only");
  const int64_t K = x.size(1), E = W.size(0), O = W.size(1);
  TORCH_CHECK(W.size(2) == K && K % 32 == 0 && O % 16 == 0 && counts.numel() == E,
              "grouped_rows_linear: x (R, K), W (E, O, K), counts (E,) with K a multiple of 32 and O of 16");
  auto c = counts.to(torch::kInt64).contiguous();
  const int64_t* cp = c.data_ptr<int64_t>();
  std::vector<int64_t> experts, offsets{0};
  for (int64_t e = 0; e < E; ++e)
    if (cp[e] > 0) {
      experts.push_back(e);
      offsets.push_back(offsets.back() + cp[e]);
    }
  const int64_t P = offsets.back();
  std::vector<int64_t> own;
  const int64_t* rp;
  if (rows.numel()) {
    TORCH_CHECK(rows.numel() == P, "grouped_rows_linear: ", rows.numel(), " rows for counts adding up to ", P);
    rp = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < P; ++i)
      TORCH_CHECK(rp[i] >= 0 && rp[i] < x.size(0), "grouped_rows_linear: row ", rp[i], " out of range");
  } else {
    TORCH_CHECK(x.size(0) == P, "grouped_rows_linear: ", x.size(0), " rows for counts adding up to ", P);
    own.resize(P);
    for (int64_t i = 0; i < P; ++i) own[i] = i;
    rp = own.data();
  }
  auto out = torch::empty({P, O}, x.options());
  hit_experts_matmul_amx(x.data_ptr<at::BFloat16>(), W.data_ptr<at::BFloat16>(), K, O, experts, offsets, rp,
                         out.data_ptr<at::BFloat16>());
  return out;
}

// The sum of squares of rows x cols fp32 values, rows `stride` apart (cols a multiple of 16), in fp64.
static double sum_of_squares(const float* x, int64_t rows, int64_t cols, int64_t stride) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < cols; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + r * stride + j);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
  return _mm512_reduce_add_ps(acc);
}

// The routed experts' weight gradients, accumulated in fp32: out[e] (+)= sum over the segments s of
// a_s[rows of e].T @ b_s[rows of e]. Segment s (a micro-batch) lists counts_s[e] rows for each expert
// in turn; its i-th row is row a_rows_s[i] of a_s and row b_rows_s[i] of b_s (an empty index: row i).
// So a segment can skip a padded grid's padding rows and read b's rows where they lie (the tokens, not
// a gathered copy). a_s (., M) and b_s (., N) bf16 contiguous; out (E, M, N) fp32 contiguous; M and N
// multiples of 32; overwritten unless `accumulate`. AMX only.
//
// The inner dimension is the expert's rows (a few dozen to a few hundred in a training micro-batch),
// where oneDNN's bf16 bmm reaches 150 GFLOP/s, returns bf16 to be widened and added, and runs once
// per micro-batch. Here every segment's rows of an expert meet in one product (its rows laid out
// once: A transposed, B in VNNI pairs, zero-padded to 32), and the C tiles go straight to the fp32
// gradient. Returns the sum of squares of out as it ends (the global clip's share of it, read from L1
// as each block is stored, where a pass over the gradient would stream it from memory again).
double grouped_outer_into(torch::Tensor out, std::vector<torch::Tensor> as, std::vector<torch::Tensor> bs,
                        std::vector<torch::Tensor> counts, std::vector<torch::Tensor> a_rows,
                        std::vector<torch::Tensor> b_rows, bool accumulate) {
  TORCH_CHECK(use_amx(-1), "grouped_outer_into runs on AMX tiles only");
  const int64_t E = out.size(0), M = out.size(1), N = out.size(2), S = as.size();
  TORCH_CHECK(M % 32 == 0 && N % 32 == 0, "grouped_outer_into: M and N must be multiples of 32");
  std::vector<const uint16_t*> ap(S), bp(S);
  std::vector<const int64_t*> ai(S), bi(S);
  std::vector<std::vector<int64_t>> row_start(S, std::vector<int64_t>(E + 1, 0));  // each expert's first row
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(as[s].size(1) == M && bs[s].size(1) == N && counts[s].numel() == E,
                "grouped_outer_into: segment ", s, " does not match the output");
    ap[s] = reinterpret_cast<const uint16_t*>(as[s].data_ptr<at::BFloat16>());
    bp[s] = reinterpret_cast<const uint16_t*>(bs[s].data_ptr<at::BFloat16>());
    auto c = counts[s].to(torch::kInt64);
    const int64_t* cp = c.data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e) row_start[s][e + 1] = row_start[s][e] + cp[e];
    const int64_t rows = row_start[s][E];
    ai[s] = a_rows[s].numel() ? a_rows[s].data_ptr<int64_t>() : nullptr;
    bi[s] = b_rows[s].numel() ? b_rows[s].data_ptr<int64_t>() : nullptr;
    TORCH_CHECK((ai[s] ? a_rows[s].numel() : as[s].size(0)) == rows &&
                (bi[s] ? b_rows[s].numel() : bs[s].size(0)) == rows,
                "grouped_outer_into: counts of segment ", s, " do not add up to its rows");
    for (int64_t i = 0; ai[s] && i < rows; ++i)
      TORCH_CHECK(ai[s][i] >= 0 && ai[s][i] < as[s].size(0), "grouped_outer_into: a row out of range");
    for (int64_t i = 0; bi[s] && i < rows; ++i)
      TORCH_CHECK(bi[s][i] >= 0 && bi[s][i] < bs[s].size(0), "grouped_outer_into: b row out of range");
  }
  float* outp = out.data_ptr<float>();
  // tasks: (expert, block of output rows); blocks only where the experts alone would leave threads idle
  const int64_t per_expert = std::min<int64_t>(M / 32, (2 * at::get_num_threads() + E - 1) / E);
  const int64_t MB = (M / 32 + per_expert - 1) / per_expert * 32, blocks = (M + MB - 1) / MB;
  std::vector<double> task_squares(E * blocks, 0.0);  // each task's sum of squares of its rows of out
  at::parallel_for(0, E * blocks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    std::vector<uint16_t> at_, bv;
    std::vector<const uint16_t*> arows, brows;  // the expert's rows, every segment's in turn
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / blocks, m_begin = (t % blocks) * MB, rows = std::min(M, m_begin + MB) - m_begin;
      float* o = outp + e * M * N + m_begin * N;
      int64_t K = 0;
      for (int64_t s = 0; s < S; ++s) K += row_start[s][e + 1] - row_start[s][e];
      if (K == 0) {
        if (!accumulate) std::fill(o, o + rows * N, 0.f);
        else task_squares[t] = sum_of_squares(o, rows, N, N);
        continue;
      }
      const int64_t Kp = (K + 31) / 32 * 32;
      arows.clear();
      brows.clear();
      for (int64_t s = 0; s < S; ++s)
        for (int64_t r = row_start[s][e]; r < row_start[s][e + 1]; ++r) {
          arows.push_back(ap[s] + (ai[s] ? ai[s][r] : r) * M + m_begin);
          brows.push_back(bp[s] + (bi[s] ? bi[s][r] : r) * N);
        }
      // (rows, Kp): A transposed, a tile is 16 rows x 32 k. 32 columns of the K rows at a time: the
      // rows' cache lines stay in L1 while the writes run along k (2.5x faster than row by row).
      at_.resize(rows * Kp);
      for (int64_t m0 = 0; m0 < rows; m0 += 32)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t m = 0; m < 32; ++m) at_[(m0 + m) * Kp + k] = arows[k][m0 + m];
      for (int64_t m = 0; m < rows; ++m) std::fill(at_.data() + m * Kp + K, at_.data() + (m + 1) * Kp, 0);
      // (Kp / 2, N, 2): B's k pairs side by side, a tile is 16 pairs x 16 columns
      bv.resize(Kp * N);
      for (int64_t k = 0; k < K; k += 2) {
        const uint16_t *r0 = brows[k], *r1 = k + 1 < K ? brows[k + 1] : nullptr;
        uint16_t* d = bv.data() + k * N;
        for (int64_t n = 0; n < N; ++n) {
          d[2 * n] = r0[n];
          d[2 * n + 1] = r1 ? r1[n] : 0;
        }
      }
      std::fill(bv.data() + (K + 1) / 2 * 2 * N, bv.data() + Kp * N, 0);
      for (int64_t m0 = 0; m0 < rows; m0 += 32)
        for (int64_t n0 = 0; n0 < N; n0 += 32) {  // a 32 x 32 block of out: four C tiles
          float* c = o + m0 * N + n0;
          if (accumulate) {
            _tile_loadd(0, c, N * 4); _tile_loadd(1, c + 16, N * 4);
            _tile_loadd(2, c + 16 * N, N * 4); _tile_loadd(3, c + 16 * N + 16, N * 4);
          } else {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          }
          for (int64_t ch = 0; ch < Kp / 32; ++ch) {
            _tile_loadd(4, at_.data() + m0 * Kp + ch * 32, Kp * 2);
            _tile_loadd(5, at_.data() + (m0 + 16) * Kp + ch * 32, Kp * 2);
            _tile_loadd(6, bv.data() + ch * 32 * N + n0 * 2, N * 4);
            _tile_loadd(7, bv.data() + ch * 32 * N + (n0 + 16) * 2, N * 4);
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, c, N * 4); _tile_stored(1, c + 16, N * 4);
          _tile_stored(2, c + 16 * N, N * 4); _tile_stored(3, c + 16 * N + 16, N * 4);
          task_squares[t] += sum_of_squares(c, 32, 32, N);  // from L1, just stored
        }
    }
    _tile_release();
  });
  double squares = 0.0;  // summed in task order: the same at any thread count
  for (double v : task_squares) squares += v;
  return squares;
}

// RMSNorm of bf16 rows with a bf16 weight as F.rms_norm computes it: fp32 inside, x * rsqrt(mean(x^2)
// + eps) * w rounded once. x (..., D) any strides; returns (..., D) contiguous.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  auto xc = x.contiguous();
  const int64_t D = x.size(-1), N = x.numel() / D;
  auto out = torch::empty_like(xc);
  const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const at::BFloat16* xr = xp + n * D;
      float ss = 0.0f;
      for (int64_t j = 0; j < D; ++j) ss += float(xr[j]) * float(xr[j]);
      const float r = 1.0f / std::sqrt(ss / D + (float)eps);
      for (int64_t j = 0; j < D; ++j) op[n * D + j] = at::BFloat16(float(xr[j]) * r * float(wp[j]));
    }
  });
  return out;
}

// RoPE on interleaved pairs, exactly as moray.model.rope.apply_rope computes it: fp32 products,
// one rounding to bf16 (the extension is built without FMA contraction, so the bits match).
// x (B, h, T, D) bf16 and cos, sin (B, 1|h, T, D/2) float32, any strides. Returns (B, h, T, D).
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  const int64_t B = x.size(0), Hh = x.size(1), T = x.size(2), P = x.size(3) / 2;
  auto c = cos.expand({B, Hh, T, P}), s = sin.expand({B, Hh, T, P});
  auto out = torch::empty({B, Hh, T, 2 * P}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const auto xs = x.strides(), cs = c.strides(), ss = s.strides();
  at::parallel_for(0, B * Hh * T, 512, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (Hh * T), h = (row / T) % Hh, t = row % T;
      const at::BFloat16* xr = xp + b * xs[0] + h * xs[1] + t * xs[2];
      const float* cr = cp + b * cs[0] + h * cs[1] + t * cs[2];
      const float* sr = sp + b * ss[0] + h * ss[1] + t * ss[2];
      at::BFloat16* orow = op + row * 2 * P;
      for (int64_t p = 0; p < P; ++p) {
        const float x0 = xr[2 * p * xs[3]], x1 = xr[(2 * p + 1) * xs[3]];
        const float cc = cr[p * cs[3]], sn = sr[p * ss[3]];
        orow[2 * p] = at::BFloat16(x0 * cc - x1 * sn);
        orow[2 * p + 1] = at::BFloat16(x0 * sn + x1 * cc);
      }
    }
  });
  return out;
}

// The 16 horizontal sums of 16 vectors: lane j of the result is the sum of v[j]'s lanes, in 45
// shuffles and adds where 16 _mm512_reduce_add_ps would take about 10 each.
static inline __m512 sum16(__m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [a, b, c, d], each that lane's sum
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // lanes (0+1, 2+3) of two vectors
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

// exp of 16 floats (Cephes' expf: 2^n * e^f with |f| <= ln2/2, a degree-7 polynomial for e^f),
// within 2 ulp; inputs under -87 give 0, as a softmax over them rounds to.
static inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

static inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

static inline __m512 bf16x16(const uint16_t* x, __mmask16 m) {  // the first popcount(m) of 16, as fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x)), 16));
}

static inline __m512 bf16_load(const at::BFloat16* x) {  // 16 of them
  return bf16x16(reinterpret_cast<const uint16_t*>(x), 0xFFFF);
}
static inline void bf16_store(at::BFloat16* y, __m512 v) { _mm256_storeu_si256((__m256i*)y, (__m256i)_mm512_cvtneps_pbh(v)); }
static inline __m512 sigmoid16(__m512 x) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// The routed experts' activation in training, fp32 inside, each result rounded to bf16 once: PyTorch
// runs it as 3 ops forward and 8 backward over (P, I) bf16 tensors, each a pass through memory (44 ms
// of a bf16 step of the small preset; these 6).
// swiglu: h (P, 2I) = [gate | up] -> act (P, I) = silu(gate) * up.
torch::Tensor swiglu(torch::Tensor h) {
  const int64_t P = h.size(0), I = h.size(1) / 2;
  auto act = torch::empty({P, I}, h.options());
  const at::BFloat16* hp = h.data_ptr<at::BFloat16>();
  at::BFloat16* ap = act.data_ptr<at::BFloat16>();
  at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      for (int64_t i = 0; i < I; i += 16) {
        const __m512 g = bf16_load(hp + p * 2 * I + i), u = bf16_load(hp + p * 2 * I + I + i);
        bf16_store(ap + p * I + i, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), u));
      }
  });
  return act;
}

// swiglu's backward with the routing weights w (P,) of out = w * down(act), from grad_act = d out
// through down (P, I): d h (P, 2I) = w * grad_act * [up * silu'(gate) | silu(gate)], act * w (P, I) (the
// down projection's weight gradient takes it) and d w (P,) = <grad_act, act>.
std::vector<torch::Tensor> swiglu_backward(torch::Tensor grad_act, torch::Tensor h, torch::Tensor w) {
  const int64_t P = h.size(0), I = h.size(1) / 2;
  auto grad_h = torch::empty_like(h), act_w = torch::empty_like(grad_act);
  auto grad_w = torch::empty({P}, h.options().dtype(torch::kFloat32));
  const at::BFloat16 *hp = h.data_ptr<at::BFloat16>(), *gp = grad_act.data_ptr<at::BFloat16>(),
                     *wp = w.data_ptr<at::BFloat16>();
  at::BFloat16 *dhp = grad_h.data_ptr<at::BFloat16>(), *awp = act_w.data_ptr<at::BFloat16>();
  float* dwp = grad_w.data_ptr<float>();
  at::parallel_for(0, P, 64, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t p = begin; p < end; ++p) {
      const __m512 wv = _mm512_set1_ps(static_cast<float>(wp[p]));
      __m512 dot = _mm512_setzero_ps();
      for (int64_t i = 0; i < I; i += 16) {
        const __m512 g = bf16_load(hp + p * 2 * I + i), u = bf16_load(hp + p * 2 * I + I + i);
        const __m512 ga = bf16_load(gp + p * I + i), s = sigmoid16(g);
        const __m512 silu = _mm512_mul_ps(g, s), act = _mm512_mul_ps(silu, u), gw = _mm512_mul_ps(ga, wv);
        dot = _mm512_fmadd_ps(ga, act, dot);
        bf16_store(awp + p * I + i, _mm512_mul_ps(act, wv));
        bf16_store(dhp + p * 2 * I + I + i, _mm512_mul_ps(gw, silu));
        // silu'(g) = s * (1 + g * (1 - s))
        const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));
        bf16_store(dhp + p * 2 * I + i, _mm512_mul_ps(_mm512_mul_ps(gw, u), dsilu));
      }
      dwp[p] = _mm512_reduce_add_ps(dot);
    }
  });
  return {grad_h, act_w, grad_w.to(w.scalar_type())};
}

// The experts' combine: out[t] = sum over the rows r of token t of w[r] * rows[r], (N, H) bf16, summed in
// fp32 and rounded once (index_add_ in bf16 rounds after every row it adds, and the routing weights
// take a pass of their own). rows (P, H) bf16 contiguous, H a multiple of 16; w (P,) or empty (1s).
// Each task takes 64 columns of every row, so no two write the same output.
torch::Tensor combine_rows(torch::Tensor rows, torch::Tensor w, torch::Tensor token, int64_t N) {
  const int64_t P = rows.size(0), H = rows.size(1);
  auto out = torch::empty({N, H}, rows.options());
  auto tk = token.to(torch::kInt64).contiguous();
  const int64_t* tp = tk.data_ptr<int64_t>();
  for (int64_t r = 0; r < P; ++r) TORCH_CHECK(tp[r] >= 0 && tp[r] < N, "combine_rows: token ", tp[r], " out of range");
  auto wf = w.numel() ? w.to(torch::kFloat32).contiguous() : w;
  const float* wp = w.numel() ? wf.data_ptr<float>() : nullptr;
  const at::BFloat16* rp = rows.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t CB = 64, blocks = (H + CB - 1) / CB;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * CB, width = std::min(CB, H - c0);
      acc.assign(N * width, 0.f);
      for (int64_t r = 0; r < P; ++r) {
        const __m512 wv = _mm512_set1_ps(wp ? wp[r] : 1.0f);
        float* a = acc.data() + tp[r] * width;
        for (int64_t j = 0; j < width; j += 16)
          _mm512_storeu_ps(a + j, _mm512_fmadd_ps(wv, bf16_load(rp + r * H + c0 + j), _mm512_loadu_ps(a + j)));
      }
      for (int64_t t = 0; t < N; ++t)
        for (int64_t j = 0; j < width; j += 16) bf16_store(op + t * H + c0 + j, _mm512_loadu_ps(acc.data() + t * width + j));
    }
  });
  return out;
}

// RMSNorm in training, with an fp32 weight, as moray.model.norm.RMSNorm's PyTorch forms compute it:
// r = rsqrt(mean(x^2) + eps) in fp32, y = x * r rounded to x's dtype, out = w * y in fp32. PyTorch
// runs it as 6 ops forward and a dozen backward, each a pass over the rows (1.7 of the 2.2 ms a norm
// takes forward and backward on the small preset's 512 x 512 activations, 18 norms a step).
// x (N, D) fp32 or bf16 contiguous, D a multiple of 16; w (D,) fp32. Returns out (N, D) fp32, r (N,).
static inline __m512 load16(const float* x) { return _mm512_loadu_ps(x); }
static inline __m512 load16(const at::BFloat16* x) { return bf16_load(x); }
static inline __m512 round_to(const float*, __m512 v) { return v; }
static inline __m512 round_to(const at::BFloat16*, __m512 v) {  // v through bf16 and back
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}
static inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }
static inline void store16(at::BFloat16* y, __m512 v) { bf16_store(y, v); }

template <typename T>
static void rms_norm_rows(const T* xp, const float* wp, float* op, float* rp, int64_t N, int64_t D, float eps) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* x = xp + n * D;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t j = 0; j < D; j += 16) { const __m512 v = load16(x + j); ss = _mm512_fmadd_ps(v, v, ss); }
      const float r = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / D + eps);
      rp[n] = r;
      const __m512 rv = _mm512_set1_ps(r);
      for (int64_t j = 0; j < D; j += 16)
        _mm512_storeu_ps(op + n * D + j, _mm512_mul_ps(_mm512_loadu_ps(wp + j), round_to(x, _mm512_mul_ps(load16(x + j), rv))));
    }
  });
}

std::vector<torch::Tensor> rms_norm_train(torch::Tensor x, torch::Tensor w, double eps) {
  const int64_t D = x.size(-1), N = x.numel() / D;
  auto out = torch::empty(x.sizes(), x.options().dtype(torch::kFloat32));
  auto r = torch::empty({N}, out.options());
  if (x.scalar_type() == torch::kBFloat16)
    rms_norm_rows(x.data_ptr<at::BFloat16>(), w.data_ptr<float>(), out.data_ptr<float>(), r.data_ptr<float>(), N, D, (float)eps);
  else
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), r.data_ptr<float>(), N, D, (float)eps);
  return {out, r};
}

// Its backward from g = d out (N, D) fp32: with gy = g * w (rounded to x's dtype, as autograd's gradient
// of y is), grad_x = r * gy - x * r^3 * <gy, x> / D in x's dtype, and grad_w = the rows' sum of g * y.
// grad_w's rows are summed in fixed blocks of 64 and the blocks in order: the same bits at any thread count.
template <typename T>
static void rms_norm_backward_rows(const float* gp, const T* xp, const float* rp, const float* wp, T* dxp,
                                   float* partial, int64_t N, int64_t D) {
  const int64_t RB = 64;
  at::parallel_for(0, (N + RB - 1) / RB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* dw = partial + b * D;
      for (int64_t n = b * RB; n < std::min(N, (b + 1) * RB); ++n) {
        const T* x = xp + n * D;
        const float* g = gp + n * D;
        const __m512 rv = _mm512_set1_ps(rp[n]);
        __m512 dot = _mm512_setzero_ps();
        for (int64_t j = 0; j < D; j += 16) {
          const __m512 gv = _mm512_loadu_ps(g + j), xv = load16(x + j);
          const __m512 gy = round_to(x, _mm512_mul_ps(gv, _mm512_loadu_ps(wp + j)));
          dot = _mm512_fmadd_ps(gy, xv, dot);
          _mm512_storeu_ps(dw + j, _mm512_fmadd_ps(gv, round_to(x, _mm512_mul_ps(xv, rv)), _mm512_loadu_ps(dw + j)));
        }
        const float r = rp[n], c = r * r * r * _mm512_reduce_add_ps(dot) / D;
        const __m512 cv = _mm512_set1_ps(c);
        for (int64_t j = 0; j < D; j += 16) {
          const __m512 gy = round_to(x, _mm512_mul_ps(_mm512_loadu_ps(g + j), _mm512_loadu_ps(wp + j)));
          store16(dxp + n * D + j, _mm512_sub_ps(_mm512_mul_ps(rv, gy), _mm512_mul_ps(load16(x + j), cv)));
        }
      }
    }
  });
}

std::vector<torch::Tensor> rms_norm_train_backward(torch::Tensor g, torch::Tensor x, torch::Tensor r, torch::Tensor w) {
  const int64_t D = x.size(-1), N = x.numel() / D, blocks = (N + 63) / 64;
  auto grad_x = torch::empty_like(x);
  auto partial = torch::zeros({blocks, D}, g.options());
  if (x.scalar_type() == torch::kBFloat16)
    rms_norm_backward_rows(g.data_ptr<float>(), x.data_ptr<at::BFloat16>(), r.data_ptr<float>(), w.data_ptr<float>(),
                           grad_x.data_ptr<at::BFloat16>(), partial.data_ptr<float>(), N, D);
  else
    rms_norm_backward_rows(g.data_ptr<float>(), x.data_ptr<float>(), r.data_ptr<float>(), w.data_ptr<float>(),
                           grad_x.data_ptr<float>(), partial.data_ptr<float>(), N, D);
  auto grad_w = partial[0].clone();
  for (int64_t b = 1; b < blocks; ++b) grad_w.add_(partial[b]);
  return {grad_x, grad_w};
}

// fp32 -> bf16 as PyTorch rounds (to nearest even; its vectorized NaN, 0xFFFF), 16 at a time.
static inline __m256i bf16_rounded(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0xFFFF));
  return _mm512_cvtepi32_epi16(r);
}

// torch.optim.AdamW's step (decoupled weight decay, no amsgrad) on fp32 tensors, each parameter's
// bf16 working copy (moray.jobs.pretrain.working_weights) written in the same pass where `copies`
// holds one (an empty tensor: none). The copy is otherwise a pass of its own (reading the fp32
// weights again) every step. grad_scale divides the gradients on the way (the global clip's
// factor); the gradients themselves are left as they were. steps: each parameter's step count.
void adamw_step_(std::vector<torch::Tensor> params, std::vector<torch::Tensor> grads,
                 std::vector<torch::Tensor> exp_avgs, std::vector<torch::Tensor> exp_avg_sqs,
                 std::vector<torch::Tensor> copies, std::vector<double> steps, double lr, double beta1,
                 double beta2, double weight_decay, double eps, double grad_scale) {
  for (size_t t = 0; t < params.size(); ++t) {
    for (const auto& x : {params[t], grads[t], exp_avgs[t], exp_avg_sqs[t]})
      TORCH_CHECK(x.is_contiguous() && x.numel() == params[t].numel(), "adamw_step_: tensor ", t,
                  " and its gradient and state must be contiguous and of one size");
    float* p = params[t].data_ptr<float>();
    const float* g = grads[t].data_ptr<float>();
    float *m = exp_avgs[t].data_ptr<float>(), *v = exp_avg_sqs[t].data_ptr<float>();
    uint16_t* c = copies[t].numel() ? reinterpret_cast<uint16_t*>(copies[t].data_ptr<at::BFloat16>()) : nullptr;
    const int64_t n = params[t].numel();
    const double bc1 = 1 - std::pow(beta1, steps[t]), bc2 = 1 - std::pow(beta2, steps[t]);
    // torch's coefficients: in double, then rounded to float
    const float step_size = lr / bc1, bc2_sqrt = std::sqrt(bc2), keep = 1 - lr * weight_decay,
                b1c = 1 - beta1, b2 = beta2, b2c = 1 - beta2, epsf = eps, gs = grad_scale;
    at::parallel_for(0, (n + 15) / 16, 1024, [&](int64_t begin, int64_t end) {
      const __m512 vb1c = _mm512_set1_ps(b1c), vb2 = _mm512_set1_ps(b2),
                   vb2c = _mm512_set1_ps(b2c), vkeep = _mm512_set1_ps(keep), vss = _mm512_set1_ps(step_size),
                   vbc2 = _mm512_set1_ps(bc2_sqrt), veps = _mm512_set1_ps(epsf), vgs = _mm512_set1_ps(gs);
      for (int64_t i = begin * 16; i < std::min(n, end * 16); i += 16) {
        const __mmask16 k = first(n - i);
        __m512 gi = _mm512_maskz_loadu_ps(k, g + i), pi = _mm512_maskz_loadu_ps(k, p + i);
        if (gs != 1.0f) gi = _mm512_div_ps(gi, vgs);
        // torch's fused kernel op for op: m.lerp_(g, 1 - beta1) (an FMA), v * beta2 + (1 - beta2) * g * g
        if (keep != 1.0f) pi = _mm512_mul_ps(pi, vkeep);
        const __m512 m0 = _mm512_maskz_loadu_ps(k, m + i);
        const __m512 mi = _mm512_fmadd_ps(vb1c, _mm512_sub_ps(gi, m0), m0);
        const __m512 vi = _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + i), vb2),
                                        _mm512_mul_ps(_mm512_mul_ps(vb2c, gi), gi));
        const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), vbc2), veps);
        pi = _mm512_sub_ps(pi, _mm512_div_ps(_mm512_mul_ps(vss, mi), denom));
        _mm512_mask_storeu_ps(p + i, k, pi);
        _mm512_mask_storeu_ps(m + i, k, mi);
        _mm512_mask_storeu_ps(v + i, k, vi);
        if (c) _mm256_mask_storeu_epi16(c + i, k, bf16_rounded(pi));
      }
    });
  }
}

// torch.argmax(x, dim=-1) of bf16 logits (N, V), the last dimension contiguous: the first index of
// each row's maximum, a NaN counting as the maximum (the first NaN wins). One vector pass finds the
// maximum, a second the first index holding it, from L2 (PyTorch's CPU argmax compares one element
// at a time: 470 us for 8 rows of 32000, 1.9 ms for 32).
static int64_t argmax_row(const uint16_t* x, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 m = first(V - j);
    const __m512 v = bf16x16(x + j, m);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    mx = _mm512_mask_max_ps(mx, m, mx, v);
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 m = first(V - j);
    const __m512 v = bf16x16(x + j, m);
    const __mmask16 hit = nan ? _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q) : _mm512_mask_cmp_ps_mask(m, v, best, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  return 0;  // not reached: the maximum is in the row
}

torch::Tensor argmax_rows(torch::Tensor x) {
  const int64_t N = x.size(0), V = x.size(1), rs = x.stride(0);
  auto out = torch::empty({N}, x.options().dtype(torch::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) op[n] = argmax_row(xp + n * rs, V);
  });
  return out;
}

// scores[s] = scale * q . kv[s] + mask[s] for one query row of D bf16 (D a multiple of 32 up to
// 2048) against S keys (row stride ks), keys from s0 on: 16 keys at a time, whose 16 dot products
// accumulate side by side and `sum16` reduces to one vector, then the last keys one at a time.
static void row_scores(const at::BFloat16* q, const at::BFloat16* kv, int64_t s0, int64_t S, int64_t ks, int64_t D,
                       const float* mask, float scale, float* scores) {
  const int64_t chunks = D / 32;
  __m512bh qv[64];
  for (int64_t k = 0; k < chunks; ++k) qv[k] = (__m512bh)_mm512_loadu_si512((const void*)(q + 32 * k));
  int64_t s = s0;
  for (; s + 16 <= S; s += 16) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < chunks; ++k)
      for (int j = 0; j < 16; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)_mm512_loadu_si512((const void*)(kv + (s + j) * ks + 32 * k)), qv[k]);
    __m512 v = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
    if (mask) v = _mm512_add_ps(v, _mm512_loadu_ps(mask + s));
    _mm512_storeu_ps(scores + s, v);
  }
  for (; s < S; ++s) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < chunks; ++k)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void*)(kv + s * ks + 32 * k)), qv[k]);
    scores[s] = _mm512_reduce_add_ps(acc) * scale + (mask ? mask[s] : 0.0f);
  }
}

// The scores of up to 16 query rows on AMX tiles, 16 keys at a time: C (16 keys x 16 rows) += the
// keys (16 x 32, read in place from the cache) . the rows (laid out once in the tiles' VNNI form).
// Returns the first key left to `row_scores` (the last S % 16).
static int64_t amx_scores(const at::BFloat16* q, int64_t m, const at::BFloat16* kv, int64_t S, int64_t ks, int64_t D,
                          const float* const* masks, float scale, float* scores) {
  const int64_t chunks = D / 32;
  std::vector<uint16_t> qt(chunks * 512, 0);  // chunk c: 16 k pairs x 16 rows x 2
  const uint16_t* qs = reinterpret_cast<const uint16_t*>(q);
  for (int64_t i = 0; i < m; ++i) vnni_column(qs + i * D, D, i, qt.data());
  configure_tiles();
  alignas(64) float c[16][16];
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    _tile_zero(2);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      _tile_loadd(0, kv + s * ks + ch * 32, ks * 2);
      _tile_loadd(1, qt.data() + ch * 512, 64);
      _tile_dpbf16ps(2, 0, 1);
    }
    _tile_stored(2, c, 64);
    for (int64_t i = 0; i < m; ++i)
      for (int j = 0; j < 16; ++j) scores[i * S + s + j] = c[j][i] * scale + (masks[i] ? masks[i][s + j] : 0.0f);
  }
  _tile_release();
  return s;
}

// softmax of S fp32 scores in place
static void softmax_row(float* x, int64_t S) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t s = 0; s < S; s += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first(S - s), x + s));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 k = first(S - s);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + s), top));
    _mm512_mask_storeu_ps(x + s, k, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(k, e));
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t s = 0; s < S; s += 16) {
    const __mmask16 k = first(S - s);
    _mm512_mask_storeu_ps(x + s, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + s), inv));
  }
}

// o[i, :C] = sum_s p[i][s] * kv[s, :C] for up to 4 rows of probabilities (row i at p + i * S):
// 4 rows by up to 64 columns of accumulators in registers, each key's slice converted from bf16
// once for the 4 rows. C a multiple of 16.
static void values_rows(const float* p, int64_t m, const at::BFloat16* kv, int64_t S, int64_t ks, int64_t C, float* o) {
  const float* prow[4];
  for (int i = 0; i < 4; ++i) prow[i] = p + std::min<int64_t>(i, m - 1) * S;  // spare rows repeat the last
  for (int64_t c0 = 0; c0 < C; c0 += 64) {
    const int64_t n = std::min<int64_t>(64, C - c0) / 16;
    __m512 acc[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; ++s) {
      const at::BFloat16* vrow = kv + s * ks + c0;
      __m512 v[4];
      for (int j = 0; j < 4; ++j)  // bf16 -> fp32: the 16 bits become the high half of each 32-bit lane
        if (j < n) v[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(vrow + 16 * j))), 16));
      for (int i = 0; i < 4; ++i) {
        const __m512 pv = _mm512_set1_ps(prow[i][s]);
        for (int j = 0; j < 4; ++j)
          if (j < n) acc[i][j] = _mm512_fmadd_ps(pv, v[j], acc[i][j]);
      }
    }
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) _mm512_storeu_ps(o + i * C + c0 + 16 * j, acc[i][j]);
  }
}

// The attention of up to 16 query rows of one batch row over its cached latents, all in fp32:
//   o[i, :C] = softmax_s(scale * q[i] . kv[s] + mask_i[s]) @ kv[s, :C]
// q: m rows of D bf16 (row i at q + i * D), D a multiple of 32 up to 2048; kv: S rows, row stride ks,
// unit stride inside a row; masks[i]: row i's S additive values, or null; C a multiple of 16.
// scores: scratch for m * S floats; o: m rows of C floats.
static void attend_rows(const at::BFloat16* q, int64_t m, const at::BFloat16* kv, int64_t S, int64_t ks, int64_t D,
                        const float* const* masks, float scale, int64_t C, float* scores, float* o) {
  const int64_t rest = use_amx(-1) ? amx_scores(q, m, kv, S, ks, D, masks, scale, scores) : 0;
  for (int64_t i = 0; i < m; ++i) {
    row_scores(q + i * D, kv, rest, S, ks, D, masks[i], scale, scores + i * S);
    softmax_row(scores + i * S, S);
  }
  for (int64_t i = 0; i < m; i += 4) values_rows(scores + i * S, std::min<int64_t>(4, m - i), kv, S, ks, C, o + i * C);
}

// y[:N] = x[:K] @ W (K, N) fp32 row-major with row stride ldw, rounded to bf16 (N a multiple of 16).
static void row_times_matrix_bf16(const float* x, int64_t K, const float* W, int64_t ldw, int64_t N, at::BFloat16* y) {
  for (int64_t n0 = 0; n0 < N; n0 += 128) {
    const int64_t nv = std::min<int64_t>(128, N - n0) / 16;
    __m512 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m512 xk = _mm512_set1_ps(x[k]);
      for (int j = 0; j < 8; ++j)
        if (j < nv) acc[j] = _mm512_fmadd_ps(xk, _mm512_loadu_ps(W + k * ldw + n0 + 16 * j), acc[j]);
    }
    for (int j = 0; j < 8; ++j)
      if (j < nv) _mm256_storeu_si256((__m256i*)(y + n0 + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[j]));
  }
}

// The additive mask (B, 1, T, S) as the kernels read it: (B, T, S) float32 contiguous (or empty).
static torch::Tensor mask_rows(const torch::Tensor& mask) {
  return mask.numel() > 0 ? mask.select(1, 0).to(torch::kFloat32).contiguous() : mask;
}

// Query rows per task: 16 (a whole AMX tile of them) where that still leaves every thread a task, else 4.
static int64_t rows_per_task(int64_t batch_rows, int64_t rows) {
  return batch_rows * ((rows + 15) / 16) >= at::get_num_threads() ? 16 : 4;
}

// softmax(scale * q . kv + mask) @ kv[..., :C]: (B, R, C) float32, the scores and softmax in fp32.
// q (B, R, D) bf16: R query rows (heads x new tokens, row r is token r % T); kv (B, S, D) bf16, any
// batch and row strides; mask (B, 1, T, S) additive (any float dtype) or empty. A task is up to 16
// rows of one batch row (`rows_per_task`).
torch::Tensor latent_attention(torch::Tensor q, torch::Tensor kv, torch::Tensor mask, double scale, int64_t C) {
  const int64_t B = q.size(0), R = q.size(1), D = q.size(2), S = kv.size(1);
  TORCH_CHECK(D % 32 == 0 && D <= 2048 && C % 16 == 0, "latent_attention: widths ", D, " and ", C);
  auto qc = q.contiguous();
  auto mk = mask_rows(mask);  // (B, T, S)
  const int64_t T = mask.numel() > 0 ? mk.size(1) : 1, RB = rows_per_task(B, R), blocks = (R + RB - 1) / RB;
  auto out = torch::empty({B, R, C}, torch::dtype(torch::kFloat32));
  const at::BFloat16* qp = qc.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = kv.data_ptr<at::BFloat16>();
  const float* mp = mask.numel() > 0 ? mk.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(RB * S);
    const float* masks[16];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks, r0 = (t % blocks) * RB, m = std::min<int64_t>(RB, R - r0);
      for (int64_t i = 0; i < m; ++i) masks[i] = mp ? mp + (b * T + (r0 + i) % T) * S : nullptr;
      attend_rows(qp + (b * R + r0) * D, m, kp + b * kv.stride(0), S, kv.stride(1), D, masks, (float)scale, C,
                  scores.data(), op + (b * R + r0) * C);
    }
  });
  return out;
}

// MLA's whole absorbed decode attention for a layer, from the heads' queries to their outputs:
//   q = [q_nope @ W_UK | q_pe] (rounded to bf16), o_lat = attend_rows(q), out = o_lat @ W_UV
// q_nope (B, H, T, dn) and q_pe (B, H, T, r) bf16, any strides; kv (B, S, c + r) the cached latents;
// mask as latent_attention's; w_uk (H, dn, c) and w_uv_t (H, c, dv) float32 contiguous, c and dv
// multiples of 16. Returns (B, T, H, dv) bf16: the layout o_proj reads. A task is up to 16 heads of one
// token, from their queries to their outputs in fp32 (no PyTorch op between the steps).
torch::Tensor absorbed_attention(torch::Tensor q_nope, torch::Tensor q_pe, torch::Tensor kv, torch::Tensor mask,
                                 torch::Tensor w_uk, torch::Tensor w_uv_t, double scale) {
  const int64_t B = q_nope.size(0), H = q_nope.size(1), T = q_nope.size(2), dn = q_nope.size(3);
  const int64_t c = w_uk.size(2), r = q_pe.size(3), dv = w_uv_t.size(2), D = c + r, S = kv.size(1);
  TORCH_CHECK(D % 32 == 0 && D <= 2048 && c % 16 == 0 && dv % 16 == 0, "absorbed_attention: widths ", c, ", ", r,
              " and ", dv);
  auto mk = mask_rows(mask);  // (B, T, S)
  auto out = torch::empty({B, T, H, dv}, q_pe.options());
  const at::BFloat16* qn = q_nope.data_ptr<at::BFloat16>();
  const at::BFloat16* qr = q_pe.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = kv.data_ptr<at::BFloat16>();
  const float* mp = mask.numel() > 0 ? mk.data_ptr<float>() : nullptr;
  const float* uk = w_uk.data_ptr<float>();
  const float* uv = w_uv_t.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const auto ns = q_nope.strides(), rs = q_pe.strides();
  const int64_t HB = rows_per_task(B * T, H), blocks = (H + HB - 1) / HB;
  at::parallel_for(0, B * T * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(HB * S), x(HB * std::max(dn, c));
    std::vector<at::BFloat16> qrows(HB * D);
    const float* masks[16];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (T * blocks), t = (task / blocks) % T, h0 = (task % blocks) * HB;
      const int64_t m = std::min<int64_t>(HB, H - h0);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t h = h0 + i;
        const at::BFloat16* qrow = qn + b * ns[0] + h * ns[1] + t * ns[2];
        for (int64_t d = 0; d < dn; ++d) x[d] = float(qrow[d * ns[3]]);
        row_times_matrix_bf16(x.data(), dn, uk + h * dn * c, c, c, qrows.data() + i * D);
        const at::BFloat16* prow = qr + b * rs[0] + h * rs[1] + t * rs[2];
        for (int64_t j = 0; j < r; ++j) qrows[i * D + c + j] = prow[j * rs[3]];
        masks[i] = mp ? mp + (b * T + t) * S : nullptr;
      }
      attend_rows(qrows.data(), m, kp + b * kv.stride(0), S, kv.stride(1), D, masks, (float)scale, c, scores.data(),
                  x.data());
      for (int64_t i = 0; i < m; ++i)
        row_times_matrix_bf16(x.data() + i * c, c, uv + (h0 + i) * c * dv, dv, dv, op + ((b * T + t) * H + h0 + i) * dv);
    }
  });
  return out;
}
"""

_kernel = None
_tried = False


def builds_here() -> bool:
    """Whether this CPU has what moray's kernels need (AVX-512 BF16); `kernel()` compiles them."""
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
        if builds_here():
            try:
                from torch.utils.cpp_extension import load_inline

                _kernel = load_inline(
                    "moray_cpu_kernels",
                    cpp_sources=_SOURCE,
                    functions=[
                        "hit_experts_ffn",
                        "few_rows_linear",
                        "rms_norm",
                        "rope",
                        "latent_attention",
                        "absorbed_attention",
                        "use_amx",
                        "argmax_rows",
                        "grouped_outer_into",
                        "swiglu",
                        "swiglu_backward",
                        "adamw_step_",
                        "combine_rows",
                        "rms_norm_train",
                        "rms_norm_train_backward",
                        "grouped_rows_linear",
                    ],
                    # no FMA contraction: `rope` must round as PyTorch's separate products do
                    extra_cflags=[
                        "-O3",
                        "-mavx512f",
                        "-mavx512bw",
                        "-mavx512vl",
                        "-mavx512bf16",
                        "-mamx-tile",
                        "-mamx-bf16",
                        "-fopenmp",
                        "-ffp-contract=off",
                    ],
                )
            except Exception as e:  # no compiler, or the build failed: PyTorch's products instead
                warnings.warn(
                    f"moray's expert decode kernel did not build ({e}); using PyTorch's products",
                    stacklevel=2,
                )
    return _kernel


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _runs_here(*tensors: torch.Tensor | None) -> bool:
    """Whether the extension is built and these are plain CPU tensors (parameters included): the
    kernels read raw memory, which a DTensor (tensor parallelism) or another subclass does not have."""
    for t in tensors:  # a loop, not all(...): this runs a few dozen times a decode step
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu):
            return False
    return kernel() is not None


def _inference_here(*tensors: torch.Tensor | None) -> bool:
    """`_runs_here` without autograd: the kernels have no backward."""
    return not torch.is_grad_enabled() and _runs_here(*tensors)


def usable(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> bool:
    """Whether the kernel takes these stacks: bf16 on the CPU, both inner sizes multiples of 32."""
    H, I = gate_up_proj.shape[-1], down_proj.shape[-1]  # noqa: E741
    ok = gate_up_proj.dtype == down_proj.dtype == torch.bfloat16 and H % 32 == 0 and I % 32 == 0
    return ok and _runs_here(gate_up_proj, down_proj)


def attention_usable(q_pe: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, c: int) -> bool:
    """Whether the attention kernels take these: bf16 CPU inference, the keys' width a multiple of 32
    and the latent's of 16, one mask for all heads (no per-head relative biases)."""
    ok = q_pe.dtype == keys.dtype == torch.bfloat16 and keys.shape[-1] % 32 == 0 and c % 16 == 0
    ok = ok and keys.stride(-1) == 1 and (mask is None or mask.shape[1] == 1)
    return ok and _inference_here(q_pe, keys, mask)


_NO_MASK = torch.empty(0)


def latent_attention(
    q: torch.Tensor,  # (B, R, D) R query rows: heads x T new tokens, row r is token r % T
    keys: torch.Tensor,  # (B, S, D) the cached [c_kv | k_pe]; any batch and row strides
    mask: torch.Tensor | None,  # (B, 1, T, S) additive, or None
    scale: float,
    c: int,  # the latent's width: values are keys[..., :c]
) -> torch.Tensor:
    """softmax(scale * q . keys + mask) @ keys[..., :c]: (B, R, c) float32. Scores and softmax in fp32;
    the keys are read in place (no copy of the cache slice)."""
    return kernel().latent_attention(q, keys, _NO_MASK if mask is None else mask, scale, c)


def absorbed_attention(
    q_nope: torch.Tensor,  # (B, H, T, dn)
    q_pe: torch.Tensor,  # (B, H, T, r), rotated
    keys: torch.Tensor,  # (B, S, c + r) the cached [c_kv | k_pe]
    mask: torch.Tensor | None,  # (B, 1, T, S) additive, or None
    w_uk: torch.Tensor,  # (H, dn, c) float32
    w_uv_t: torch.Tensor,  # (H, c, dv) float32
    scale: float,
) -> torch.Tensor:
    """MLA's absorbed attention in one call: the W_UK and W_UV products in fp32 around
    `latent_attention`. (B, T, H, dv) bf16, the layout the output projection reads."""
    return kernel().absorbed_attention(
        q_nope, q_pe, keys, _NO_MASK if mask is None else mask, w_uk, w_uv_t, scale
    )


def rope_usable(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether `rope` takes these: bf16 on the CPU without autograd, fp32 angles."""
    return x.dtype == torch.bfloat16 and cos.dtype == torch.float32 and _inference_here(x, cos)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """moray.model.rope.apply_rope in one call, bit for bit (14 PyTorch ops otherwise)."""
    return kernel().rope(x, cos, sin)


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
    if keep is not None:
        weights = weights * keep
    return kernel().hit_experts_ffn(x, experts, weights, gate_up_proj.contiguous(), down_proj.contiguous())


def norm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` takes these: bf16 rows and weight on the CPU, without autograd."""
    return x.dtype == weight.dtype == torch.bfloat16 and _inference_here(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension in one call (PyTorch's CPU form runs a dozen ops)."""
    return kernel().rms_norm(x, weight, eps)


def norm_train_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm_train` takes these: fp32 or bf16 rows with an fp32 weight on the CPU, the
    width a multiple of 16 (training: the kernels have a backward)."""
    ok = (
        x.dtype in (torch.float32, torch.bfloat16) and weight.dtype == torch.float32 and x.shape[-1] % 16 == 0
    )
    return ok and _runs_here(x, weight)


def rms_norm_train(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w * round_to_x_dtype(x * r) in fp32 (..., D), r (N,)) for contiguous x, r = rsqrt(mean(x^2) + eps)."""
    return tuple(kernel().rms_norm_train(x, weight, eps))


def rms_norm_train_backward(
    grad_out: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_train`'s (grad_x in x's dtype, grad_weight fp32) from the output's fp32 gradient."""
    return tuple(kernel().rms_norm_train_backward(grad_out.contiguous(), x, r, weight))


_amx: bool | None = None


def amx() -> bool:
    """Whether the experts' and linears' products run on AMX tiles (Intel Sapphire Rapids and later);
    elsewhere they run the AVX-512 BF16 loop."""
    global _amx
    if _amx is None:
        _amx = kernel() is not None and kernel().use_amx(-1)
    return _amx


def set_amx(on: bool) -> bool:
    """Turn the AMX products off (or back on where the CPU has them), to compare the two paths.
    Returns whether AMX runs now."""
    global _amx
    _amx = kernel() is not None and kernel().use_amx(int(on))
    return _amx


# Rows x weight values up to which the AVX-512 `few_rows_linear` beats oneDNN's blocked product, measured
# with the weights coming from memory on an Intel Xeon (Sapphire Rapids, whose oneDNN uses AMX): at 1
# row every weight but the output head (512x512: 33 us against 61); at 8 rows up to 512x512 (49
# against 58; 768x512: 81 against 69), where its dot products become the bound.
FEW_ROWS_VALUES = 8 * 512 * 512
# Rows up to which the AMX `few_rows_linear` beats oneDNN at about any weight size: the products stay bound
# by reading the weight (8 rows of the 32000x512 head: 1.8 ms against 2.0; 768x512: 56 us against 71).
AMX_ROWS = 16


def linear_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `few_rows_linear` takes these and beats oneDNN: bf16 CPU inference, an inner size that
    is a multiple of 32, and few rows (AMX_ROWS, with output sizes a multiple of 16) or a small
    product (FEW_ROWS_VALUES)."""
    rows = x.numel() // x.shape[-1]
    if weight.dtype != torch.bfloat16 or weight.shape[1] % 32 or not _inference_here(x, weight):
        return False
    few = rows * weight.numel() <= FEW_ROWS_VALUES
    return few or (rows <= AMX_ROWS and weight.shape[0] % 16 == 0 and amx())


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ weight (O, K).T in bf16 with fp32 accumulation: (..., O)."""
    return kernel().few_rows_linear(x, weight)


def argmax_usable(logits: torch.Tensor) -> bool:
    """Whether `argmax` takes these: bf16 rows (N, V) on the CPU, the last dimension contiguous."""
    return (
        logits.dtype == torch.bfloat16 and logits.dim() == 2 and logits.stride(-1) == 1
        and _runs_here(logits)
    )  # fmt: skip


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(dim=-1), the same indices (first maximum; NaN the maximum) at memory speed."""
    return kernel().argmax_rows(logits)


def outer_usable(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `grouped_outer_into` takes these: AMX, bf16 rows (., M) and (., N) into a contiguous
    fp32 (E, M, N), M and N multiples of 32."""
    ok = a.dtype == b.dtype == torch.bfloat16 and out.dtype == torch.float32 and out.dim() == 3
    ok = ok and out.is_contiguous() and out.shape[1] % 32 == 0 and out.shape[2] % 32 == 0
    ok = ok and a.dim() == b.dim() == 2 and (a.shape[1], b.shape[1]) == tuple(out.shape[1:])
    return ok and _runs_here(out, a, b) and amx()


@dataclass
class OuterSegment:
    """One micro-batch's operands of `grouped_outer_into`: `counts[e]` rows for each expert in turn, the
    i-th being row a_rows[i] of `a` and row b_rows[i] of `b` (None: row i)."""

    a: torch.Tensor  # (., M) bf16
    b: torch.Tensor  # (., N) bf16
    counts: torch.Tensor  # (E,)
    a_rows: torch.Tensor | None = None  # (P,) int64
    b_rows: torch.Tensor | None = None  # (P,) int64

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


def grouped_outer_into(out: torch.Tensor, segments: list[OuterSegment], accumulate: bool) -> float:
    """out[e] = (out[e] if accumulate else 0) + sum over the segments of a_e.T @ b_e, accumulated in
    fp32: moray.model.experts.grouped_outer for several micro-batches at once. Returns the sum of
    squares of the new out."""

    def index(rows: torch.Tensor | None) -> torch.Tensor:
        return _NO_ROWS if rows is None else rows.to(torch.int64).contiguous()

    return kernel().grouped_outer_into(
        out, [s.a.contiguous() for s in segments], [s.b.contiguous() for s in segments],
        [s.counts for s in segments], [index(s.a_rows) for s in segments], [index(s.b_rows) for s in segments],
        accumulate,
    )  # fmt: skip


_NO_ROWS = torch.empty(0, dtype=torch.int64)


# Rows per expert up to which `grouped_rows_linear` beats oneDNN's bmm (64 experts, 512 x 512 and 512 x 256,
# weights from memory, gather included): 3.1 against 4.2 ms at 60 rows, 4.1 against 5.3 at 128; at 256
# one stack is faster and the other slower, and prefill's thousands of rows outgrow its blocking.
ROWS_LINEAR_ROWS_PER_EXPERT = 128


def rows_linear_usable(x: torch.Tensor, weight: torch.Tensor, rows: int) -> bool:
    """Whether `grouped_rows_linear` takes these, for `rows` rows in all: bf16 rows and (E, O, K)
    weights, contiguous on the CPU, K a multiple of 32 and O of 16, at most ROWS_LINEAR_ROWS_PER_EXPERT
    rows per expert on average, where the CPU has AMX."""
    ok = x.dtype == weight.dtype == torch.bfloat16 and x.dim() == 2 and weight.dim() == 3
    ok = ok and rows <= ROWS_LINEAR_ROWS_PER_EXPERT * weight.shape[0]
    ok = (
        ok
        and x.is_contiguous()
        and weight.is_contiguous()
        and x.shape[1] % 32 == 0
        and weight.shape[1] % 16 == 0
    )
    return ok and _runs_here(x, weight) and amx()


def grouped_rows_linear(
    x: torch.Tensor, rows: torch.Tensor | None, weight: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """x[rows] (P, K) (rows None: x as it is), grouped by `counts` (E,), each times its group's
    weight (E, O, K).T: (P, O) bf16."""
    if rows is not None and rows.numel() == 0:  # no pairs (every one dropped): the kernel's empty index
        return x.new_empty((0, weight.shape[1]))  # would read x's rows in order
    rows = _NO_ROWS if rows is None else rows.to(torch.int64).contiguous()
    return kernel().grouped_rows_linear(x, rows, weight, counts)


def swiglu_usable(h: torch.Tensor) -> bool:
    """Whether `swiglu` and `swiglu_backward` take these [gate | up] rows: bf16 (P, 2I) contiguous on
    the CPU, I a multiple of 16."""
    ok = h.dtype == torch.bfloat16 and h.dim() == 2 and h.is_contiguous() and h.shape[1] % 32 == 0
    return ok and _runs_here(h)


def combine_usable(rows: torch.Tensor) -> bool:
    """Whether `combine_rows` takes these rows: bf16 (P, H) contiguous on the CPU, H a multiple of 16."""
    ok = rows.dtype == torch.bfloat16 and rows.dim() == 2 and rows.is_contiguous() and rows.shape[1] % 16 == 0
    return ok and _runs_here(rows)


def combine_rows(
    rows: torch.Tensor, weights: torch.Tensor | None, token_of_row: torch.Tensor, n: int
) -> torch.Tensor:
    """(n, H): each token's rows (rows (P, H), token_of_row (P,)) times their weights (P,) or 1, summed
    in fp32, rounded to bf16 once."""
    return kernel().combine_rows(rows, _NO_MASK if weights is None else weights, token_of_row, n)


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of h = [gate | up] (P, 2I): (P, I), rounded once."""
    return kernel().swiglu(h)


def swiglu_backward(
    grad_act: torch.Tensor, h: torch.Tensor, row_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For out = w * down(silu(gate) * up): (d h (P, 2I), act * w (P, I), d w (P,)) from grad_act
    (P, I), the gradient through down before the weights."""
    return tuple(kernel().swiglu_backward(grad_act.contiguous(), h, row_weights.contiguous()))


def adamw_usable(*tensors: torch.Tensor) -> bool:
    """Whether `adamw_step_` takes these: contiguous fp32 CPU tensors."""
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and _runs_here(*tensors)


def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, beta1, beta2, weight_decay, eps,
                grad_scale=1.0) -> None:  # fmt: skip
    """torch.optim.AdamW's update in place, each parameter's bf16 copy (`copies`: a tensor or None)
    rounded from its new value in the same pass."""
    copies = [_NO_MASK if c is None else c for c in copies]
    kernel().adamw_step_(params, grads, exp_avgs, exp_avg_sqs, copies, steps, lr, beta1, beta2, weight_decay, eps,
                         grad_scale)  # fmt: skip
