// The row fold of the CPU path in C++: per row of float32 logits z (V entries, contiguous),
// the target's log-prob, the softmax, or the log-prob's gradient.  Built at first use by
// fastdpo/native.py (the host's compiler, -O3 -march=native), called through ctypes.
//
// Why not ATen: a row's score needs a max pass and an exp-and-sum pass and writes one float;
// ATen's softmax writes every probability, and inductor's generated loop keeps one
// accumulator per reduction (a dependency chain) and calls Sleef's 1-ulp expf.  Here each pass
// keeps four independent vector accumulators, and exp is a degree-7 polynomial on
// [-ln2/2, ln2/2] after Cody-Waite range reduction (relative error ~1e-7, the float32 level),
// written with GCC/Clang vector extensions so that the compiler maps it onto the host's
// vectors (AVX-512 where measured; x86-64 baseline and AVX2 builds are tested; ARM not
// tried).  docs/performance-log.md ("A hand-written fold") has the figures.
//
// Rows are addressed as (a, b) for a < A, b < B, at z + a * sa + b * sb (so a strided box of an
// (N, T, V) tensor needs no copy); y, g and out are contiguous (A * B).  Semantics, as
// float64 log_softmax rounded: a row holding a NaN, or whose max is +inf or -inf, gives NaN
// (every entry, for the softmax and the gradient); exp of an argument under -86 is 0 (its
// true value is under 4e-38, below float32's relative resolution of any row sum, which is at
// least 1).  A target outside [0, V) makes the call return 1 and writes NaN for that row.
// Threads: the rows are split evenly over `threads` threads: OpenMP's where built with it (on
// Linux, torch's own runtime), else std::threads (the caller's among them).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

typedef float vf __attribute__((vector_size(64), aligned(4)));  // 16 lanes, unaligned loads
typedef int32_t vi __attribute__((vector_size(64), aligned(4)));
constexpr int64_t W = 16;
constexpr int64_t U = 4 * W;  // elements per unrolled step: four independent accumulators

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }
inline vf splat(float x) { return vf{} + x; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

constexpr float EXP_LOW = -86.0f;

// exp(x) for x <= 0 (or -inf), not NaN; 0 under EXP_LOW.
inline vf exp_neg(vf x) {
  const vi under = x < splat(EXP_LOW);
  const vf xc = under ? splat(EXP_LOW) : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick; t's low bits hold n as an integer
  const vf t = xc * 1.44269504088896341f + 12582912.0f;
  const vf n = t - 12582912.0f;
  const vi ni = reinterpret_cast<vi>(t) - 0x4B400000;
  vf r = xc - n * 0.693145751953125f;  // ln2, high part (exact product for |n| < 2^9)
  r = r - n * 1.428606765330187e-06f;  // and low part
  vf p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = reinterpret_cast<vi>(p) + (ni << 23);  // times 2^n: n >= -125, still normal
  return reinterpret_cast<vf>(bits & ~under);
}

inline float exp_neg1(float x) { return x < EXP_LOW ? 0.0f : std::exp(x); }

struct Rows {
  const float* z;
  int64_t b, sa, sb, v;
  float* dst;  // softmax / gradient output (may be z itself); null for the score
  int64_t da, db;
  const int64_t* y;
  const float* g;  // gradient weights; null for score and softmax
  float* out;      // log-probs (score, softmax); null for the gradient
  const float* src(int64_t i) const { return z + (i / b) * sa + (i % b) * sb; }
  float* dest(int64_t i) const { return dst + (i / b) * da + (i % b) * db; }
};

// The row max, or NaN where the row holds a NaN.
float row_max(const float* r, int64_t v) {
  vf m0 = splat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
  vi nan = vi{};
  int64_t j = 0;
  for (; j + U <= v; j += U) {
    const vf a = load(r + j), b = load(r + j + W), c = load(r + j + 2 * W), d = load(r + j + 3 * W);
    m0 = vmax(a, m0), m1 = vmax(b, m1), m2 = vmax(c, m2), m3 = vmax(d, m3);
    nan |= (a != a) | (b != b) | (c != c) | (d != d);
  }
  const vf mm = vmax(vmax(m0, m1), vmax(m2, m3));
  float m = -INFINITY;
  bool bad = false;
  for (int k = 0; k < W; ++k) m = std::max(m, mm[k]), bad |= nan[k] != 0;
  for (; j < v; ++j) {
    const float x = r[j];
    bad |= x != x;
    m = std::max(m, x);
  }
  return bad ? NAN : m;
}

// sum_j exp(r[j] - m), and, with w, exp(r[j] - m) written to w[j] (w may be r).
float exp_sum(const float* r, float m, int64_t v, float* w) {
  const vf mv = splat(m);
  vf s0 = vf{}, s1 = s0, s2 = s0, s3 = s0;
  int64_t j = 0;
  if (w == nullptr) {
    for (; j + U <= v; j += U) {
      s0 += exp_neg(load(r + j) - mv), s1 += exp_neg(load(r + j + W) - mv);
      s2 += exp_neg(load(r + j + 2 * W) - mv), s3 += exp_neg(load(r + j + 3 * W) - mv);
    }
  } else {
    for (; j + U <= v; j += U) {
      const vf a = exp_neg(load(r + j) - mv), b = exp_neg(load(r + j + W) - mv);
      const vf c = exp_neg(load(r + j + 2 * W) - mv), d = exp_neg(load(r + j + 3 * W) - mv);
      store(w + j, a), store(w + j + W, b), store(w + j + 2 * W, c), store(w + j + 3 * W, d);
      s0 += a, s1 += b, s2 += c, s3 += d;
    }
  }
  const vf ss = (s0 + s1) + (s2 + s3);
  float s = 0.0f;
  for (int k = 0; k < W; ++k) s += ss[k];
  for (; j < v; ++j) {
    const float e = exp_neg1(r[j] - m);
    if (w != nullptr) w[j] = e;
    s += e;
  }
  return s;
}

void scale(float* w, float c, int64_t v) {
  const vf cv = splat(c);
  int64_t j = 0;
  for (; j + W <= v; j += W) store(w + j, load(w + j) * cv);
  for (; j < v; ++j) w[j] *= c;
}

// w = (w * c) * d: the probabilities, then times d, rounded twice as a softmax followed by a
// multiply rounds them (so a gradient made here equals one made from a kept softmax, bit for bit).
void scale2(float* w, float c, float d, int64_t v) {
  const vf cv = splat(c), dv = splat(d);
  int64_t j = 0;
  for (; j + W <= v; j += W) store(w + j, (load(w + j) * cv) * dv);
  for (; j < v; ++j) w[j] = (w[j] * c) * d;
}

void fill(float* w, float c, int64_t v) { std::fill(w, w + v, c); }

enum Kind { SCORE, SOFTMAX, GRAD };

void fold(const Rows& q, Kind kind, int64_t i0, int64_t i1, int* bad_target) {
  const int64_t v = q.v;
  for (int64_t i = i0; i < i1; ++i) {
    const float* r = q.src(i);
    float* w = kind == SCORE ? nullptr : q.dest(i);
    const int64_t yi = q.y[i];
    const bool y_ok = yi >= 0 && yi < v;
    if (!y_ok) *bad_target = 1;
    const float m = row_max(r, v);
    if (!y_ok || !std::isfinite(m)) {  // NaN, +inf, or a row of -inf: NaN throughout
      if (q.out != nullptr) q.out[i] = NAN;
      if (w != nullptr) fill(w, NAN, v);
      continue;
    }
    const float zy = r[yi];  // read before an in-place write
    const float s = exp_sum(r, m, v, w);
    if (q.out != nullptr) q.out[i] = (zy - m) - std::log(s);
    if (kind == SOFTMAX) {
      scale(w, 1.0f / s, v);
    } else if (kind == GRAD) {
      const float gi = q.g[i];
      scale2(w, 1.0f / s, -gi, v);
      w[yi] += gi;
    }
  }
}

int run(const Rows& q, Kind kind, int64_t rows, int threads) {
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, rows));
  std::vector<int> bad(t, 0);
