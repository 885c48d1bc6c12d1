/*
 * Poisson noise image, compiled: the same arithmetic as rng.py / noise.py
 * (float32 roundings where the original keeps floats, fused multiply-adds
 * where its reference build has them), about a hundred times faster than
 * the Python loop. Loaded with ctypes; no Python API, so no Python headers
 * are needed. Build with -ffp-contract=off: only the explicit fma calls fuse.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define IA 16807
#define IM 2147483647
#define IQ 127773
#define IR 2836
#define NTAB 32
#define NDIV (1 + (IM - 1) / NTAB)
#define RNMX (1.0 - 1.2e-7)

typedef struct {
    long idum, iy;
    long iv[NTAB];
    float oldm, g, sq, alxm;
    int gauss_iset;
    float gauss_gset;
} stream_t;

static void table_init(stream_t *s) {
    long idum = (-s->idum < 1) ? 1 : -s->idum;
    for (int j = NTAB + 7; j >= 0; j--) {
        long k = idum / IQ;
        idum = IA * (idum - k * IQ) - IR * k;
        if (idum < 0) idum += IM;
        if (j < NTAB) s->iv[j] = idum;
    }
    s->iy = s->iv[0];
    s->idum = idum;
}

static float uniform(stream_t *s) {
    if (s->idum <= 0 || !s->iy) table_init(s);
    long k = s->idum / IQ;
    s->idum = IA * (s->idum - k * IQ) - IR * k;
    if (s->idum < 0) s->idum += IM;
    long j = s->iy / NDIV;
    s->iy = s->iv[j];
    s->iv[j] = s->idum;
    float temp = (float)((1.0 / IM) * s->iy);
    return (temp > RNMX) ? (float)RNMX : temp;
}

static float log_gamma(float xx, int fused) {
    static const double c[6] = {76.18009172947146, -86.50532032941677, 24.01409824083091,
                                -1.231739572450155, 0.1208650973866179e-2, -0.5395239384953e-5};
    double x = xx, y = xx;
    double tmp = x + 5.5;
    tmp = fused ? fma(-(x + 0.5), log(tmp), tmp) : tmp - (x + 0.5) * log(tmp);
    double ser = 1.000000000190015;
    for (int j = 0; j < 6; j++) {
        y += 1.0;
        ser += c[j] / y;
    }
    return (float)(-tmp + log(2.5066282746310005 * ser / x));
}

static float normal(stream_t *s, int fused) {
    if (s->gauss_iset == 0) {
        float v1, v2, rsq;
        do {
            v1 = (float)(2.0 * uniform(s) - 1.0);
            v2 = (float)(2.0 * uniform(s) - 1.0);
            rsq = fused ? fmaf(v1, v1, (float)((double)v2 * v2)) : (float)((float)((double)v1 * v1) + (float)((double)v2 * v2));
        } while (rsq >= 1.0 || rsq == 0.0);
        float fac = (float)sqrt(-2.0 * log(rsq) / rsq);
        s->gauss_gset = (float)((double)v1 * fac);
        s->gauss_iset = 1;
        return (float)((double)v2 * fac);
    }
    s->gauss_iset = 0;
    return s->gauss_gset;
}

static double poisson(float xm, stream_t *s, int fused) {
    if (xm > 1.0e6) {
        float dev = normal(s, fused);
        return fused ? (float)fma(sqrt(xm), dev, xm) : (float)(xm + sqrt(xm) * dev);
    }
    if (xm < 12.0) {
        if (xm != s->oldm) {
            s->oldm = xm;
            s->g = (float)exp(-(double)xm);
        }
        double em = -1.0;
        float t = 1.0f;
        do {
            em += 1.0;
            t = (float)((double)t * uniform(s));
        } while (t > s->g);
        return em;
    }
    if (xm != s->oldm) {
        s->oldm = xm;
        s->sq = (float)sqrt(2.0 * xm);
        s->alxm = (float)log((double)xm);
        float gl = log_gamma((float)(xm + 1.0), fused);
        s->g = fused ? fmaf(xm, s->alxm, -gl) : (float)((float)((double)xm * s->alxm) - gl);
    }
    double em;
    float y, t;
    do {
        float emf;
        do {
            y = (float)tan(M_PI * (double)uniform(s));
            emf = fused ? fmaf(s->sq, y, xm) : (float)((float)((double)s->sq * y) + xm);
        } while (emf < 0.0);
        em = isfinite(emf) ? floor(emf) : emf;
        float gl = log_gamma((float)(em + 1.0), fused);
        float e = fused ? (float)(fmaf((float)em, s->alxm, -gl) - s->g)
                        : (float)((float)((float)(em * s->alxm) - gl) - s->g);
        t = (float)(0.9 * (1.0 + (float)((double)y * y)) * exp((double)e));
    } while (uniform(s) > t);
    return em;
}

static unsigned short to_ushort(double v) {
    if (v != v || fabs(v) >= 2147483648.0) return 0;
    return (unsigned short)((long)v & 0xFFFF);
}

/* Fills out[] over the inclusive ROI (others untouched); returns 0. */
int tb_noise_image(const float *image, int spixels, int fpixels, int xmin, int xmax, int ymin, int ymax,
                   long seed, double adc, int fused, unsigned short *out, double *photons, long *overloads) {
    stream_t s = {0};
    s.idum = seed;
    s.oldm = -1.0f;
    double total = 0.0;
    long over = 0;
    for (int y = ymin; y <= ymax && y < spixels; y++) {
        for (int x = xmin; x <= xmax && x < fpixels; x++) {
            double n = poisson(image[(long)y * fpixels + x], &s, fused);
            total += n;
            double test = n + adc;
            if (test > 65535.0) {
                test = 65535.0;
                over++;
            }
            out[(long)y * fpixels + x] = to_ushort(test);
        }
    }
    *photons = total;
    *overloads = over;
    return 0;
}

