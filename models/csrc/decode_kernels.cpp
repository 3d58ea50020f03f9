// Fused Mamba-2 decode step for CPU (fp32): causal conv, selective-state update, gated group
// RMSNorm for T tokens per sequence, state updated in place. The eager PyTorch path spends ~35
// small ops per layer per step on this; at decode batch sizes their dispatch cost, not arithmetic,
// sets the speed. Numerics follow the eager path (models/fast_nemotron_h.py) op for op.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// exp(x) in float with no calls or branches, so loops over it vectorize: Cephes' expf
// (Cody-Waite reduction by ln 2, degree-6 polynomial, 2^n from the exponent bits), within 2 ulp of
// std::exp over [-87, 88]; inputs outside are clamped (exp(-inf) gives 1e-38, not 0).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;  // round(x / ln2)
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float silu(float v) { return v / (1.0f + fast_exp(-v)); }

inline float softplus(float v) { return v > 20.0f ? v : std::log1p(std::exp(v)); }

struct Dims {
  int64_t B, T, F, C, K, H, P, N, G, d_inner, norm_group;
};

// One sequence: T positions after the state of `slot`; y_out (T, d_inner).
void run_row(const Dims& d, const float* zx, float* conv, float* ssm, const float* conv_w,
             const float* conv_b, const float* dt_bias, const float* A_log, const float* Dv,
             const float* norm_w, float dt_min, float eps, float* y_out, float* conv_hist,
             float* ssm_hist) {
  const int64_t k1 = d.K - 1, rep = d.H / d.G, state_size = d.H * d.P * d.N;
  std::vector<float> act(d.C), y(d.d_inner);
  for (int64_t t = 0; t < d.T; ++t) {
    const float* row = zx + t * d.F;
    const float* gate = row;
    const float* xbc = row + d.d_inner;
    const float* dt_raw = row + d.d_inner + d.C;
    for (int64_t c = 0; c < d.C; ++c) {  // depthwise causal conv over [state, new input]
      float* window = conv + c * k1;
      const float* w = conv_w + c * d.K;
      float acc = 0.0f;
      for (int64_t k = 0; k < k1; ++k) acc += window[k] * w[k];
      acc += xbc[c] * w[k1];
      act[c] = conv_b ? acc + conv_b[c] : acc;
      for (int64_t k = 0; k + 1 < k1; ++k) window[k] = window[k + 1];
      if (k1 > 0) window[k1 - 1] = xbc[c];
    }
    float* a = act.data();
#pragma omp simd
    for (int64_t c = 0; c < d.C; ++c) a[c] = silu(a[c]);
    const float* xs = act.data();
    const float* Bm = xs + d.d_inner;
    const float* Cm = Bm + d.G * d.N;
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t g = h / rep;
      float dt = softplus(dt_raw[h] + dt_bias[h]);
      dt = dt < dt_min ? dt_min : dt;
      const float dA = std::exp(dt * -std::exp(A_log[h]));
      const float* b = Bm + g * d.N;
      const float* cc = Cm + g * d.N;
      for (int64_t p = 0; p < d.P; ++p) {
        const float x = xs[h * d.P + p];
        const float dx = dt * x;
        float* st = ssm + (h * d.P + p) * d.N;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < d.N; ++n) {
          st[n] = st[n] * dA + dx * b[n];
          acc += st[n] * cc[n];
        }
        y[h * d.P + p] = acc + Dv[h] * x;
      }
    }
    if (conv_hist) std::copy(conv, conv + d.C * k1, conv_hist + t * d.C * k1);
    if (ssm_hist) std::copy(ssm, ssm + state_size, ssm_hist + t * state_size);
    float* out = y_out + t * d.d_inner;
    float* yy = y.data();
#pragma omp simd
    for (int64_t i = 0; i < d.d_inner; ++i) yy[i] *= silu(gate[i]);
    for (int64_t start = 0; start < d.d_inner; start += d.norm_group) {
      float sq = 0.0f;
      for (int64_t i = start; i < start + d.norm_group; ++i) sq += y[i] * y[i];
      const float scale = 1.0f / std::sqrt(sq / d.norm_group + eps);
      for (int64_t i = start; i < start + d.norm_group; ++i) out[i] = norm_w[i] * (y[i] * scale);
    }
  }
}

