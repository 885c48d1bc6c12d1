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
