// The GATv2 star attention of fuse/attention.py on CPU, float32: one pass forward, one pass backward.
//
// Inductor fuses each of the attention's passes into one loop nest, but a reduction over the sources s runs
// innermost there, so every step of it loads a different row of x_l (8 KB apart): the gradient pass that
// sums over s ran at a fraction of memory speed. Here the loops go sample by sample, row by row, and along
// each row: x_l streams in the order lin_l wrote it, and per-sample sums stay in L1/L2.
//
// Shapes (all contiguous): x_l (R, H, C) rows; row, mask (N, S); x_r, g_out, out, p_sum (N, T, H, C);
// e (N, T, S); w, att, pe, pz, gx (H, C); alpha, alpha_d, noise, g (N, T, S, H); g_sum (N, T, H).
// z = (x_l[row] + x_r) + e * w, rounded in that order as PyG computes it (built with -ffp-contract=off).
// Sums run in a different order than PyTorch's, so results agree to float32 rounding.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

namespace {

// Explicit vectors (GCC/Clang vector extensions), not the auto-vectoriser, which left the loops scalar
// without AVX-512 (15x slower). STAR_LANES floats: one register (16 AVX-512, 8 AVX2, 4 SSE2 or NEON).
#ifndef STAR_LANES
#define STAR_LANES 4
#endif
constexpr int V = STAR_LANES;
typedef float vf __attribute__((vector_size(V * sizeof(float))));

template <class F>
inline F load(const float* p) {
  if constexpr (sizeof(F) == sizeof(float)) {
    return *p;
  } else {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
}
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void add_to(vf& acc, vf v) { acc += v; }
inline void add_to(vf& acc, float v) { acc[0] += v; }
inline float sum_lanes(vf v) {
  float s = 0.f;
  for (int i = 0; i < V; ++i) s += v[i];
  return s;
}

// body(F{}, c) over [lo, hi): F = vf for whole vectors, then float for the tail.
template <class Body>
inline void for_each(int64_t lo, int64_t hi, Body&& body) {
  int64_t c = lo;
  for (; c + V <= hi; c += V) body(vf{}, c);
  for (; c < hi; ++c) body(0.f, c);
}

struct Args {
  const float* x_l;
  const int64_t* row;
  const uint8_t* mask;
  const float* x_r;
  const float* e;
  const float* w;
  const float* att;
  float slope;
  int64_t N, S, H, C;
};

// The row after slot s of sample n (or s's own at the end), asked for ahead of use: the hardware prefetcher
// alone left the first pass over each row waiting on memory.
inline const float* next_row(const Args& a, int64_t n, int64_t s) {
  return a.x_l + a.row[n * a.S + (s + 1 < a.S ? s + 1 : s)] * a.H * a.C;
}

// Scores, masked softmax over s, dropout and messages of sample n in one pass over its rows: an online
// softmax (a running maximum and sum per target and head; the messages rescaled when the maximum grows),
// each head's slice of a row scored and accumulated while it is in L1. alpha: the raw scores first, then
// the softmax from them and the final maximum and sum.
template <int T>
void forward_sample(const Args& a, int64_t n, const float* noise, float* alpha, float* alpha_d, float* out) {
  const int64_t S = a.S, H = a.H, C = a.C, HC = H * C;
  // Locals, not a's fields, in the loops: GCC vectorises them only then.
  const float* __restrict x_l = a.x_l;
  const float* __restrict w = a.w;
  const float* __restrict att = a.att;
  const float slope = a.slope;
  const float inf = std::numeric_limits<float>::infinity();
  const float* xr = a.x_r + n * T * HC;
  const int64_t base = n * T * S * H;
  float* al = alpha + base;  // (T, S, H) of this sample
  float* o = out + n * T * HC;
  std::memset(o, 0, sizeof(float) * T * HC);
  std::vector<float> m(T * H, -inf), l(T * H, 0.f);  // running maximum and sum of exp(score - maximum)
  for (int64_t s = 0; s < S; ++s) {
    if (!a.mask[n * S + s]) {
      for (int t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) al[(t * S + s) * H + h] = -inf;
      continue;
    }
    const float* x = x_l + a.row[n * S + s] * HC;
    const float* ahead = next_row(a, n, s);
    for (int t = 0; t < T; ++t) {
      const float es = a.e[(n * T + t) * S + s];
      const float* xrt = xr + t * HC;
      float* ot = o + t * HC;
      for (int64_t h = 0; h < H; ++h) {
        vf sum{};
        for_each(h * C, (h + 1) * C, [&](auto f, int64_t c) {
          using F = decltype(f);
          if (t == 0) __builtin_prefetch(ahead + c);
          const F z = (load<F>(x + c) + load<F>(xrt + c)) + es * load<F>(w + c);
          add_to(sum, load<F>(att + c) * (z > 0.f ? z : slope * z));
        });
        const float acc = sum_lanes(sum);
        const int64_t i = (t * S + s) * H + h;
        al[i] = acc;
        float& mx = m[t * H + h];
        float weight;
        if (acc > mx) {  // a new maximum: what was summed so far shrinks by exp(old - new)
          const float shrink = std::exp(mx - acc);
          l[t * H + h] = l[t * H + h] * shrink + 1.f;
          for_each(h * C, (h + 1) * C, [&](auto f, int64_t c) {
            store(ot + c, load<decltype(f)>(ot + c) * shrink);
          });
          mx = acc;
          weight = 1.f;
        } else {
          weight = std::exp(acc - mx);
          l[t * H + h] += weight;
        }
        if (noise != nullptr) weight *= noise[base + i];
        for_each(h * C, (h + 1) * C, [&](auto f, int64_t c) {
          using F = decltype(f);
          store(ot + c, load<F>(ot + c) + weight * load<F>(x + c));
        });
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const float mx = m[t * H + h], inv = 1.f / l[t * H + h];
      float* ot = o + t * HC;
      for_each(h * C, (h + 1) * C, [&](auto f, int64_t c) { store(ot + c, load<decltype(f)>(ot + c) * inv); });
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (t * S + s) * H + h;
        al[i] = std::exp(al[i] - mx) * inv;
        if (noise != nullptr) alpha_d[base + i] = al[i] * noise[base + i];
      }
    }
  }
}

// The backward of sample n in one pass over its rows: per row and head, d alpha (g_out . x_l) and the score
// gradient g = alpha * (d alpha - sum_s alpha * d alpha), where that sum is g_out . messages (+ g_sum times
// sum_s alpha_d) without reading x_l again; then, while the slice is in L1, d x_l and the per-element sums
// of d x_r, d w and d att (the relu part; the caller adds the linear parts from g).
template <int T>
void backward_sample(const Args& a, int64_t n, const float* alpha, const float* alpha_d, const float* noise,
                     const float* messages, const float* g_out, const float* g_sum, bool padded, float* dx_l,
                     float* g, float* p_sum, float* mpe, float* mpz, float* mgx) {
  const int64_t S = a.S, H = a.H, C = a.C, HC = H * C;
  const float* __restrict x_l = a.x_l;
  const float* __restrict w = a.w;
  const float* __restrict att = a.att;
  const float slope = a.slope, q = 1.f - a.slope;
  const int64_t base = n * T * S * H;
  const float* al = alpha + base;
  const float* ad = alpha_d + base;
  float* gg = g + base;
  const float* go = g_out + n * T * HC;
  const float* xr = a.x_r + n * T * HC;
  std::vector<float> dot(T * H);  // sum_s alpha * d alpha per target and head
  for (int t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const float* mt = messages + (n * T + t) * HC;
      const float* got = go + t * HC;
      vf sum{};
      for_each(h * C, (h + 1) * C, [&](auto f, int64_t c) {
        using F = decltype(f);
        add_to(sum, load<F>(got + c) * load<F>(mt + c));
      });
      float acc = sum_lanes(sum);
      if (g_sum != nullptr) {
        float sum_ad = 0.f;
        for (int64_t s = 0; s < S; ++s) sum_ad += ad[(t * S + s) * H + h];
        acc += g_sum[(n * T + t) * H + h] * sum_ad;
      }
      dot[t * H + h] = acc;
    }
  }
  float* ps = p_sum + n * T * HC;
  std::memset(ps, 0, sizeof(float) * T * HC);
  for (int64_t s = 0; s < S; ++s) {
    if (!a.mask[n * S + s]) {
      for (int t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) gg[(t * S + s) * H + h] = 0.f;
      if (padded) std::memset(dx_l + a.row[n * S + s] * HC, 0, sizeof(float) * HC);  // padding gets zero
      continue;
    }
    const int64_t r = a.row[n * S + s];
    const float* x = x_l + r * HC;
    const float* ahead = next_row(a, n, s);
    float* dx = dx_l + r * HC;
    float es[T];
    for (int t = 0; t < T; ++t) es[t] = a.e[(n * T + t) * S + s];
    for (int64_t h = 0; h < H; ++h) {
      float gt[T], at[T], gsum = 0.f;  // per target: g, alpha_d; g summed over targets
      for (int t = 0; t < T; ++t) {
        const int64_t i = (t * S + s) * H + h;
        const float* got = go + t * HC;
        vf sum{};
        for_each(h * C, (h + 1) * C, [&](auto f, int64_t c) {
          using F = decltype(f);
          if (t == 0) __builtin_prefetch(ahead + c);
          add_to(sum, load<F>(got + c) * load<F>(x + c));
        });
        float acc = sum_lanes(sum);
        if (g_sum != nullptr) acc += g_sum[(n * T + t) * H + h];
        if (noise != nullptr) acc *= noise[base + i];
        gt[t] = gg[i] = al[i] * (acc - dot[t * H + h]);
        at[t] = ad[i];
        gsum += gt[t];
      }
      const float slope_gsum = slope * gsum;
      for_each(h * C, (h + 1) * C, [&](auto f, int64_t c) {
        using F = decltype(f);
        const F xv = load<F>(x + c), wc = load<F>(w + c);
        F msg = f, p_acc = f, e_acc = f, z_acc = f;
        for (int t = 0; t < T; ++t) {
          const F z = (xv + load<F>(xr + t * HC + c)) + es[t] * wc;
          const F p = z > 0.f ? gt[t] + f : f;  // [z > 0] g
          store(ps + t * HC + c, load<F>(ps + t * HC + c) + p);
          p_acc += p;
          e_acc += p * es[t];
          z_acc += p * z;
          msg += at[t] * load<F>(go + t * HC + c);
        }
        store(mpe + c, load<F>(mpe + c) + e_acc);
        store(mpz + c, load<F>(mpz + c) + z_acc);
        store(mgx + c, load<F>(mgx + c) + gsum * xv);
        // leaky'(z) g = slope g + (1 - slope) [z > 0] g, summed over t
        store(dx + c, load<F>(att + c) * (slope_gsum + q * p_acc) + msg);
      });
    }
  }
}

template <int T>
void forward(const Args& a, const float* noise, float* alpha, float* alpha_d, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n = 0; n < a.N; ++n) forward_sample<T>(a, n, noise, alpha, alpha_d, out);
}