// Every slot id names a row of a state with `rows` rows: a bad id would write outside it.
void check_slots(const int64_t* sp, int64_t n, int64_t rows, const char* who) {
  for (int64_t b = 0; b < n; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < rows, who, ": slot ", sp[b], " is outside the state's ", rows, " slots");
  }
}

}  // namespace

// zxbcdt (B, T, d_inner + C + H) = [gate | xBC | dt]; conv_state (S, C, K-1); ssm_state
// (S, H, P, N); slots (B,). Returns [y (B, T, d_inner)] and, with `record`, the state after every
// position: conv (B, T, C, K-1) and ssm (B, T, H, P, N), for speculative rollback.
std::vector<torch::Tensor> mamba_decode(torch::Tensor zxbcdt, torch::Tensor conv_state,
                                        torch::Tensor ssm_state, torch::Tensor slots,
                                        torch::Tensor conv_w, c10::optional<torch::Tensor> conv_b,
                                        torch::Tensor dt_bias, torch::Tensor A_log, torch::Tensor Dv,
                                        torch::Tensor norm_w, int64_t groups, int64_t norm_group,
                                        double dt_min, double eps, bool record) {
  for (const auto& t : {zxbcdt, conv_state, ssm_state, conv_w, dt_bias, A_log, Dv, norm_w}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
                "mamba_decode: CPU float32 contiguous tensors only");
  }
  Dims d{};
  d.B = zxbcdt.size(0);
  d.T = zxbcdt.size(1);
  d.F = zxbcdt.size(2);
  d.C = conv_w.size(0);
  d.K = conv_w.size(1);
  d.H = ssm_state.size(1);
  d.P = ssm_state.size(2);
  d.N = ssm_state.size(3);
  d.G = groups;
  d.d_inner = d.H * d.P;
  d.norm_group = norm_group;
  TORCH_CHECK(d.C == d.d_inner + 2 * d.G * d.N && d.F == d.d_inner + d.C + d.H,
              "mamba_decode: projection width does not match the state shapes");
  TORCH_CHECK(conv_state.size(1) == d.C && conv_state.size(2) == d.K - 1, "mamba_decode: conv state shape");
  auto slot_ids = slots.to(torch::kLong).contiguous();
  const int64_t* sp = slot_ids.data_ptr<int64_t>();
  TORCH_CHECK(slot_ids.numel() == d.B, "mamba_decode: one slot per row");
  check_slots(sp, d.B, conv_state.size(0), "mamba_decode");
  TORCH_CHECK(ssm_state.size(0) == conv_state.size(0), "mamba_decode: conv and SSM states differ in slots");
  auto y = torch::empty({d.B, d.T, d.d_inner}, zxbcdt.options());
  torch::Tensor conv_hist, ssm_hist;
  if (record) {
    conv_hist = torch::empty({d.B, d.T, d.C, d.K - 1}, zxbcdt.options());
    ssm_hist = torch::empty({d.B, d.T, d.H, d.P, d.N}, zxbcdt.options());
  }
  const float* bias = conv_b.has_value() && conv_b->defined() ? conv_b->contiguous().data_ptr<float>() : nullptr;
  const int64_t conv_size = d.C * (d.K - 1), state_size = d.H * d.P * d.N;
  at::parallel_for(0, d.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t s = sp[b];
      run_row(d, zxbcdt.data_ptr<float>() + b * d.T * d.F, conv_state.data_ptr<float>() + s * conv_size,
              ssm_state.data_ptr<float>() + s * state_size, conv_w.data_ptr<float>(), bias,
              dt_bias.data_ptr<float>(), A_log.data_ptr<float>(), Dv.data_ptr<float>(), norm_w.data_ptr<float>(),
              static_cast<float>(dt_min), static_cast<float>(eps), y.data_ptr<float>() + b * d.T * d.d_inner,
              record ? conv_hist.data_ptr<float>() + b * d.T * conv_size : nullptr,
              record ? ssm_hist.data_ptr<float>() + b * d.T * state_size : nullptr);
    }
  });
  if (record) return {y, conv_hist, ssm_hist};
  return {y};
}

