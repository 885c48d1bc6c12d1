/*
 * Poisson noise image, compiled: the same arithmetic as rng.py / noise.py
 * (float32 roundings where the original keeps floats, fused multiply-adds
 * where its reference build has them), about a hundred times faster than
 * the Python loop. Loaded with ctypes; no Python API, so no Python headers
 * are needed. Build with -ffp-contract=off: only the explicit fma calls fuse.
 */
#include <math.h>
#include <stdint.h>

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