template <int T>
void backward(const Args& a, const float* alpha, const float* alpha_d, const float* noise, const float* messages,
              const float* g_out, const float* g_sum, bool padded, float* dx_l, float* g, float* p_sum, float* pe, float* pz,
              float* gx, int threads) {
  const int64_t HC = a.H * a.C;
  std::vector<float> acc(static_cast<size_t>(threads) * 3 * HC, 0.f);  // per-thread sums for pe, pz, gx
#pragma omp parallel num_threads(threads)
  {
    float* mine = acc.data() + static_cast<size_t>(omp_get_thread_num()) * 3 * HC;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < a.N; ++n)
      backward_sample<T>(a, n, alpha, alpha_d, noise, messages, g_out, g_sum, padded, dx_l, g, p_sum, mine,
                         mine + HC, mine + 2 * HC);
  }
  std::memset(pe, 0, sizeof(float) * HC);
  std::memset(pz, 0, sizeof(float) * HC);
  std::memset(gx, 0, sizeof(float) * HC);
  for (int i = 0; i < threads; ++i) {
    const float* m = acc.data() + static_cast<size_t>(i) * 3 * HC;
    for (int64_t c = 0; c < HC; ++c) {
      pe[c] += m[c];
      pz[c] += m[HC + c];
      gx[c] += m[2 * HC + c];
    }
  }
}

}  // namespace