// The residual stream's `h += delta` (when given) fused with the next layer's RMSNorm:
// h (R, D) is updated in place; returns weight * h / rms(h). Matches `_rms` in fp32.
torch::Tensor residual_rms(torch::Tensor h, c10::optional<torch::Tensor> delta, torch::Tensor weight,
                           double eps) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == torch::kFloat && h.is_contiguous() &&
                  weight.is_contiguous(), "residual_rms: CPU float32 contiguous tensors only");
  const int64_t D = h.size(-1), R = h.numel() / D;
  torch::Tensor dl;
  if (delta.has_value() && delta->defined()) {
    dl = delta->contiguous();
    TORCH_CHECK(dl.numel() == h.numel() && dl.scalar_type() == torch::kFloat, "residual_rms: delta shape");
  }
  auto out = torch::empty_like(h);
  float* hp = h.data_ptr<float>();
  const float* dp = dl.defined() ? dl.data_ptr<float>() : nullptr;
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = hp + r * D;
      float sq = 0.0f;
      for (int64_t i = 0; i < D; ++i) {
        if (dp) row[i] += dp[r * D + i];
        sq += row[i] * row[i];
      }
      const float scale = 1.0f / std::sqrt(sq / D + e);
      for (int64_t i = 0; i < D; ++i) op[r * D + i] = wp[i] * (row[i] * scale);
    }
  });
  return out;
}

namespace {

// The sigmoid router's top-k for one token over scores + correction bias; writes the expert ids
// and their weights (from the scores, normalised if asked, times the scaling factor).
void route(const float* s, const float* bp, int64_t E, int64_t top_k, bool norm_topk, double scale,
           std::vector<int64_t>& order, int64_t* ids, float* weights) {
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int64_t a, int64_t b) {
    const float va = s[a] + bp[a], vb = s[b] + bp[b];
    return va > vb || (va == vb && a < b);
  });
  float total = 0.0f;
  for (int64_t j = 0; j < top_k; ++j) total += s[order[j]];
  const float denom = norm_topk ? total + 1e-20f : 1.0f;
  for (int64_t j = 0; j < top_k; ++j) {
    ids[j] = order[j];
    weights[j] = s[order[j]] / denom * static_cast<float>(scale);
  }
}

// One expert on n tokens: out[tok[a]] += w[a] * down(relu(up(x[tok[a]]))^2). Each weight row is
// read once for all n tokens (hidden: n * I floats of scratch).
void expert_on_tokens(const float* up, const float* down, const float* xp, float* op, const int64_t* tok,
                      const float* w, int64_t n, int64_t L, int64_t I, float* hidden) {
  std::fill(hidden, hidden + n * I, 0.0f);
  for (int64_t l = 0; l < L; ++l) {  // up: axpy over contiguous rows of up_t (L, I)
    const float* row = up + l * I;
    for (int64_t a = 0; a < n; ++a) {
      const float xv = xp[tok[a] * L + l];
      float* hp = hidden + a * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) hp[i] += xv * row[i];
    }
  }
  for (int64_t a = 0; a < n; ++a) {  // ReLU^2, with the routing weight folded in
    float* hp = hidden + a * I;
#pragma omp simd
    for (int64_t i = 0; i < I; ++i) {
      const float r = hp[i] > 0.0f ? hp[i] : 0.0f;
      hp[i] = w[a] * (r * r);
    }
  }
  for (int64_t i = 0; i < I; ++i) {  // down: axpy over contiguous rows of down_t (I, L)
    const float* row = down + i * L;
    for (int64_t a = 0; a < n; ++a) {
      const float hv = hidden[a * I + i];
      float* ot = op + tok[a] * L;
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) ot[l] += hv * row[l];
    }
  }
}

}  // namespace

