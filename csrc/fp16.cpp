// Row conversion of IEEE halves to float32 with a run-time choice of instructions (see fp16.h).
// The wheel is built for baseline x86-64; F16C code lives in one function compiled for that
// extension and is called only after the CPU says it has it.
#include "fp16.h"

#include <atomic>

namespace fastgen {

namespace {

std::atomic<bool> g_baseline_only{false};

void half_row_portable(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#ifdef FASTGEN_SSE2
    for (; i + 4 <= n; i += 4) {
        const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));  // 4 x 16 bit
        _mm_storeu_ps(dst + i, half_to_float4(_mm_unpacklo_epi16(h, _mm_setzero_si128())));
    }
#endif
    for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

#ifdef FASTGEN_F16C
__attribute__((target("avx,f16c"))) void half_row_f16c(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

bool cpu_has_f16c() {
    static const bool has = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
    }();
    return has;
}
#endif

}  // namespace

const char* half_conversion() {
#ifdef FASTGEN_F16C
    if (!g_baseline_only.load(std::memory_order_relaxed) && cpu_has_f16c()) return "f16c";
#endif
#ifdef FASTGEN_SSE2
    return "sse2";
#else
    return "scalar";
#endif
}

void half_row_to_float(const uint16_t* src, float* dst, int64_t n) {
#ifdef FASTGEN_F16C
    if (!g_baseline_only.load(std::memory_order_relaxed) && cpu_has_f16c()) {
        half_row_f16c(src, dst, n);
        return;
    }
#endif
    half_row_portable(src, dst, n);
}

bool set_half_baseline_only(bool baseline_only) { return g_baseline_only.exchange(baseline_only); }

}  // namespace fastgen