/* out[i] = a[i]*b + c with one rounding, as the reference build computes pixel*scale + adc. */
void tb_fma_array(const double *a, long n, double b, double c, double *out) {
    for (long i = 0; i < n; i++) out[i] = fma(a[i], b, c);
}

/* The sum of values[0..n) added one at a time, left to right, in double. */
double tb_running_sum(const double *values, long n) {
    double total = 0.0;
    for (long i = 0; i < n; i++) total += values[i];
    return total;
}

/* The integer image of floats img[0..n): floorf(pixel*scale + adc + 0.5)
   clamped to 0..65535, converted as a C double -> unsigned short; `fused`:
   pixel*scale + adc with one rounding. */
void tb_int_image(const float *img, long n, double scale, double adc, int fused, unsigned short *out) {
    for (long i = 0; i < n; i++) {
        double v = (double)img[i];
        double test = fused ? fma(v, scale, adc) : v * scale + adc;
        if (test > 65535.0) test = 65535.0;
        if (test < 0.0) test = 0.0;
        out[i] = to_ushort((double)floorf((float)(test + 0.5)));
    }
}

/* Running sums, left to right in double, of the pixels and of their squares
   taken in float (as the reference's float*float). */
void tb_float_moments(const float *v, long n, double *sum, double *sumsq) {
    double s = 0.0, q = 0.0;
    for (long i = 0; i < n; i++) {
        float sq = v[i] * v[i];
        s += (double)v[i];
        q += (double)sq;
    }
    *sum = s;
    *sumsq = q;
}

/* Running sum of (pixel - mean)^2 in double. */
double tb_deviation_sq(const float *v, long n, double mean) {
    double q = 0.0;
    for (long i = 0; i < n; i++) {
        double d = (double)v[i] - mean;
        q += d * d;
    }
    return q;
}

/* ---- noisify: two seed words over one generator state ---------------------------------- */

/* Bytes of the generator state the noisify functions share (allocated by the caller, zeroed). */
long tb_stream_size(void) { return (long)sizeof(stream_t); }