// Routed experts of a NemotronH MoE layer with one expert group (the sigmoid router's top-k over
// scores + correction bias, weights from the scores, ReLU^2 experts). scores (T, E) =
// sigmoid(router logits); x (T, L); up_t (E, L, I) and down_t (E, I, L): the experts' weights
// transposed, so both projections are contiguous axpys. Returns out (T, L), ids (T, k), weights (T, k).
// Up to 8 tokens (a decode step at a small batch, a speculative verification) of large experts go
// expert by expert, each expert's weights read once for all its tokens: a 100M policy's experts
// are 4 MB each, and reading them per token made verifying three tokens cost three steps' expert
// reads. Otherwise token by token in parallel: the tiny presets' experts sit in cache, and at their
// sizes this beats sorting tokens into groups.
std::vector<torch::Tensor> moe_experts(torch::Tensor scores, torch::Tensor bias, torch::Tensor x,
                                       torch::Tensor up_t, torch::Tensor down_t, int64_t top_k,
                                       bool norm_topk, double scale) {
  for (const auto& t : {scores, bias, x, up_t, down_t}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
                "moe_experts: CPU float32 contiguous tensors only");
  }
  const int64_t T = x.size(0), L = x.size(1), E = up_t.size(0), I = up_t.size(2);
  TORCH_CHECK(scores.size(1) == E && up_t.size(1) == L && down_t.size(1) == I && down_t.size(2) == L &&
                  top_k >= 1 && top_k <= E, "moe_experts: shapes do not match");
  auto out = torch::zeros({T, L}, x.options());
  auto ids = torch::empty({T, top_k}, x.options().dtype(torch::kLong));
  auto weights = torch::empty({T, top_k}, x.options());
  const float *sp = scores.data_ptr<float>(), *bp = bias.data_ptr<float>(), *xp = x.data_ptr<float>();
  const float *up_p = up_t.data_ptr<float>(), *down_p = down_t.data_ptr<float>();
  float* op = out.data_ptr<float>();
  int64_t* ip = ids.data_ptr<int64_t>();
  float* wp = weights.data_ptr<float>();
  if (T <= 8 && L * I >= (1 << 16)) {  // experts of 256 KB or more per projection: from memory
    std::vector<int64_t> order(E);
    for (int64_t t = 0; t < T; ++t) route(sp + t * E, bp, E, top_k, norm_topk, scale, order, ip + t * top_k, wp + t * top_k);
    std::vector<int64_t> tok(T);
    std::vector<float> w(T), hidden(T * I);
    for (int64_t e = 0; e < E; ++e) {
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < top_k; ++j) {
          if (ip[t * top_k + j] == e) tok[n] = t, w[n++] = wp[t * top_k + j];
        }
      }
      if (n) expert_on_tokens(up_p + e * L * I, down_p + e * I * L, xp, op, tok.data(), w.data(), n, L, I, hidden.data());
    }
    return {out, ids, weights};
  }
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden(I);
    std::vector<int64_t> order(E);
    for (int64_t t = begin; t < end; ++t) {
      route(sp + t * E, bp, E, top_k, norm_topk, scale, order, ip + t * top_k, wp + t * top_k);
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t e = ip[t * top_k + j];
        expert_on_tokens(up_p + e * L * I, down_p + e * I * L, xp, op, &t, wp + t * top_k + j, 1, L, I, hidden.data());
      }
    }
  });
  return {out, ids, weights};
}

