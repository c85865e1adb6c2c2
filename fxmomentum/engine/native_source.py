"""The C source of the native CPU kernels (:mod:`fxmomentum.engine.native` builds it).

Each function is the fused loop of the eager function of the same name in
:mod:`fxmomentum.engine.kernels`, for float32 work tensors laid out alike (the same strides,
dense), and gives its bits. What makes that hold and keeps the loops vectorised:

* every integer of a valid state is below ``2**51`` in magnitude (``|X| < 2**36``, ``|V| <
  2**50`` within a step; the grid keeps them there), so it is held exactly in a double, where
  the compiler vectorises every operation: ``>>``, ``&`` and the floor division become exact
  double operations, and int64 loads and stores convert through the exponent of ``1.5 * 2**52``
  (without AVX-512DQ the vectoriser does not convert int64 to floating point). With AVX-512DQ
  the two steps, which run once per block, work in int64 lanes instead: the same integers,
  about a third fewer vector operations per element;
* the float operations are the eager ones, one rounding each: float32 products by powers of
  two (exact), ``rintf`` (round half to even, as ``torch.round``), conversions that round to
  nearest even; it is built with ``-ffp-contract=off``, so no multiply-add is fused;
* maxima of non-negative floats are taken on their bits (a NaN's bits exceed infinity's), and
  sums are integer sums, so no result depends on the number of threads.

Pointers that may be NULL select what a kernel does (``xf``: a residual block's ``f`` is its
output, else ``out - xf``).
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __cplusplus
#define API extern "C"
#else
#define API
#endif
#define RS __restrict__
typedef int64_t i64;
typedef int32_t i32;
typedef int16_t i16;

#define MAGIC 6755399441055744.0 /* 1.5 * 2**52 */
#define MAGIC_BITS 0x4338000000000000LL
static inline double i2d(i64 v) {
  i64 b = v + MAGIC_BITS;
  double d;
  memcpy(&d, &b, 8);
  return d - MAGIC;
}
static inline i64 d2i(double d) {
  double e = d + MAGIC;
  i64 b;
  memcpy(&b, &e, 8);
  return b - MAGIC_BITS;
}
static inline i32 fbits(float f) {
  i32 u;
  memcpy(&u, &f, 4);
  return u;
}
static inline float bitsf(i32 u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
/* With AVX-512DQ the steps work in int64 lanes (int64 multiplies and int64 <-> floating
   point conversions vectorise there): fewer operations than through doubles, the same bits.
   Elsewhere they hold the integers in doubles, as the other kernels do. */
#if defined(__AVX512DQ__)
#define INT64_LANES 1
#else
#define INT64_LANES 0
#endif
/* Loop bodies with flags that are constants at each call: one vectorised loop per variant. */
#define BODY static inline __attribute__((always_inline))
#define TWO16 65536.0
#define INV16 0x1p-16
#define HALF16 32768.0

/* Each thread takes one contiguous range [lo, hi); per-thread results go to slot tid_. */
#define MAX_THREADS 256
#ifdef _OPENMP
#define THREAD_IDS tid_ = omp_get_thread_num(); cnt_ = omp_get_num_threads();
#else
#define THREAD_IDS
#endif
#define PAR_BEGIN(n, nt)                                                              \
  int nt_ = (nt) < 1 ? 1 : ((nt) > MAX_THREADS ? MAX_THREADS : (nt));                 \
  if ((n) < 32768) nt_ = 1;                                                           \
  _Pragma("omp parallel num_threads(nt_)")                                            \
  {                                                                                   \
    int tid_ = 0, cnt_ = 1;                                                           \
    THREAD_IDS                                                                        \
    i64 chunk_ = (((n) + cnt_ - 1) / cnt_ + 63) & ~(i64)63;                           \
    i64 lo = tid_ * chunk_, hi = lo + chunk_ < (n) ? lo + chunk_ : (n);               \
    if (lo < hi) {
#define PAR_END \
  }             \
  }

/* floor(a / n) and a mod n for an exact integer |a| < 2**51 and 1 <= n <= 2**16: the product
   with 1 / n is within one of the quotient, which the comparisons correct. */
#define DIVMOD(a, q, m)              \
  double q = floor((a) * inv_n);     \
  double m = (a) - q * n_d;          \
  q = m < 0 ? q - 1 : q;             \
  m = m < 0 ? m + n_d : m;           \
  q = m >= n_d ? q + 1 : q;          \
  m = m >= n_d ? m - n_d : m;

/* f as the eager kernel computes it, and (1 - gamma) f on V's grid, rounded as it rounds it and
   clamped to 2**50 (NaN to 0), a bound no valid step reaches: a step taken on too fine a grid
   stays exactly reversible, and is reversed (see kernels._quantized_f). */
#define G_LIMIT 0x1p50
BODY float f_of(const float* RS out, const float* RS xf, i64 i, int has_xf) {
  return has_xf ? out[i] - xf[i] : out[i];
}
BODY double quantize(float f, float c) {
  double g = (double)rintf(f * c);
  g = g > G_LIMIT ? G_LIMIT : g;
  g = g < -G_LIMIT ? -G_LIMIT : g;
  return g != g ? 0.0 : g;
}

/* The same, as an int64: clamped while a float (2**50 is one), then converted exactly. */
BODY i64 quantize_i(float f, float c) {
  float g = rintf(f * c);
  g = g > 0x1p50f ? 0x1p50f : g;
  g = g < -0x1p50f ? -0x1p50f : g;
  return g != g ? 0 : (i64)g;
}

/* X of (xw, r), and (xw, r) of X (r in place), in int64: float32 xw * 2**s is an integer. */
BODY i64 join_i(const float* RS xw, const i16* RS r, i64 i, float scale) {
  return (i64)(xw[i] * scale) + (i64)r[i];
}
BODY float split_i(i64 X, float inv_scale, i16* RS r, i64 i) {
  float Xf = (float)X; /* rounds to nearest even, as torch's int64 -> float32; 0 is +0 */
  r[i] = (i16)(X - (i64)Xf);
  return Xf * inv_scale;
}

/* floor(a / n) and a mod n for |a| < 2**51 and 1 <= n <= 2**16 in int64 lanes: the double
   quotient is within one of the true one, which the comparisons correct. (Converted with d2i:
   the compiler turns (i64)floor() into a call that does not vectorise.) */
#define DIVMOD_I(a, q, m)                     \
  i64 q = d2i(floor((double)(a) * inv_n));    \
  i64 m = (a) - q * n_i;                      \
  q = m < 0 ? q - 1 : q;                      \
  m = m < 0 ? m + n_i : m;                    \
  q = m >= n_i ? q + 1 : q;                   \
  m = m >= n_i ? m - n_i : m;

static inline double join(const float* RS xw, const i16* RS r, i64 i, float scale) {
  return (double)(xw[i] * scale) + (double)r[i];
}

/* xw and r of an exact X: X rounded to float32 once, and what that rounding left. */
static inline float split(double X, float inv_scale, i16* RS r, i64 i) {
  /* X is an integer; + 0.0 makes a zero +0, as the eager kernels' int64 path does (rintf
     gives -0 for -0 and for small negatives, whose bits the checksums would count). */
  float Xf = (float)(X + 0.0);
  r[i] = (i16)(X - (double)Xf);
  return Xf * inv_scale;
}

/* ---- max |f| --------------------------------------------------------------------------- */
static void abs_max_range(i64 lo, i64 hi, const float* RS out, const float* RS xf, i32* res) {
  i32 m = 0;
  if (xf) {
    for (i64 i = lo; i < hi; i++) {
      i32 u = fbits(fabsf(out[i] - xf[i]));
      m = u > m ? u : m;
    }
  } else {
    for (i64 i = lo; i < hi; i++) {
      i32 u = fbits(fabsf(out[i]));
      m = u > m ? u : m;
    }
  }
  *res = m;
}

API void fxm_abs_max_f(i64 n, const float* out, const float* xf, double* dres, int nt) {
  i32 part[MAX_THREADS] = {0};
  PAR_BEGIN(n, nt)
  abs_max_range(lo, hi, out, xf, &part[tid_]);
  PAR_END
  i32 m = 0;
  for (int t = 0; t < MAX_THREADS; t++) m = part[t] > m ? part[t] : m;
  dres[0] = (double)bitsf(m);
}

/* ---- a chain's input on the grid ---------------------------------------------------------- */
static void on_grid_range(i64 lo, i64 hi, const float* RS x, float scale, float inv_scale,
                          float* RS xw, i16* RS r, i64* sum) {
  i64 s = 0;
  for (i64 i = lo; i < hi; i++) {
    float w = split((double)rintf(x[i] * scale), inv_scale, r, i);
    xw[i] = w;
    s += (i64)fbits(w) + (i64)r[i];
  }
  *sum = s;
}

/* ires = [checksum of (xw, r)] */
API void fxm_on_grid(i64 n, const float* x, float scale, float inv_scale, float* xw, i16* r,
                     i64* ires, int nt) {
  i64 sums[MAX_THREADS] = {0};
  PAR_BEGIN(n, nt)
  on_grid_range(lo, hi, x, scale, inv_scale, xw, r, &sums[tid_]);
  PAR_END
  i64 s = 0;
  for (int t = 0; t < MAX_THREADS; t++) s += sums[t];
  ires[0] = s;
}

/* ---- forward step ------------------------------------------------------------------------- */
/* A step's stores, and the sum and maxima the next step's grid is chosen from. */
#define STORE_STEP(q, vi, xo, f)            \
  head[i] = (i32)(q);                       \
  V[i] = (vi);                              \
  xw_new[i] = (xo);                         \
  s += (vi);                                \
  {                                         \
    i32 u_ = fbits(fabsf(xo));              \
    mx = u_ > mx ? u_ : mx;                 \
    i64 a_ = (vi) < 0 ? -(vi) : (vi);       \
    mv = a_ > mv ? a_ : mv;                 \
    i32 uf_ = fbits(fabsf(f));              \
    mf = uf_ > mf ? uf_ : mf;               \
  }
BODY void forward_body(i64 lo, i64 hi, const float* RS xw, i16* RS r, i64* RS V, i32* RS head,
                       const float* RS out, const float* RS xf, float c, double n_d,
                       float scale, float inv_scale, float* RS xw_new, i64* vsum, i32* xmax,
                       i64* vmax, i32* fmax, int has_xf, int fresh) {
  const double inv_n = 1.0 / n_d;
  i64 s = 0, mv = 0;
  i32 mx = 0, mf = 0;
#if INT64_LANES
  const i64 n_i = (i64)n_d;
  for (i64 i = lo; i < hi; i++) {
    float f = f_of(out, xf, i, has_xf);
    i64 G = quantize_i(f, c);
    i64 v = fresh ? 0 : V[i];
    /* v <- gamma v: V's low 16 bits onto the stack, a digit in [0, n) off it */
    i64 B = ((fresh ? 0 : (i64)head[i]) << 16) | (v & 0xFFFF);
    /* B // n and B % n. The stack spills before a step until its head is below 2**15, so
       0 <= B < 2**31, where the double quotient is within 2**-21 of B / n: truncated, it is
       B // n, or one less where n divides B, which one comparison corrects (a third fewer
       operations in this loop than DIVMOD_I's floor and two-sided correction). */
    i64 q = (i64)((double)B * inv_n);
    i64 rem = B - q * n_i;
    q = rem >= n_i ? q + 1 : q;
    rem = rem >= n_i ? rem - n_i : rem;
    i64 vi = (v >> 16) * n_i + rem + G;
    float xo = split_i(join_i(xw, r, i, scale) + ((vi + 32768) >> 16), inv_scale, r, i);
    STORE_STEP(q, vi, xo, f)
  }
#else
  for (i64 i = lo; i < hi; i++) {
    float f = f_of(out, xf, i, has_xf);
    double G = quantize(f, c);
    double v = fresh ? 0.0 : i2d(V[i]);
    double vhi = floor(v * INV16);
    /* v <- gamma v: V's low 16 bits onto the stack, a digit in [0, n) off it */
    double B = (fresh ? 0.0 : (double)head[i]) * TWO16 + (v - vhi * TWO16);
    DIVMOD(B, q, rem)
    double vn = vhi * n_d + rem + G;
    double X = join(xw, r, i, scale) + floor((vn + HALF16) * INV16);
    float xo = split(X, inv_scale, r, i);
    i64 vi = d2i(vn);
    STORE_STEP(q, vi, xo, f)
  }
#endif
  *vsum = s;
  *xmax = mx;
  *vmax = mv;
  *fmax = mf;
}

static void forward_range(i64 lo, i64 hi, const float* RS xw, i16* RS r, i64* RS V,
                          i32* RS head, const float* RS out, const float* RS xf, float c,
                          double n_d, float scale, float inv_scale, float* RS xw_new,
                          i64* vsum, i32* xmax, i64* vmax, i32* fmax, int fresh) {
#define FORWARD(has_xf, fresh)                                                             \
  forward_body(lo, hi, xw, r, V, head, out, xf, c, n_d, scale, inv_scale, xw_new, vsum, xmax, \
               vmax, fmax, has_xf, fresh)
  if (xf && fresh)
    FORWARD(1, 1);
  else if (xf)
    FORWARD(1, 0);
  else if (fresh)
    FORWARD(0, 1);
  else
    FORWARD(0, 0);
#undef FORWARD
}

/* ires = [sum of the new V]; dres = [max |xw_new|, max |V|, max |f|]. fresh: V and head are
   not read but taken as zero (a chain's first step: they need no zeroing pass). */
API void fxm_forward_step(i64 n, const float* xw, i16* r, i64* V, i32* head, const float* out,
                          const float* xf, float c, i64 gamma_num, float scale,
                          float inv_scale, float* xw_new, i64* ires, double* dres, int fresh,
                          int nt) {
  i64 sums[MAX_THREADS] = {0}, vm[MAX_THREADS] = {0};
  i32 xm[MAX_THREADS] = {0}, fm[MAX_THREADS] = {0};
  PAR_BEGIN(n, nt)
  forward_range(lo, hi, xw, r, V, head, out, xf, c, (double)gamma_num, scale, inv_scale, xw_new,
                &sums[tid_], &xm[tid_], &vm[tid_], &fm[tid_], fresh);
  PAR_END
  i64 s = 0, mv = 0;
  i32 mx = 0, mf = 0;
  for (int t = 0; t < MAX_THREADS; t++) {
    s += sums[t];
    mx = xm[t] > mx ? xm[t] : mx;
    mv = vm[t] > mv ? vm[t] : mv;
    mf = fm[t] > mf ? fm[t] : mf;
  }
  ires[0] = s;
  dres[0] = (double)bitsf(mx);
  dres[1] = (double)mv;
  dres[2] = (double)bitsf(mf);
}

/* ---- x <- x - v ----------------------------------------------------------------------------- */
static void unadd_range(i64 lo, i64 hi, const float* RS xw, i16* RS r, const i64* RS V,
                        float scale, float inv_scale, float* RS xw_new, i64* vsum) {
  i64 s = 0;
  for (i64 i = lo; i < hi; i++) {
    i64 vi = V[i];
    double X = join(xw, r, i, scale) - floor((i2d(vi) + HALF16) * INV16);
    xw_new[i] = split(X, inv_scale, r, i);
    s += vi;
  }
  *vsum = s;
}

API void fxm_unadd(i64 n, const float* xw, i16* r, const i64* V, float scale, float inv_scale,
                   float* xw_new, i64* ires, int nt) {
  i64 sums[MAX_THREADS] = {0};
  PAR_BEGIN(n, nt)
  unadd_range(lo, hi, xw, r, V, scale, inv_scale, xw_new, &sums[tid_]);
  PAR_END
  i64 s = 0;
  for (int t = 0; t < MAX_THREADS; t++) s += sums[t];
  ires[0] = s;
}

/* ---- grid changes (0 < shift < 32) ------------------------------------------------------ */
static void coarsen_range(i64 lo, i64 hi, const float* RS xw, i16* RS r, i64* RS V, double p,
                          double ip, float scale, float inv_scale, float* RS xw_new,
                          i32* RS low_x, i32* RS low_v) {
  const double half = 0.5 * p;
  for (i64 i = lo; i < hi; i++) {
    double X = join(xw, r, i, scale) + half;
    double Xc = floor(X * ip);
    low_x[i] = (i32)(X - Xc * p);
    double Vh = i2d(V[i]) + half;
    double Vc = floor(Vh * ip);
    low_v[i] = (i32)(Vh - Vc * p);
    V[i] = d2i(Vc);
    xw_new[i] = split(Xc, inv_scale, r, i);
  }
}

API void fxm_coarsen(i64 n, const float* xw, i16* r, i64* V, i64 shift, float scale,
                     float inv_scale, float* xw_new, i32* low_x, i32* low_v, int nt) {
  double p = ldexp(1.0, (int)shift), ip = ldexp(1.0, -(int)shift);
  PAR_BEGIN(n, nt)
  coarsen_range(lo, hi, xw, r, V, p, ip, scale, inv_scale, xw_new, low_x, low_v);
  PAR_END
}

static void unadd_unshift_range(i64 lo, i64 hi, const float* RS xw, i16* RS r, const i64* RS V,
                                const i32* RS low_x, double p, float scale, float inv_scale,
                                float* RS xw_new, i64* vsum) {
  const double half = 0.5 * p;
  i64 s = 0;
  for (i64 i = lo; i < hi; i++) {
    i64 vi = V[i];
    double X = join(xw, r, i, scale) - floor((i2d(vi) + HALF16) * INV16);
    X = X * p + (double)low_x[i] - half;
    xw_new[i] = split(X, inv_scale, r, i);
    s += vi;
  }
  *vsum = s;
}

API void fxm_unadd_unshift(i64 n, const float* xw, i16* r, const i64* V, const i32* low_x,
                           i64 shift, float scale, float inv_scale, float* xw_new, i64* ires,
                           int nt) {
  double p = ldexp(1.0, (int)shift);
  i64 sums[MAX_THREADS] = {0};
  PAR_BEGIN(n, nt)
  unadd_unshift_range(lo, hi, xw, r, V, low_x, p, scale, inv_scale, xw_new, &sums[tid_]);
  PAR_END
  i64 s = 0;
  for (int t = 0; t < MAX_THREADS; t++) s += sums[t];
  ires[0] = s;
}

/* In int64, exact for any V (the dtype alone does not bound it: float64 chains use 60 bits). */
static void unshift_v_range(i64 lo, i64 hi, i64* RS V, const i32* RS low_v, int shift) {
  const i64 half = (i64)1 << (shift - 1);
  for (i64 i = lo; i < hi; i++) V[i] = (i64)((uint64_t)V[i] << shift) + (i64)low_v[i] - half;
}

API void fxm_unshift_v(i64 n, i64* V, const i32* low_v, i64 shift, int nt) {
  PAR_BEGIN(n, nt)
  unshift_v_range(lo, hi, V, low_v, (int)shift);
  PAR_END
}

/* ---- backward --------------------------------------------------------------------------- */
static void next_grad_f_range(i64 lo, i64 hi, const float* RS grad_out, float* RS grad_f,
                              float g, float gamma) {
  for (i64 i = lo; i < hi; i++) {
    float a = grad_out[i] * g;
    float b = grad_f[i] * gamma;
    grad_f[i] = a + b;
  }
}

API void fxm_next_grad_f(i64 n, const float* grad_out, float* grad_f, float g, float gamma,
                         int nt) {
  PAR_BEGIN(n, nt)
  next_grad_f_range(lo, hi, grad_out, grad_f, g, gamma);
  PAR_END
}

static void input_grad_range(i64 lo, i64 hi, float* RS gx, const float* RS grad_out,
                             const float* RS minus) {
  if (minus) {
    for (i64 i = lo; i < hi; i++) {
      float t = gx[i] + grad_out[i];
      gx[i] = t - minus[i];
    }
  } else {
    for (i64 i = lo; i < hi; i++) gx[i] = gx[i] + grad_out[i];
  }
}

API void fxm_input_grad(i64 n, float* gx, const float* grad_out, const float* minus, int nt) {
  PAR_BEGIN(n, nt)
  input_grad_range(lo, hi, gx, grad_out, minus);
  PAR_END
}

/* Reverse a step (V, head in place; the sum of V in ires); then, given xw, x <- x - v on the
   same grid, the previous block's input (r in place, xw_prev out). */
BODY void backward_body(i64 lo, i64 hi, i64* RS V, i32* RS head, const float* RS out,
                        const float* RS xf, float c, double n_d, const float* RS xw, i16* RS r,
                        float scale, float inv_scale, float* RS xw_prev, i64* vsum, int has_xf,
                        int rebuild) {
#if INT64_LANES
  const double inv_n = 1.0 / n_d;
  const i64 n_i = (i64)n_d;
  i64 s = 0;
  for (i64 i = lo; i < hi; i++) {
    i64 a = V[i] - quantize_i(f_of(out, xf, i, has_xf), c);
    DIVMOD_I(a, vhi, vlo)
    i64 T = (i64)head[i] * n_i + vlo;
    i64 vi = vhi * 65536 + (T & 0xFFFF);
    head[i] = (i32)(T >> 16);
    V[i] = vi;
    s += vi;
    if (rebuild) {
      i64 X = join_i(xw, r, i, scale) - ((vi + 32768) >> 16);
      xw_prev[i] = split_i(X, inv_scale, r, i);
    }
  }
#else
  const double inv_n = 1.0 / n_d;
  i64 s = 0;
  for (i64 i = lo; i < hi; i++) {
    double a = i2d(V[i]) - quantize(f_of(out, xf, i, has_xf), c);
    DIVMOD(a, vhi, vlo)
    double T = (double)head[i] * n_d + vlo;
    double th = floor(T * INV16);
    double vn = vhi * TWO16 + (T - th * TWO16);
    i64 vi = d2i(vn);
    head[i] = (i32)th;
    V[i] = vi;
    s += vi;
    if (rebuild) {
      double X = join(xw, r, i, scale) - floor((vn + HALF16) * INV16);
      xw_prev[i] = split(X, inv_scale, r, i);
    }
  }
#endif
  *vsum = s;
}

static void backward_range(i64 lo, i64 hi, i64* RS V, i32* RS head, const float* RS out,
                           const float* RS xf, float c, double n_d, const float* RS xw,
                           i16* RS r, float scale, float inv_scale, float* RS xw_prev,
                           i64* vsum) {
#define BACKWARD(has_xf, rebuild)                                                           \
  backward_body(lo, hi, V, head, out, xf, c, n_d, xw, r, scale, inv_scale, xw_prev, vsum,   \
                has_xf, rebuild)
  if (xf && xw_prev)
    BACKWARD(1, 1);
  else if (xf)
    BACKWARD(1, 0);
  else if (xw_prev)
    BACKWARD(0, 1);
  else
    BACKWARD(0, 0);
#undef BACKWARD
}

/* gx += go (- gf where f = out - x); then, given gf_next, the next block's gf for an incoming
   gradient gx (kernels._next_grad_f_, into another buffer). */
BODY void grads_body(i64 lo, i64 hi, float* RS gx, const float* RS go, const float* RS gf,
                     float* RS gf_next, float g, float gamma, int minus, int speculate) {
  for (i64 i = lo; i < hi; i++) {
    float t = gx[i] + go[i];
    if (minus) t = t - gf[i];
    gx[i] = t;
    if (speculate) {
      float a = t * g;
      float b = gf[i] * gamma;
      gf_next[i] = a + b;
    }
  }
}

static void grads_range(i64 lo, i64 hi, float* RS gx, const float* RS go, const float* RS gf,
                        float* RS gf_next, float g, float gamma, int minus) {
  if (minus && gf_next)
    grads_body(lo, hi, gx, go, gf, gf_next, g, gamma, 1, 1);
  else if (minus)
    grads_body(lo, hi, gx, go, gf, gf_next, g, gamma, 1, 0);
  else if (gf_next)
    grads_body(lo, hi, gx, go, gf, gf_next, g, gamma, 0, 1);
  else
    grads_body(lo, hi, gx, go, gf, gf_next, g, gamma, 0, 0);
}

API void fxm_backward_step(i64 n, i64* V, i32* head, const float* out, const float* xf,
                           float c, i64 gamma_num, float* gx, const float* go, const float* gf,
                           float* gf_next, float g, float gamma, const float* xw, i16* r,
                           float scale, float inv_scale, float* xw_prev, i64* ires, int nt) {
  i64 sums[MAX_THREADS] = {0};
  PAR_BEGIN(n, nt)
  backward_range(lo, hi, V, head, out, xf, c, (double)gamma_num, xw, r, scale, inv_scale, xw_prev,
                 &sums[tid_]);
  if (gx) grads_range(lo, hi, gx, go, gf, gf_next, g, gamma, xf != 0);
  PAR_END
  i64 s = 0;
  for (int t = 0; t < MAX_THREADS; t++) s += sums[t];
  ires[0] = s;
}

/* ---- V in 48 bits: its high 32 and its low 16 (int64 arithmetic, exact for any V) ---- */
static void split_wide_range(i64 lo, i64 hi, const i64* RS V, i32* RS high, i16* RS low) {
  for (i64 i = lo; i < hi; i++) {
    high[i] = (i32)(V[i] >> 16);
    low[i] = (i16)(V[i] & 0xFFFF); /* as the int16 it wraps to */
  }
}

API void fxm_split_wide(i64 n, const i64* V, i32* high, i16* low, int nt) {
  PAR_BEGIN(n, nt)
  split_wide_range(lo, hi, V, high, low);
  PAR_END
}

static void join_wide_range(i64 lo, i64 hi, const i32* RS high, const i16* RS low, i64* RS V) {
  for (i64 i = lo; i < hi; i++) V[i] = (i64)((uint64_t)(i64)high[i] << 16) | ((i64)low[i] & 0xFFFF);
}

API void fxm_join_wide(i64 n, const i32* high, const i16* low, i64* V, int nt) {
  PAR_BEGIN(n, nt)
  join_wide_range(lo, hi, high, low, V);
  PAR_END
}

/* ---- checksum ------------------------------------------------------------------------------ */
static void checksum_range(i64 lo, i64 hi, const i32* RS bits, const i16* RS r, i64* sum) {
  i64 s = 0;
  for (i64 i = lo; i < hi; i++) s += (i64)bits[i] + (i64)r[i];
  *sum = s;
}

API void fxm_checksum(i64 n, const i32* bits, const i16* r, i64* ires, int nt) {
  i64 sums[MAX_THREADS] = {0};
  PAR_BEGIN(n, nt)
  checksum_range(lo, hi, bits, r, &sums[tid_]);
  PAR_END
  i64 s = 0;
  for (int t = 0; t < MAX_THREADS; t++) s += sums[t];
  ires[0] = s;
}
/* ---- the momentum update in floating point (engine/update.py) ---------------------------- */
/* v' = g v + h f (h = 1 - g; h f alone without v), f = y - x (subtract) or y; x' = x + v'. */
static void momentum_update_range(i64 lo, i64 hi, const float* RS x, const float* RS y,
                                  const float* RS v, float* RS xo, float* RS vo, float g,
                                  float h, int subtract) {
  if (v && subtract) {
    for (i64 i = lo; i < hi; i++) {
      float w = g * v[i] + h * (y[i] - x[i]);
      vo[i] = w;
      xo[i] = x[i] + w;
    }
  } else if (v) {
    for (i64 i = lo; i < hi; i++) {
      float w = g * v[i] + h * y[i];
      vo[i] = w;
      xo[i] = x[i] + w;
    }
  } else if (subtract) {
    for (i64 i = lo; i < hi; i++) {
      float w = h * (y[i] - x[i]);
      vo[i] = w;
      xo[i] = x[i] + w;
    }
  } else {
    for (i64 i = lo; i < hi; i++) {
      float w = h * y[i];
      vo[i] = w;
      xo[i] = x[i] + w;
    }
  }
}

API void fxm_momentum_update(i64 n, const float* x, const float* y, const float* v, float* xo,
                             float* vo, float g, float h, int subtract, int nt) {
  PAR_BEGIN(n, nt)
  momentum_update_range(lo, hi, x, y, v, xo, vo, g, h, subtract);
  PAR_END
}

/* s = gxo + gvo (either may be NULL); gy = h s; gv = g s (if gv); gx = gxo - gy, or -gy
   without gxo (if gx: a block whose f is y - x). */
static void momentum_update_grad_range(i64 lo, i64 hi, const float* RS gxo,
                                       const float* RS gvo, float* RS gy, float* RS gv,
                                       float* RS gx, float g, float h) {
  for (i64 i = lo; i < hi; i++) {
    float s = gxo ? (gvo ? gxo[i] + gvo[i] : gxo[i]) : gvo[i];
    float t = h * s;
    gy[i] = t;
    if (gv) gv[i] = g * s;
    if (gx) gx[i] = gxo ? gxo[i] - t : -t;
  }
}

API void fxm_momentum_update_grad(i64 n, const float* gxo, const float* gvo, float* gy,
                                  float* gv, float* gx, float g, float h, int nt) {
  PAR_BEGIN(n, nt)
  momentum_update_grad_range(lo, hi, gxo, gvo, gy, gv, gx, g, h);
  PAR_END
}
"""