static float draw_normal(stream_t *s, long *word) {
    s->idum = *word;
    float v = normal(s, 0);
    *word = s->idum;
    return v;
}

/* Flicker and calibration factors and Poisson photons, pixel by pixel, as
   noisify: the -seed and -calib_seed words take turns on one shuffle table
   and one set of spare deviates (statics in the original). `s` must start
   zeroed; *seed_word returns the -seed word for the read-out noise. */
void tb_noisify_photons(const float *in, long n, long seed, long calib_seed, double flicker, double calibration,
                        stream_t *s, long *seed_word, float *out, double *total) {
    long sw = seed, cw = calib_seed;
    double sum = 0.0;
    if (s->iy == 0 && s->idum == 0) s->oldm = -1.0f;
    for (long i = 0; i < n; i++) {
        double p = in[i];
        if (flicker > 0.0) p *= 1.0 + flicker * draw_normal(s, &sw);
        if (calibration > 0.0) p *= 1.0 + calibration * draw_normal(s, &cw);
        s->idum = sw;
        out[i] = (float)poisson((float)p, s, 0);
        sw = s->idum;
        sum += out[i];
    }
    *seed_word = sw;
    *total = sum;
}

/* n read-out noise values (ADU) continuing the -seed word. */
void tb_noisify_read_noise(stream_t *s, long seed_word, long n, double readout, double *out) {
    long sw = seed_word;
    for (long i = 0; i < n; i++) out[i] = readout * draw_normal(s, &sw);
}

static int c_int(double x) { return (x != x || fabs(x) >= 2147483648.0) ? INT32_MIN : (int)x; }

/* noisify's PSF disc of each source pixel (radius from its photons unless
   user_radius != 0; gauss: kind 0, fiber: kind 1) and the photons beyond
   it, summed left to right. Sources below 0.01 photons (an undefined case
   of the original's Gaussian rule) keep one pixel. */
void tb_noisify_psf_radii(const double *photons, long n, int kind, double fwhm, double g, int user_radius,
                          int maxwidth, long *radii, double *lost_total) {
    double lost_sum = 0.0;
    for (long i = 0; i < n; i++) {
        double v = photons[i];
        int r = user_radius;
        if (user_radius == 0) {
            double lost = sqrt(v) / 10.0;
            if (kind == 0) {
                double arg = -log(lost / v) / log(16);
                r = arg < 0 ? 1 : c_int(1 + ceil(sqrt(arg) * fwhm));
            } else {
                r = c_int(1 + ceil(g * (v / lost)));
            }
        }
        if (r == 0) r = 1;
        if (r > maxwidth) r = maxwidth;
        radii[i] = r;
        if (kind == 0) {
            double rsq = r;
            rsq = rsq / fwhm;
            rsq = rsq * rsq;
            lost_sum += v * exp(-log(16) * rsq);
        } else {
            lost_sum += v * g / sqrt(g * g + r * r);
        }
    }
    *lost_total = lost_sum;
}

/* noisify's spread of each source pixel over its disc of the kernel
   ((2R+1)^2, zero outside the kernel's own disc), in the original's order
   (sources in turn, dx outer, dy inner; each sum rounded to float), with its
   bounds test (x may reach the width: the first pixel of the next row).
   out holds H*W+1 floats. */
void tb_noisify_psf_spread(const long *src, const double *vals, const long *radii, long m, int W, int H,
                           const double *kernel, int R, float *out) {
    long n = (long)W * H;
    int ks = 2 * R + 1;
    for (long q = 0; q < m; q++) {
        int x0 = (int)(src[q] % W), y0 = (int)(src[q] / W);
        int r = (int)radii[q];
        double v = vals[q];
        for (int dx = -r; dx <= r; dx++) {
            if (dx < -R || dx > R) continue;
            for (int dy = -r; dy <= r; dy++) {
                if (dy < -R || dy > R) continue;
                double k = kernel[ks * (R + dy) + R + dx];
                if (k == 0.0 || dx * dx + dy * dy > r * r) continue;
                int x = x0 + dx, y = y0 + dy;
                if (x < 0 || x > W || y < 0 || y > H) continue;
                long j = (long)y * W + x;
                if (j < 0 || j > n) continue;
                out[j] += v * k;
            }
        }
    }
}