// Attention of T new tokens per sequence over its slot's KV cache, without gathering the cache:
// writes k/v (B, T, kvh, hd) at positions lengths[b] + j of cache (S, max_len, kvh, hd), then
// query j of q (B, T, H, hd) attends to positions <= lengths[b] + j (GQA: H / kvh query heads
// per KV head). Returns (B, T, H, hd). The caller advances the lengths.
torch::Tensor attn_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cache_k,
                          torch::Tensor cache_v, torch::Tensor slots, torch::Tensor lengths,
                          double scale) {
  for (const auto& t : {q, k, v, cache_k, cache_v}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(),
                "attn_decode: CPU float32 contiguous tensors only");
  }
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3);
  const int64_t kvh = cache_k.size(2), max_len = cache_k.size(1), rep = H / kvh;
  TORCH_CHECK(k.size(2) == kvh && k.size(3) == hd && cache_k.size(3) == hd && H % kvh == 0,
              "attn_decode: head shapes do not match");
  auto slot_ids = slots.to(torch::kLong).contiguous();
  auto lens = lengths.to(torch::kLong).contiguous();
  const int64_t *sp = slot_ids.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  TORCH_CHECK(slot_ids.numel() == B && lens.numel() == B, "attn_decode: one slot and one length per row");
  check_slots(sp, B, std::min(cache_k.size(0), cache_v.size(0)), "attn_decode");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] + T <= max_len, "attn_decode: a sequence would exceed the cache length");
  }
  auto out = torch::empty_like(q);
  float *ck = cache_k.data_ptr<float>(), *cv = cache_v.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t row = kvh * hd;  // one position of one slot's cache
  const float sc = static_cast<float>(scale);
  for (int64_t b = 0; b < B; ++b) {  // write first: every query of the step sees all new keys
    float* dk = ck + (sp[b] * max_len + lp[b]) * row;
    float* dv = cv + (sp[b] * max_len + lp[b]) * row;
    std::copy(kp + b * T * row, kp + (b + 1) * T * row, dk);
    std::copy(vp + b * T * row, vp + (b + 1) * T * row, dv);
  }
  at::parallel_for(0, B * T * H, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> w;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (T * H), j = (idx / H) % T, h = idx % H, g = h / rep;
      const int64_t span = lp[b] + j + 1;
      const float* qv = qp + idx * hd;
      const float* keys = ck + sp[b] * max_len * row + g * hd;
      const float* vals = cv + sp[b] * max_len * row + g * hd;
      w.resize(span);
      float top = -INFINITY;
      for (int64_t pos = 0; pos < span; ++pos) {
        const float* kr = keys + pos * row;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < hd; ++d) acc += qv[d] * kr[d];
        w[pos] = acc * sc;
        top = std::max(top, w[pos]);
      }
      float total = 0.0f;
      float* wp = w.data();
#pragma omp simd reduction(+ : total)
      for (int64_t pos = 0; pos < span; ++pos) total += (wp[pos] = fast_exp(wp[pos] - top));
      float* o = op + idx * hd;
      std::fill(o, o + hd, 0.0f);
      for (int64_t pos = 0; pos < span; ++pos) {
        const float* vr = vals + pos * row;
        const float p = w[pos] / total;
#pragma omp simd
        for (int64_t d = 0; d < hd; ++d) o[d] += p * vr[d];
      }
    }
  });
  return out;
}

// Speculative rollback: state[slots[b]] = history[b, keep[b] - 1] for every row that kept fewer
// than all T positions (rows that kept all T already hold that state). state (S, ...) and
// history (B, T, ...) of one dtype, contiguous.
void restore_rows(torch::Tensor state, torch::Tensor history, torch::Tensor slots, torch::Tensor keep) {
  TORCH_CHECK(state.is_contiguous() && history.is_contiguous() && state.device().is_cpu() &&
                  history.scalar_type() == state.scalar_type(), "restore_rows: contiguous CPU tensors of one dtype");
  const int64_t B = history.size(0), T = history.size(1), row = state.numel() / state.size(0);
  TORCH_CHECK(history.numel() == B * T * row, "restore_rows: history shape does not match the state");
  auto s = slots.to(torch::kLong).contiguous(), k = keep.to(torch::kLong).contiguous();
  const int64_t *sp = s.data_ptr<int64_t>(), *kp = k.data_ptr<int64_t>();
  TORCH_CHECK(s.numel() == B && k.numel() == B, "restore_rows: one slot and one keep per row");
  check_slots(sp, B, state.size(0), "restore_rows");
  const int64_t bytes = row * state.element_size();
  char* dst = static_cast<char*>(state.data_ptr());
  const char* src = static_cast<const char*>(history.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(kp[b] >= 1 && kp[b] <= T, "restore_rows: keep must be in 1..T");
    if (kp[b] < T) std::memcpy(dst + sp[b] * bytes, src + (b * T + kp[b] - 1) * bytes, bytes);
  }
}