#ifdef _OPENMP
  // torch's own OpenMP runtime where torch loaded one (the same libgomp.so.1): its threads are
  // warm and not left spinning against ours.
#pragma omp parallel for num_threads(t) schedule(static, 1)
  for (int64_t k = 0; k < t; ++k) fold(q, kind, rows * k / t, rows * (k + 1) / t, &bad[k]);
#else
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int64_t k = 1; k < t; ++k)
    pool.emplace_back(fold, std::cref(q), kind, rows * k / t, rows * (k + 1) / t, &bad[k]);
  fold(q, kind, 0, rows / t, &bad[0]);
  for (auto& th : pool) th.join();
#endif
  return *std::max_element(bad.begin(), bad.end());
}

}  // namespace

extern "C" {

// out[i] = log softmax(z_i)[y_i]; z is not written.
int fastdpo_score(const float* z, int64_t a, int64_t b, int64_t sa, int64_t sb, int64_t v,
                  const int64_t* y, float* out, int threads) {
  const Rows q{z, b, sa, sb, v, nullptr, 0, 0, y, nullptr, out};
  return run(q, SCORE, a * b, threads);
}

// dst_i = softmax(z_i) (dst may be z) and out[i] = log softmax(z_i)[y_i].
int fastdpo_softmax(const float* z, int64_t a, int64_t b, int64_t sa, int64_t sb, int64_t v,
                    float* dst, int64_t da, int64_t db, const int64_t* y, float* out, int threads) {
  const Rows q{z, b, sa, sb, v, dst, da, db, y, nullptr, out};
  return run(q, SOFTMAX, a * b, threads);
}

// dst_i = g_i * (onehot(y_i) - softmax(z_i)) (dst may be z).
int fastdpo_grad(const float* z, int64_t a, int64_t b, int64_t sa, int64_t sb, int64_t v,
                 float* dst, int64_t da, int64_t db, const int64_t* y, const float* g, int threads) {
  const Rows q{z, b, sa, sb, v, dst, da, db, y, g, nullptr};
  return run(q, GRAD, a * b, threads);
}

}  // extern "C"