/* ---- detector sampling: independent streams, any thread count -------------------------- */

/* DetectorResponse.sample's two per-pixel passes. Every chunk of TB_CHUNK
   pixels draws from its own xoshiro256++ stream, keyed by (seed, pass,
   chunk), so a reading depends on the seed only, not on the threads that
   compute it. OpenMP runs the chunks in parallel when the build has it,
   handed out in turn (a thread slowed by other work takes fewer). */
#ifdef _OPENMP
#define TB_PRAGMA(x) _Pragma(#x)
#define TB_PARALLEL(n) TB_PRAGMA(omp parallel for schedule(dynamic, 16) num_threads(n))
#else
#define TB_PARALLEL(n) (void)threads; /* one thread */
#endif

#define TB_CHUNK 4096

typedef struct { uint64_t s[4]; } xo_t;

static uint64_t splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void xo_seed(xo_t *g, uint64_t seed, uint64_t stream) {
    uint64_t x = stream;
    uint64_t key = seed ^ splitmix(&x);
    for (int i = 0; i < 4; i++) g->s[i] = splitmix(&key);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t xo_next(xo_t *g) {
    uint64_t *s = g->s;
    uint64_t r = rotl(s[0] + s[3], 23) + s[0];
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

/* uniform on the open interval (0, 1) */
static inline double xo_open(xo_t *g) { return ((double)(int64_t)(xo_next(g) >> 11) + 0.5) * 0x1.0p-53; }

/* ln k!: a table below 16, Stirling's series above (error < 1e-12) */
static double log_factorial(double k) {
    static const double table[16] = {
        0.0, 0.0, 0.69314718055994531, 1.7917594692280550, 3.1780538303479458, 4.7874917427820460,
        6.5792512120101010, 8.5251613610654143, 10.604602902745251, 12.801827480081469, 15.104412573075516,
        17.502307845873887, 19.987214495661886, 22.552163853123423, 25.191221182738683, 27.899271383840894};
    if (k < 16.0) return table[(int)k];
    double n = k + 1.0, r = 1.0 / n, r2 = r * r;
    return (n - 0.5) * log(n) - n + 0.91893853320467274 + r * (1.0 / 12 - r2 * (1.0 / 360 - r2 / 1260));
}

static const double inverse_k[64] = {
    0, 1.0 / 1, 1.0 / 2, 1.0 / 3, 1.0 / 4, 1.0 / 5, 1.0 / 6, 1.0 / 7, 1.0 / 8, 1.0 / 9, 1.0 / 10, 1.0 / 11,
    1.0 / 12, 1.0 / 13, 1.0 / 14, 1.0 / 15, 1.0 / 16, 1.0 / 17, 1.0 / 18, 1.0 / 19, 1.0 / 20, 1.0 / 21, 1.0 / 22,
    1.0 / 23, 1.0 / 24, 1.0 / 25, 1.0 / 26, 1.0 / 27, 1.0 / 28, 1.0 / 29, 1.0 / 30, 1.0 / 31, 1.0 / 32, 1.0 / 33,
    1.0 / 34, 1.0 / 35, 1.0 / 36, 1.0 / 37, 1.0 / 38, 1.0 / 39, 1.0 / 40, 1.0 / 41, 1.0 / 42, 1.0 / 43, 1.0 / 44,
    1.0 / 45, 1.0 / 46, 1.0 / 47, 1.0 / 48, 1.0 / 49, 1.0 / 50, 1.0 / 51, 1.0 / 52, 1.0 / 53, 1.0 / 54, 1.0 / 55,
    1.0 / 56, 1.0 / 57, 1.0 / 58, 1.0 / 59, 1.0 / 60, 1.0 / 61, 1.0 / 62, 1.0 / 63};

/* One Poisson deviate of mean lam. Below 10: inversion, walking up the
   cumulative distribution (about lam + 1 steps). From 10: Hormann's
   transformed rejection with squeeze (PTRS, 1993), about 1.15 tries. */
static double poisson_fast(double lam, xo_t *g) {
    if (!(lam > 0.0)) return lam != lam ? lam : 0.0;
    if (lam < 10.0) {
        double u = xo_open(g), p = exp(-lam), cdf = p;
        int k = 0;
        if (lam < 2.5) {
            /* the first 8 steps without branches (no mispredictions): P(k >= 8) < 0.0012 */
            for (int j = 1; j <= 8; j++) {
                k += u > cdf;
                p *= lam * inverse_k[j];
                cdf += p;
            }
            if (k < 8) return k;
        }
        /* P(k >= 63) < 1e-30 at lam < 10 */
        while (u > cdf && k < 63) {
            k++;
            p *= lam * inverse_k[k];
            cdf += p;
        }
        return k;
    }
    if (isinf(lam)) return lam;
    double slam = sqrt(lam), loglam = log(lam);
    double b = 0.931 + 2.53 * slam, a = -0.059 + 0.02483 * b;
    double log_alpha = log(1.1239 + 1.1328 / (b - 3.4)), vr = 0.9277 - 3.6224 / (b - 2.0);
    for (;;) {
        double u = xo_open(g) - 0.5, v = xo_open(g);
        double us = 0.5 - fabs(u);
        double k = floor((2.0 * a / us + b) * u + lam + 0.43);
        if (us >= 0.07 && v <= vr) return k;
        if (k < 0.0 || (us < 0.013 && v > us)) continue;
        if (log(v) + log_alpha - log(a / (us * us) + b) <= -lam + k * loglam - log_factorial(k)) return k;
    }
}

/* Standard normal deviates: Marsaglia and Tsang's ziggurat, 256 layers. */
#define ZIG_R 3.6541528853610088
#define ZIG_V 0.00492867323399
static double zig_x[257], zig_f[257];

/* the layer edges, computed once when the library is loaded */
__attribute__((constructor)) static void zig_init(void) {
    zig_x[0] = ZIG_V / exp(-0.5 * ZIG_R * ZIG_R);
    zig_x[1] = ZIG_R;
    for (int i = 1; i < 256; i++) {
        double f = exp(-0.5 * zig_x[i] * zig_x[i]);
        double y = ZIG_V / zig_x[i] + f;
        zig_x[i + 1] = (i == 255 || y >= 1.0) ? 0.0 : sqrt(-2.0 * log(y));
    }
    zig_x[256] = 0.0;
    for (int i = 0; i <= 256; i++) zig_f[i] = exp(-0.5 * zig_x[i] * zig_x[i]);
}

static inline double with_sign(double x, uint64_t bit) {
    /* x with its sign bit flipped when bit (a random bit) is set: no branch to mispredict */
    uint64_t u;
    memcpy(&u, &x, 8);
    u ^= bit;
    memcpy(&x, &u, 8);
    return x;
}

static inline double normal_fast(xo_t *g) {
    for (;;) {
        uint64_t r = xo_next(g);
        int i = (int)(r & 255);
        uint64_t sign = (r & 256) << 55;
        double x = (double)(int64_t)(r >> 11) * 0x1.0p-53 * zig_x[i];
        if (x < zig_x[i + 1]) return with_sign(x, sign);
        if (i == 0) {
            /* the tail beyond R */
            double a, b;
            do {
                a = -log(xo_open(g)) / ZIG_R;
                b = -log(xo_open(g));
            } while (b + b < a * a);
            return with_sign(ZIG_R + a, sign);
        }
        double y = zig_f[i] + xo_open(g) * (zig_f[i + 1] - zig_f[i]);
        if (y < exp(-0.5 * x * x)) return with_sign(x, sign);
    }
}

#ifdef _OPENMP
static int threads_for(long chunks, int threads) {
    if (threads < 1) threads = 1;
    return chunks < threads ? (int)(chunks > 0 ? chunks : 1) : threads;
}
#endif

/* counts[i] = Poisson(max(photons[i], 0) * factor[i]) (factor NULL: 1),
   for i < n, stream pass 0. */
#define TB_POISSON(NAME, T)                                                                              \
    void NAME(const T *photons, const T *factor, long n, uint64_t seed, int threads, T *counts) {        \
        long chunks = (n + TB_CHUNK - 1) / TB_CHUNK;                                                       \
        TB_PARALLEL(threads_for(chunks, threads))                                                          \
        for (long c = 0; c < chunks; c++) {                                                                \
            xo_t g;                                                                                        \
            xo_seed(&g, seed, (uint64_t)c << 1);                                                           \
            long end = (c + 1) * TB_CHUNK < n ? (c + 1) * TB_CHUNK : n;                                    \
            for (long i = c * TB_CHUNK; i < end; i++) {                                                    \
                double lam = photons[i];                                                                   \
                if (factor) lam *= factor[i];                                                              \
                counts[i] = (T)poisson_fast(lam, &g);                                                      \
            }                                                                                              \
        }                                                                                                  \
    }
TB_POISSON(tb_poisson_f32, float)
TB_POISSON(tb_poisson_f64, double)

/* out = min(gain * blur(in) + offset + readout * N(0, 1), overload) over a
   view of `batches` blocks `bstride` values apart of `rows` rows `stride`
   values apart of `cols` contiguous values, packed in `out`; stream pass 1,
   one stream per chunk of TB_CHUNK output values. readout 0: no deviates;
   overload NAN: no clamp. radius 0: no blur; otherwise the separable kernel
   taps_s (x) taps_f, each 2 radius + 1 long, with zeros beyond the edges
   (the FFT's linear convolution), through `tmp` (batches * rows * cols). */
#define TB_READOUT(NAME, T)                                                                              \
    void NAME(const T *in, long batches, long rows, long cols, long bstride, long stride, const T *taps_s, \
              const T *taps_f, int radius, double gain, double offset, double readout, double overload,    \
              uint64_t seed, int threads, T *tmp, T *out) {                                                \
        long n = batches * rows * cols, chunks = (n + TB_CHUNK - 1) / TB_CHUNK;                            \
        int clamp = overload == overload;                                                                  \
        if (radius > 0) {                                                                                  \
            /* the fast direction first, row by row */                                                    \
            TB_PARALLEL(threads_for(batches * rows, threads))                                              \
            for (long r = 0; r < batches * rows; r++) {                                                    \
                const T *src = in + (r / rows) * bstride + (r % rows) * stride;                            \
                T *dst = tmp + r * cols;                                                                   \
                for (long c = 0; c < cols; c++) dst[c] = 0;                                                \
                for (int t = -radius; t <= radius; t++) {                                                  \
                    T w = taps_f[t + radius];                                                              \
                    long lo = t < 0 ? -t : 0, hi = t > 0 ? cols - t : cols;                                \
                    for (long c = lo; c < hi; c++) dst[c] += w * src[c + t];                               \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        TB_PARALLEL(threads_for(chunks, threads))                                                          \
        for (long c = 0; c < chunks; c++) {                                                                \
            xo_t g;                                                                                        \
            T seg[TB_CHUNK];                                                                               \
            xo_seed(&g, seed, ((uint64_t)c << 1) | 1);                                                     \
            long i = c * TB_CHUNK, end = i + TB_CHUNK < n ? i + TB_CHUNK : n;                              \
            while (i < end) {                                                                              \
                long b = i / (rows * cols), row = i / cols % rows, col = i % cols;                         \
                long len = end - i < cols - col ? end - i : cols - col;                                    \
                const T *v;                                                                                \
                if (radius > 0) {                                                                          \
                    /* then the slow direction, a row segment at a time */                                \
                    for (long j = 0; j < len; j++) seg[j] = 0;                                             \
                    for (int t = -radius; t <= radius; t++) {                                              \
                        if (row + t < 0 || row + t >= rows) continue;                                      \
                        const T *src = tmp + (b * rows + row + t) * cols + col;                            \
                        T w = taps_s[t + radius];                                                          \
                        for (long j = 0; j < len; j++) seg[j] += w * src[j];                               \
                    }                                                                                      \
                    v = seg;                                                                               \
                } else {                                                                                   \
                    v = in + b * bstride + row * stride + col;                                             \
                }                                                                                          \
                for (long j = 0; j < len; j++) {                                                           \
                    double x = gain * v[j] + offset;                                                       \
                    if (readout > 0.0) x += readout * normal_fast(&g);                                     \
                    if (clamp && x > overload) x = overload;                                               \
                    out[i + j] = (T)x;                                                                     \
                }                                                                                          \
                i += len;                                                                                  \
            }                                                                                              \
        }                                                                                                  \
    }
TB_READOUT(tb_readout_f32, float)
TB_READOUT(tb_readout_f64, double)

/* ---- nonBragg: the interval walk of a .stol table that goes back ------------------------ */

/* For each of v[0..n) in turn, from the previous one's place in padded[0..m)
   (the table with two guard points at each end): up while above the point
   there, then down while below it; out[i] = where it stops. */
void tb_stol_walk(const double *padded, long m, const double *v, long n, int64_t *out) {
    long at = 0, top = m - 1;
    for (long i = 0; i < n; i++) {
        double x = v[i];
        while (x > padded[at] && at < top) at++;
        while (x < padded[at] && at >= 2) at--;
        out[i] = at;
    }
}

/* F of one molecule at cell positions y[0..n) of a Background's lookup grid
   (models/background.py, _from_cells): the cell, the side of its table point,
   that row's cubic in the offset from the cell, with the same operations
   in the same order as the torch code, so the same values. */
#define TB_CELLS(NAME, T, FLOOR)                                                                         \
    void NAME(const T *y, long n, const T *knot_in, const T *packed, long cells, T *out) {                \
        const T top = (T)(cells - 1);                                                                      \
        for (long i = 0; i < n; i++) {                                                                     \
            T v = y[i], c = v;                                                                             \
            if (c < 0) c = 0;                                                                              \
            if (c > top) c = top;                                                                          \
            if (c != c) {                                                                                  \
                out[i] = c;                                                                                \
                continue;                                                                                  \
            }                                                                                              \
            c = FLOOR(c);                                                                                  \
            long cell = (long)c;                                                                           \
            const T *k = packed + 4 * (2 * cell + (v >= knot_in[cell]));                                   \
            T u = v - c;                                                                                   \
            out[i] = ((k[3] * u + k[2]) * u + k[1]) * u + k[0];                                            \
        }                                                                                                  \
    }
TB_CELLS(tb_stol_cells_f32, float, floorf)
TB_CELLS(tb_stol_cells_f64, double, floor)

/* The same at stol values x[0..n) whose table intervals are known (a table
   that goes back: the walk's): the interval's cubic in x - its origin. */
#define TB_INTERVALS(NAME, T)                                                                            \
    void NAME(const T *x, long n, const int64_t *interval, const T *origins, const T *coeffs, T *out) {   \
        for (long i = 0; i < n; i++) {                                                                     \
            int64_t j = interval[i];                                                                       \
            const T *k = coeffs + 4 * j;                                                                   \
            T u = x[i] - origins[j];                                                                       \
            out[i] = ((k[3] * u + k[2]) * u + k[1]) * u + k[0];                                            \
        }                                                                                                  \
    }
TB_INTERVALS(tb_stol_intervals_f32, float)
TB_INTERVALS(tb_stol_intervals_f64, double)