namespace {

// y (M, N) = x (M, K) @ w (N, K)^T (+ bias) for a few rows (M <= 8): a decode step or a
// speculative verification at batch 1-8. MKL's sgemm takes 2-3x as long for 3 rows as for one
// here (a 100M policy's 39 projections: 20.3 ms for one row, 57.2 ms for three), so verifying two
// drafted tokens cost almost three decode steps. Here each weight row is read from memory once
// and multiplied into all M rows held in registers: 19.5 ms for one row, 24.7 for three, 37.8 for
// eight (past about 6 rows this CPU's FMAs, not its memory, set the pace).
#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Loads 8 weights as floats: fp32 as they are, int8 widened in registers (a quarter of the bytes).
template <typename W>
inline __m256 load8(const W* p) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm256_loadu_ps(p);
  } else {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
}

// W is float (fp32 weights) or int8_t (int8 weights with one float `scale` per output row, the MTP
// drafts of `models/draft_int8.py`); the sums stay float32 either way.
template <int M, int R, typename W>
void rows_block(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t K,
                int64_t N, int64_t n0) {
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load8(w + (n0 + r) * K + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* wr = w + (n0 + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[r][m]);
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(wr[j]) * x[m * K + j];
      if (scale) s *= scale[n0 + r];
      y[m * N + n0 + r] = s + (bias ? bias[n0 + r] : 0.0f);
    }
  }
}

#if defined(__AVX512F__)
// 16 floats a register and 32 registers: at 3 rows (a verification of two drafts) the fp32 sums
// keep up with the weights streaming in, where 8-wide AVX2 FMAs made three rows cost 1.27x one.
// Rows of R outputs at a time with R * M + M + 1 <= 32 registers.
template <int M>
constexpr int rows512() { return M <= 3 ? 8 : (M == 4 ? 6 : (M == 5 ? 5 : (M == 6 ? 4 : (M == 7 ? 3 : 2)))); }

template <typename W>
inline __m512 load16(const W* p) {
  if constexpr (std::is_same_v<W, float>) {
    return _mm512_loadu_ps(p);
  } else {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
}

template <int M, int R, typename W>
void rows_block512(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t K,
                   int64_t N, int64_t n0) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load16(w + (n0 + r) * K + k);
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* wr = w + (n0 + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(acc[r][m]);
      for (int64_t j = k; j < K; ++j) s += static_cast<float>(wr[j]) * x[m * K + j];
      if (scale) s *= scale[n0 + r];
      y[m * N + n0 + r] = s + (bias ? bias[n0 + r] : 0.0f);
    }
  }
}
#endif

// One block of R output rows: 16-wide where the CPU has AVX-512, else 8-wide.
template <int M, int R, typename W>
inline void block(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t K, int64_t N,
                  int64_t n0) {
#if defined(__AVX512F__)
  rows_block512<M, R, W>(x, w, scale, bias, y, K, N, n0);
#else
  rows_block<M, R, W>(x, w, scale, bias, y, K, N, n0);
#endif
}

template <int M, typename W>
void rows_all(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t K,
              int64_t N) {
#if defined(__AVX512F__)
  constexpr int R = rows512<M>();
#else
  // R output rows at a time, as many as the 16 vector registers hold beside M inputs.
  constexpr int R = M == 1 ? 8 : (M == 2 ? 4 : (M == 3 ? 3 : (M == 4 ? 2 : 1)));
#endif
  at::parallel_for(0, (N + R - 1) / R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * R;
      if (n0 + R <= N) {
        block<M, R, W>(x, w, scale, bias, y, K, N, n0);
      } else {
        for (int64_t n = n0; n < N; ++n) block<M, 1, W>(x, w, scale, bias, y, K, N, n);
      }
    }
  });
}
#endif

