// Exact conversions of 16-bit floats (IEEE half, bfloat16) to float32, scalar and SSE2.
//
// Both are exact (every 16-bit value is representable in float32), and neither relies on float32
// subnormal arithmetic, so they give the same bits whether or not the thread flushes denormals
// (torch.set_flush_denormal): a half subnormal becomes a *normal* float32 by subtracting two normal
// floats. The tests check every one of the 65536 bit patterns against PyTorch's conversion.
#pragma once

#include <cstdint>
#include <cstring>

// FASTGEN_NO_SIMD builds the portable code only (how the scalar paths get tested on x86-64).
#if (defined(__SSE2__) || defined(_M_X64)) && !defined(FASTGEN_NO_SIMD)
#include <emmintrin.h>
#define FASTGEN_SSE2 1
#endif
#if defined(__GNUC__) && defined(__x86_64__) && !defined(FASTGEN_NO_SIMD)
#include <immintrin.h>
#define FASTGEN_F16C 1  // compiled for every x86-64 build, used only where the CPU has it
#endif

namespace fastgen {

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t{h} << 16); }

// IEEE half -> float32 (after F. Giesen, "half_to_float_fast4"): move exponent and mantissa into
// place and rebias; infinities/NaNs get the all-ones exponent; zeros and subnormals are
// renormalised as (2^-14 * (1 + m/1024)) - 2^-14, which is exact.
inline float half_to_float(uint16_t h) {
    constexpr uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (uint32_t{h} & 0x7fffu) << 13;
    const uint32_t exp = o & shifted_exp;
    o += (127u - 15u) << 23;
    if (exp == shifted_exp) {
        o += (128u - 16u) << 23;
    } else if (exp == 0) {
        o += 1u << 23;
        o = float_to_bits(bits_to_float(o) - bits_to_float(113u << 23));
    }
    return bits_to_float(o | ((uint32_t{h} & 0x8000u) << 16));
}

#ifdef FASTGEN_SSE2
// Four halves, zero-extended into the 32-bit lanes of h, to four floats; same steps as above.
inline __m128 half_to_float4(__m128i h) {
    const __m128i shifted_exp = _mm_set1_epi32(0x7c00 << 13);
    __m128i o = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x7fff)), 13);
    const __m128i exp = _mm_and_si128(o, shifted_exp);
    o = _mm_add_epi32(o, _mm_set1_epi32((127 - 15) << 23));
    const __m128i infnan = _mm_cmpeq_epi32(exp, shifted_exp);
    const __m128i small = _mm_cmpeq_epi32(exp, _mm_setzero_si128());
    o = _mm_add_epi32(o, _mm_and_si128(infnan, _mm_set1_epi32((128 - 16) << 23)));
    const __m128 renorm = _mm_sub_ps(_mm_castsi128_ps(_mm_add_epi32(o, _mm_set1_epi32(1 << 23))),
                                     _mm_castsi128_ps(_mm_set1_epi32(113 << 23)));
    o = _mm_or_si128(_mm_and_si128(small, _mm_castps_si128(renorm)), _mm_andnot_si128(small, o));
    const __m128i sign = _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x8000)), 16);
    return _mm_castsi128_ps(_mm_or_si128(o, sign));
}
#endif

// A contiguous row of halves to floats. Uses F16C (vcvtph2ps, exact, ignores denormal flushing)
// when the CPU has it, else SSE2, else scalar code: every variant gives the same bits.
void half_row_to_float(const uint16_t* src, float* dst, int64_t n);

// Restricts half_row_to_float to the portable code (for tests of that path); returns the old value.
bool set_half_baseline_only(bool baseline_only);

// Which half conversion half_row_to_float uses now: "f16c", "sse2" or "scalar".
const char* half_conversion();

}  // namespace fastgen
