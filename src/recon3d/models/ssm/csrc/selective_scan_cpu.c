/*
 * Fused selective scan (Mamba's S6 recurrence) for the CPU: forward and backward.
 *
 * Why a kernel: the recurrence touches B*D*N*L state elements, and every eager PyTorch
 * formulation (sequential or chunked) writes them to memory several times. Here the state of
 * one (batch, channel) pair lives in N registers/L1 lines and each time step costs one exp and
 * a few fused multiply-adds per state, vectorised over N.
 *
 * Layouts (all contiguous, row-major):
 *   u, dt, y, gu, gdt      (B, D, L)          dt already has bias/softplus applied
 *   A, gA                  (D, N)
 *   Bt, Ct, gBt, gCt       (B, G, L, N)       time-major so that one step reads N contiguous values
 *   hlast, ghlast          (B, D, N)
 * Channel d reads group d / (D / G). Each call handles channels [d0, d1) for every batch element,
 * so calls on disjoint channel ranges write disjoint parts of y, gu, gdt, gA; gBt/gCt are summed
 * over channels and therefore accumulated into a buffer owned by the caller of that range.
 *
 * Recurrence (h_{-1} = 0):  h_l = exp(dt_l A) * h_l-1 + dt_l u_l B_l,   y_l = <C_l, h_l>.
 * Backward: with g_l = dL/dh_l (total), g_l = C_l gy_l + exp(dt_{l+1} A) g_{l+1}, and
 *   gC_l += gy_l h_l,  gB_l += g_l dt_l u_l,  gu_l = <g_l, dt_l B_l>,
 *   gdt_l = <g_l, B_l u_l + A exp(dt_l A) h_{l-1}>,  gA += g_l dt_l exp(dt_l A) h_{l-1}.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* glibc declares SIMD variants of exp/expf only under -ffast-math; declaring them here lets the
 * compiler call the vector versions (libmvec) while keeping IEEE semantics everywhere else. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(RECON3D_LIBMVEC)
extern float expf(float) __attribute__((__simd__("notinbranch")));
extern double exp(double) __attribute__((__simd__("notinbranch")));
#endif

#define DEFINE_SCAN(T, SUFFIX, EXP)                                                              \
int64_t recon3d_scan_fwd_##SUFFIX(const T *restrict u, const T *restrict dt, const T *restrict A, \
                                  const T *restrict Bt, const T *restrict Ct, T *restrict y,       \
                                  T *restrict hlast, T *restrict h, int64_t nb, int64_t nd,       \
                                  int64_t L, int64_t n, int64_t ng, int64_t d0, int64_t d1) {     \
    const int64_t dg = nd / ng;                                                                  \
    for (int64_t b = 0; b < nb; ++b) {                                                           \
        for (int64_t d = d0; d < d1; ++d) {                                                      \
            const int64_t row = (b * nd + d) * L;                                                \
            const T *Bp = Bt + (b * ng + d / dg) * L * n;                                        \
            const T *Cp = Ct + (b * ng + d / dg) * L * n;                                        \
            const T *Ap = A + d * n;                                                             \
            memset(h, 0, sizeof(T) * n);                                                         \
            for (int64_t l = 0; l < L; ++l) {                                                    \
                const T dtl = dt[row + l], xl = dtl * u[row + l];                                \
                const T *Bl = Bp + l * n, *Cl = Cp + l * n;                                      \
                T acc = 0;                                                                       \
                _Pragma("omp simd reduction(+:acc)")                                             \
                for (int64_t k = 0; k < n; ++k) {                                                \
                    const T hk = EXP(dtl * Ap[k]) * h[k] + xl * Bl[k];                           \
                    h[k] = hk;                                                                   \
                    acc += Cl[k] * hk;                                                           \
                }                                                                                \
                y[row + l] = acc;                                                                \
            }                                                                                    \
            memcpy(hlast + (b * nd + d) * n, h, sizeof(T) * n);                                  \
        }                                                                                        \
    }                                                                                            \
    return 0;                                                                                    \
}                                                                                                \
                                                                                                 \
int64_t recon3d_scan_bwd_##SUFFIX(const T *restrict u, const T *restrict dt, const T *restrict A, \
                                  const T *restrict Bt, const T *restrict Ct,                     \
                                  const T *restrict gy, const T *restrict ghlast,                 \
                                  T *restrict gu, T *restrict gdt, T *restrict gA,                \
                                  T *restrict gBt, T *restrict gCt, T *restrict hs,               \
                                  T *restrict carry, T *restrict gAk, int64_t nb, int64_t nd,     \
                                  int64_t L, int64_t n, int64_t ng, int64_t d0, int64_t d1) {     \
    const int64_t dg = nd / ng;                                                                  \
    for (int64_t d = d0; d < d1; ++d) {                                                          \
        const T *Ap = A + d * n;                                                                 \
        memset(gAk, 0, sizeof(T) * n);                                                           \
        for (int64_t b = 0; b < nb; ++b) {                                                       \
            const int64_t row = (b * nd + d) * L;                                                \
            const int64_t grp = (b * ng + d / dg) * L * n;                                       \
            const T *Bp = Bt + grp, *Cp = Ct + grp;                                              \
            T *gBp = gBt + grp, *gCp = gCt + grp;                                                \
            /* recompute the states h_0..h_{L-1} of this (b, d) pair (L*N scratch, cache-sized) */ \
            memset(carry, 0, sizeof(T) * n);                                                     \
            for (int64_t l = 0; l < L; ++l) {                                                    \
                const T dtl = dt[row + l], xl = dtl * u[row + l];                                \
                const T *Bl = Bp + l * n;                                                        \
                T *hl = hs + l * n;                                                              \
                _Pragma("omp simd")                                                              \
                for (int64_t k = 0; k < n; ++k) {                                                \
                    carry[k] = EXP(dtl * Ap[k]) * carry[k] + xl * Bl[k];                         \
                    hl[k] = carry[k];                                                            \
                }                                                                                \
            }                                                                                    \
            if (ghlast) memcpy(carry, ghlast + (b * nd + d) * n, sizeof(T) * n);                 \
            else memset(carry, 0, sizeof(T) * n);                                                \
            for (int64_t l = L - 1; l >= 0; --l) {                                               \
                const T dtl = dt[row + l], ul = u[row + l], gyl = gy[row + l];                   \
                const T *Bl = Bp + l * n, *Cl = Cp + l * n, *hl = hs + l * n;                    \
                T *gBl = gBp + l * n, *gCl = gCp + l * n;                                        \
                const T dtu = dtl * ul;                                                          \
                T gu_acc = 0, gdt_acc = 0;                                                       \
                if (l > 0) {                                                                     \
                    const T *hp = hs + (l - 1) * n;                                              \
                    _Pragma("omp simd reduction(+:gu_acc, gdt_acc)")                             \
                    for (int64_t k = 0; k < n; ++k) {                                            \
                        const T a = EXP(dtl * Ap[k]);                                            \
                        const T g = carry[k] + Cl[k] * gyl;                                      \
                        const T ah = a * hp[k];                                                  \
                        gCl[k] += gyl * hl[k];                                                   \
                        gBl[k] += g * dtu;                                                       \
                        gu_acc += g * Bl[k];                                                     \
                        gdt_acc += g * (Bl[k] * ul + Ap[k] * ah);                                \
                        gAk[k] += g * dtl * ah;                                                  \
                        carry[k] = g * a;                                                        \
                    }                                                                            \
                } else {                                                                         \
                    _Pragma("omp simd reduction(+:gu_acc, gdt_acc)")                             \
                    for (int64_t k = 0; k < n; ++k) {                                            \
                        const T g = carry[k] + Cl[k] * gyl;                                      \
                        gCl[k] += gyl * hl[k];                                                   \
                        gBl[k] += g * dtu;                                                       \
                        gu_acc += g * Bl[k];                                                     \
                        gdt_acc += g * Bl[k] * ul;                                               \
                    }                                                                            \
                }                                                                                \
                gu[row + l] = gu_acc * dtl;                                                      \
                gdt[row + l] = gdt_acc;                                                          \
            }                                                                                    \
        }                                                                                        \
        memcpy(gA + d * n, gAk, sizeof(T) * n);                                                  \
    }                                                                                            \
    return 0;                                                                                    \
}

DEFINE_SCAN(float, f32, expf)
DEFINE_SCAN(double, f64, exp)