template <typename W>
void rows_generic(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t M,
                  int64_t K, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const W* wr = w + n * K;
      for (int64_t m = 0; m < M; ++m) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < K; ++j) s += static_cast<float>(wr[j]) * x[m * K + j];
        if (scale) s *= scale[n];
        y[m * N + n] = s + (bias ? bias[n] : 0.0f);
      }
    }
  });
}

// y (M, N) for M = 1-8 rows, each weight row read once for all of them.
template <typename W>
torch::Tensor linear_rows(const char* who, torch::Tensor x, const W* wp, const float* sp, int64_t K, int64_t N,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat, who, ": CPU float32 input");
  TORCH_CHECK(x.size(-1) == K, who, ": x's last dimension must equal the weight's columns");
  auto flat = x.reshape({-1, K}).contiguous();
  const int64_t M = flat.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, who, ": 1 to 8 rows");
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat && b.numel() == N, who, ": bias must have N floats");
    bp = b.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, flat.options());
  const float* xp = flat.data_ptr<float>();
  float* yp = y.data_ptr<float>();
#if defined(__AVX2__) && defined(__FMA__)
  switch (M) {
    case 1: rows_all<1, W>(xp, wp, sp, bp, yp, K, N); break;
    case 2: rows_all<2, W>(xp, wp, sp, bp, yp, K, N); break;
    case 3: rows_all<3, W>(xp, wp, sp, bp, yp, K, N); break;
    case 4: rows_all<4, W>(xp, wp, sp, bp, yp, K, N); break;
    case 5: rows_all<5, W>(xp, wp, sp, bp, yp, K, N); break;
    case 6: rows_all<6, W>(xp, wp, sp, bp, yp, K, N); break;
    case 7: rows_all<7, W>(xp, wp, sp, bp, yp, K, N); break;
    default: rows_all<8, W>(xp, wp, sp, bp, yp, K, N); break;
  }
#else
  rows_generic<W>(xp, wp, sp, bp, yp, M, K, N);
#endif
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

}  // namespace

// F.linear for 1-8 rows (CPU, fp32): x (..., K) with at most 8 rows in all, weight (N, K).
torch::Tensor small_linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.is_contiguous() && weight.dim() == 2,
              "small_linear: a contiguous 2-D float32 weight");
  return linear_rows<float>("small_linear", x, weight.data_ptr<float>(), nullptr, weight.size(1), weight.size(0),
                            bias);
}

// small_linear with int8 weights (N, K) and a float scale per output row: y = (x @ w.T) * scale (+ bias).
torch::Tensor small_linear_i8(torch::Tensor x, torch::Tensor weight, torch::Tensor scale,
                              c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.scalar_type() == torch::kChar && weight.is_contiguous() && weight.dim() == 2,
              "small_linear_i8: a contiguous 2-D int8 weight");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "small_linear_i8: one float scale per weight row, contiguous");
  return linear_rows<int8_t>("small_linear_i8", x, weight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                             weight.size(1), weight.size(0), bias);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("small_linear_i8", &small_linear_i8, "x @ (int8 weight).T * scale (+ bias) for 1-8 rows (CPU, fp32 sums)");
  m.def("small_linear", &small_linear, "x @ weight.T (+ bias) for 1-8 rows, each weight row read once (CPU, fp32)");
  m.def("restore_rows", &restore_rows, "Speculative rollback of recurrent state rows (CPU)");
  m.def("attn_decode", &attn_decode, "Attention over slot KV caches for a few new tokens (CPU, fp32)");
  m.def("moe_experts", &moe_experts, "Routed ReLU^2 experts with sigmoid top-k routing (CPU, fp32)");
  m.def("mamba_decode", &mamba_decode, "Fused Mamba-2 decode/verify step (CPU, fp32)");
  m.def("residual_rms", &residual_rms, "h += delta; RMSNorm(h) (CPU, fp32)");
}