#define STAR_DISPATCH(T_, CALL)          \
  switch (T_) {                          \
    case 1: CALL(1); return 0;           \
    case 2: CALL(2); return 0;           \
    case 3: CALL(3); return 0;           \
    case 4: CALL(4); return 0;           \
    default: return 1;                   \
  }

extern "C" {

// Returns 0, or 1 for an unsupported number of targets T (1 to 4 are compiled).
int star_forward(const float* x_l, const int64_t* row, const uint8_t* mask, const float* x_r, const float* e,
                 const float* w, const float* att, float slope, int64_t N, int64_t T, int64_t S, int64_t H,
                 int64_t C, const float* noise, float* alpha, float* alpha_d, float* out, int threads) {
  const Args a{x_l, row, mask, x_r, e, w, att, slope, N, S, H, C};
#define STAR_FORWARD(K) forward<K>(a, noise, alpha, alpha_d, out, threads)
  STAR_DISPATCH(T, STAR_FORWARD)
#undef STAR_FORWARD
}

int star_backward(const float* x_l, const int64_t* row, const uint8_t* mask, const float* x_r, const float* e,
                  const float* w, const float* att, float slope, int64_t N, int64_t T, int64_t S, int64_t H,
                  int64_t C, const float* alpha, const float* alpha_d, const float* noise, const float* messages,
                  const float* g_out, const float* g_sum, int padded, float* dx_l, float* g, float* p_sum,
                  float* pe, float* pz, float* gx, int threads) {
  const Args a{x_l, row, mask, x_r, e, w, att, slope, N, S, H, C};
#define STAR_BACKWARD(K) \
  backward<K>(a, alpha, alpha_d, noise, messages, g_out, g_sum, padded != 0, dx_l, g, p_sum, pe, pz, gx, threads)
  STAR_DISPATCH(T, STAR_BACKWARD)
#undef STAR_BACKWARD
}

}  // extern "C"
