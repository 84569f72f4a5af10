// fastgen._C: host-side image conversions (the hot paths around a model on the CPU).
//
// Buffers come in through the buffer protocol (numpy views of torch tensors, made in Python), so
// this file needs pybind11 only, not the torch C++ API. Every function writes into an output the
// caller allocated (a contiguous tensor's numpy view), releases the GIL, and splits the
// (batch, row) pairs over std::thread workers: one pass over memory, any input strides.
//
// Bit-exactness with the PyTorch reference (fastgen/ops/image.py) is the contract:
// - float -> uint8 repeats the reference's arithmetic: exact conversion to float32, a multiply,
//   then an add (two roundings; the build passes -ffp-contract=off so no FMA), NaN -> 0, clamp,
//   round half to even (the default rounding mode, which PyTorch's round() also uses).
// - uint8 -> float normalisation reads a per-channel table of 256 outputs that Python computes
//   with the reference expression itself, so it is exact by construction.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "fp16.h"
#include "parallel.h"

namespace py = pybind11;
using namespace fastgen;

namespace {

enum class Src { F32, F16, BF16 };

struct Shape4 {
    int64_t d[4];  // sizes
    int64_t s[4];  // strides in bytes (torch never gives negative ones; zero from expand is fine)
};

// ---------------------------------------------------------------------------------------------
// float -> uint8, scalar and generic.

template <Src S>
inline float load1(const char* p) {
    if constexpr (S == Src::F32) {
        float f;
        std::memcpy(&f, p, 4);
        return f;
    } else {
        uint16_t h;
        std::memcpy(&h, p, 2);
        return S == Src::F16 ? half_to_float(h) : bf16_to_float(h);
    }
}

// v = x*127.5 + 127.5, NaN -> 0, clamp to [0, 255], round half to even. For 0 <= v <= 255,
// v + 2^23 has a unit in the last place of exactly 1, so that addition rounds v to an integer
// (half to even) and leaves it in the low mantissa bits. Branch-free, so loops of it vectorise
// (given -fno-trapping-math, which lets GCC if-convert the comparisons; values are unaffected).
inline uint8_t quantize1(float x) {
    float t = x * 127.5f;
    t = t + 127.5f;
    t = t > 0.0f ? t : 0.0f;  // NaN compares false: NaN -> 0
    t = t < 255.0f ? t : 255.0f;
    t = t + 8388608.0f;  // 2^23
    return static_cast<uint8_t>(float_to_bits(t) & 0xFFu);
}

void quantize_row(const float* __restrict src, uint8_t* __restrict dst, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = quantize1(src[i]);
}

// Any channel count and strides: per tile of the row, convert each channel to float32 (gathering
// strided elements), quantize into planar bytes, then interleave into NHWC pixels.
constexpr int64_t kTile = 256;

template <Src S>
void row_generic(const char* row, const Shape4& in, uint8_t* out, float* buf, uint8_t* planes) {
    const int64_t C = in.d[1], W = in.d[3], sC = in.s[1], sW = in.s[3];
    for (int64_t w0 = 0; w0 < W; w0 += kTile) {
        const int64_t len = std::min(kTile, W - w0);
        for (int64_t c = 0; c < C; ++c) {
            const char* p = row + c * sC + w0 * sW;
            for (int64_t i = 0; i < len; ++i) buf[i] = load1<S>(p + i * sW);
            quantize_row(buf, planes + c * kTile, len);
        }
        uint8_t* o = out + w0 * C;
        for (int64_t i = 0; i < len; ++i)
            for (int64_t c = 0; c < C; ++c) o[i * C + c] = planes[c * kTile + i];
    }
}

// ---------------------------------------------------------------------------------------------
// float -> uint8, SSE2 (baseline on every x86-64 CPU, so no dispatch): rows whose width is
// contiguous, with 1, 3 or 4 channels, are converted and interleaved in registers.
#ifdef FASTGEN_SSE2

template <Src S>
inline __m128 load4(const char* p) {
    static_assert(S != Src::F16, "halves are converted a row at a time (half_row_to_float)");
    if constexpr (S == Src::F32) {
        return _mm_loadu_ps(reinterpret_cast<const float*>(p));
    } else {  // bfloat16 is the top half of a float32
        const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));  // 4 x 16 bit
        return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
    }
}

// Four floats -> four int32 in [0, 255], the same steps as quantize1.
inline __m128i quant4(__m128 x) {
    const __m128 k = _mm_set1_ps(127.5f);
    __m128 t = _mm_add_ps(_mm_mul_ps(x, k), k);
    t = _mm_max_ps(t, _mm_setzero_ps());  // maxps returns its second operand when t is NaN
    t = _mm_min_ps(t, _mm_set1_ps(255.0f));
    return _mm_cvtps_epi32(t);  // rounds with the current mode: nearest, ties to even
}

template <Src S>
void row_c1(const char* p, int64_t W, uint8_t* out) {
    constexpr int64_t e = S == Src::F32 ? 4 : 2;
    int64_t i = 0;
    for (; i + 16 <= W; i += 16) {
        const __m128i a = _mm_packs_epi32(quant4(load4<S>(p + i * e)), quant4(load4<S>(p + (i + 4) * e)));
        const __m128i b = _mm_packs_epi32(quant4(load4<S>(p + (i + 8) * e)), quant4(load4<S>(p + (i + 12) * e)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(a, b));
    }
    for (; i < W; ++i) out[i] = quantize1(load1<S>(p + i * e));
}

template <Src S>
void row_c3(const char* p0, const char* p1, const char* p2, int64_t W, uint8_t* out) {
    constexpr int64_t e = S == Src::F32 ? 4 : 2;
    const __m128i lo24 = _mm_set1_epi64x(0x0000000000FFFFFFLL);
    const __m128i hi24 = _mm_set1_epi64x(0x0000FFFFFF000000LL);
    int64_t i = 0;
    // i + 4 < W: each iteration also writes two spare bytes into pixel i + 4, which must exist
    // in this row (the next row may belong to another thread); later stores overwrite them.
    for (; i + 4 < W; i += 4) {
        const __m128i r = quant4(load4<S>(p0 + i * e));
        const __m128i g = quant4(load4<S>(p1 + i * e));
        const __m128i b = quant4(load4<S>(p2 + i * e));
        // 4 pixels 0x00BBGGRR; per 64-bit lane, squeeze two of them into 6 bytes.
        const __m128i px = _mm_or_si128(r, _mm_or_si128(_mm_slli_epi32(g, 8), _mm_slli_epi32(b, 16)));
        const __m128i packed = _mm_or_si128(_mm_and_si128(px, lo24), _mm_and_si128(_mm_srli_epi64(px, 8), hi24));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 3 * i), packed);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out + 3 * i + 6), _mm_srli_si128(packed, 8));
    }
    for (; i < W; ++i) {
        out[3 * i] = quantize1(load1<S>(p0 + i * e));
        out[3 * i + 1] = quantize1(load1<S>(p1 + i * e));
        out[3 * i + 2] = quantize1(load1<S>(p2 + i * e));
    }
}

template <Src S>
void row_c4(const char* p0, const char* p1, const char* p2, const char* p3, int64_t W, uint8_t* out) {
    constexpr int64_t e = S == Src::F32 ? 4 : 2;
    int64_t i = 0;
    for (; i + 4 <= W; i += 4) {
        const __m128i r = quant4(load4<S>(p0 + i * e));
        const __m128i g = _mm_slli_epi32(quant4(load4<S>(p1 + i * e)), 8);
        const __m128i b = _mm_slli_epi32(quant4(load4<S>(p2 + i * e)), 16);
        const __m128i a = _mm_slli_epi32(quant4(load4<S>(p3 + i * e)), 24);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4 * i),
                         _mm_or_si128(_mm_or_si128(r, g), _mm_or_si128(b, a)));  // little-endian: RGBA
    }
    for (; i < W; ++i) {
        out[4 * i] = quantize1(load1<S>(p0 + i * e));
        out[4 * i + 1] = quantize1(load1<S>(p1 + i * e));
        out[4 * i + 2] = quantize1(load1<S>(p2 + i * e));
        out[4 * i + 3] = quantize1(load1<S>(p3 + i * e));
    }
}
#endif  // FASTGEN_SSE2

#ifdef FASTGEN_SSE2
template <Src S>
inline void row_fast(const char* const* p, int64_t C, int64_t W, uint8_t* out) {
    if (C == 1) row_c1<S>(p[0], W, out);
    else if (C == 3) row_c3<S>(p[0], p[1], p[2], W, out);
    else row_c4<S>(p[0], p[1], p[2], p[3], W, out);
}
#endif

// images (N, C, H, W), any strides -> out (N, H, W, C) uint8, C-contiguous.
template <Src S>
void to_uint8_impl(const char* src, const Shape4& in, uint8_t* out, int threads) {
    const int64_t C = in.d[1], H = in.d[2], W = in.d[3];
    const int64_t sN = in.s[0], sH = in.s[2];
#ifdef FASTGEN_SSE2
    const int64_t sC = in.s[1], sW = in.s[3];
    constexpr int64_t e = S == Src::F32 ? 4 : 2;
    // packed: channels-last input (torch.channels_last), whose pixel row is already in output
    // order, so it is one element-wise run of W * C values.
    const bool packed = sC == e && sW == C * e;
    const bool fast = packed || (sW == e && (C == 1 || C == 3 || C == 4));
#else
    constexpr bool fast = false;
#endif
    parallel_rows(in.d[0] * H, W * C, threads, [&](int64_t r0, int64_t r1) {
        // Halves: each channel row is converted to float32 first (F16C where the CPU has it).
        [[maybe_unused]] std::vector<float> rows_f32(fast && S == Src::F16 ? static_cast<size_t>(C * W) : 0);
        std::vector<float> buf(fast ? 0 : static_cast<size_t>(kTile));
        std::vector<uint8_t> planes(fast ? 0 : static_cast<size_t>(kTile * C));
        for (int64_t r = r0; r < r1; ++r) {
            const char* row = src + (r / H) * sN + (r % H) * sH;  // (c=0, w=0) of image r/H, row r%H
            uint8_t* orow = out + r * W * C;
#ifdef FASTGEN_SSE2
            if (packed) {
                if constexpr (S == Src::F16) {
                    half_row_to_float(reinterpret_cast<const uint16_t*>(row), rows_f32.data(), W * C);
                    row_c1<Src::F32>(reinterpret_cast<const char*>(rows_f32.data()), W * C, orow);
                } else {
                    row_c1<S>(row, W * C, orow);
                }
                continue;
            }
            if (fast) {
                const char* p[4];
                for (int64_t c = 0; c < C; ++c) p[c] = row + c * sC;
                if constexpr (S == Src::F16) {
                    for (int64_t c = 0; c < C; ++c) {
                        float* f = rows_f32.data() + c * W;
                        half_row_to_float(reinterpret_cast<const uint16_t*>(p[c]), f, W);
                        p[c] = reinterpret_cast<const char*>(f);
                    }
                    row_fast<Src::F32>(p, C, W, orow);
                } else {
                    row_fast<S>(p, C, W, orow);
                }
                continue;
            }
#endif
            row_generic<S>(row, in, orow, buf.data(), planes.data());
        }
    });
}

// ---------------------------------------------------------------------------------------------
// uint8 NHWC -> NCHW through a per-channel table of 256 outputs (2- or 4-byte words: the output
// dtype's bits). One pass per pixel row: read each pixel once, write the C plane rows.
template <typename T, int C>
void normalize_row(const uint8_t* p, int64_t sW, int64_t sC, int64_t W, const T* lut, T* const* o) {
    if (sW == C && sC == 1) {  // packed pixels: let the compiler see constant offsets
        for (int64_t w = 0; w < W; ++w)
            for (int c = 0; c < C; ++c) o[c][w] = lut[c * 256 + p[w * C + c]];
    } else {
        for (int64_t w = 0; w < W; ++w)
            for (int c = 0; c < C; ++c) o[c][w] = lut[c * 256 + p[w * sW + c * sC]];
    }
}

template <typename T>
void normalize_impl(const uint8_t* src, const Shape4& in, const T* lut, T* out, int threads) {
    const int64_t H = in.d[1], W = in.d[2], C = in.d[3];
    const int64_t sN = in.s[0], sH = in.s[1], sW = in.s[2], sC = in.s[3];
    parallel_rows(in.d[0] * H, W * C, threads, [&](int64_t r0, int64_t r1) {
        std::vector<T*> planes(static_cast<size_t>(C));
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t n = r / H, h = r % H;
            const uint8_t* p = src + n * sN + h * sH;
            for (int64_t c = 0; c < C; ++c) planes[c] = out + ((n * C + c) * H + h) * W;  // (n, c, h, 0)
            switch (C) {
                case 1: normalize_row<T, 1>(p, sW, sC, W, lut, planes.data()); break;
                case 3: normalize_row<T, 3>(p, sW, sC, W, lut, planes.data()); break;
                case 4: normalize_row<T, 4>(p, sW, sC, W, lut, planes.data()); break;
                default:
                    for (int64_t c = 0; c < C; ++c)
                        for (int64_t w = 0; w < W; ++w) planes[c][w] = lut[c * 256 + p[w * sW + c * sC]];
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Python entry points. The Python wrappers validate arguments; these checks only keep a wrong call
// from reading or writing out of bounds.

Shape4 shape_of(const py::array& a, const char* name, py::ssize_t itemsize) {
    if (a.ndim() != 4) throw std::invalid_argument(std::string(name) + ": expected a 4-D array");
    if (a.itemsize() != itemsize)
        throw std::invalid_argument(std::string(name) + ": expected itemsize " + std::to_string(itemsize));
    Shape4 r{};
    for (int i = 0; i < 4; ++i) {
        r.d[i] = a.shape(i);
        r.s[i] = a.strides(i);
        if (r.s[i] < 0) throw std::invalid_argument(std::string(name) + ": negative strides");
    }
    return r;
}

void check_output(const py::array& a, const char* name) {
    if (!(a.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + ": not C-contiguous");
    if (!a.writeable()) throw std::invalid_argument(std::string(name) + ": not writeable");
}

void to_uint8_nhwc(const py::array& images, const std::string& dtype, py::array& out, int threads) {
    Src s;
    if (dtype == "float32") s = Src::F32;
    else if (dtype == "float16") s = Src::F16;
    else if (dtype == "bfloat16") s = Src::BF16;
    else throw std::invalid_argument("dtype: expected float32, float16 or bfloat16");
    const Shape4 in = shape_of(images, "images", s == Src::F32 ? 4 : 2);
    const Shape4 o = shape_of(out, "out", 1);
    check_output(out, "out");
    if (o.d[0] != in.d[0] || o.d[1] != in.d[2] || o.d[2] != in.d[3] || o.d[3] != in.d[1])
        throw std::invalid_argument("out: expected shape (N, H, W, C) of images (N, C, H, W)");
    const char* src = static_cast<const char*>(images.data());
    uint8_t* dst = static_cast<uint8_t*>(out.mutable_data());
    py::gil_scoped_release release;
    if (s == Src::F32) to_uint8_impl<Src::F32>(src, in, dst, threads);
    else if (s == Src::F16) to_uint8_impl<Src::F16>(src, in, dst, threads);
    else to_uint8_impl<Src::BF16>(src, in, dst, threads);
}

void normalize_nchw_lut(const py::array& images, const py::array& lut, py::array& out, int threads) {
    const Shape4 in = shape_of(images, "images", 1);
    const py::ssize_t itemsize = out.itemsize();
    if (itemsize != 2 && itemsize != 4) throw std::invalid_argument("out: expected a 2- or 4-byte dtype");
    const Shape4 o = shape_of(out, "out", itemsize);
    check_output(out, "out");
    if (o.d[0] != in.d[0] || o.d[1] != in.d[3] || o.d[2] != in.d[1] || o.d[3] != in.d[2])
        throw std::invalid_argument("out: expected shape (N, C, H, W) of images (N, H, W, C)");
    if (lut.ndim() != 2 || lut.shape(0) != in.d[3] || lut.shape(1) != 256 || lut.itemsize() != itemsize ||
        !(lut.flags() & py::array::c_style))
        throw std::invalid_argument("lut: expected a C-contiguous (C, 256) array of the output's itemsize");
    const uint8_t* src = static_cast<const uint8_t*>(images.data());
    const void* table = lut.data();
    void* dst = out.mutable_data();
    py::gil_scoped_release release;
    if (itemsize == 2)
        normalize_impl(src, in, static_cast<const uint16_t*>(table), static_cast<uint16_t*>(dst), threads);
    else
        normalize_impl(src, in, static_cast<const uint32_t*>(table), static_cast<uint32_t*>(dst), threads);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastgen host-side kernels (image conversions); the public API is fastgen.ops.";
    m.def("to_uint8_nhwc", &to_uint8_nhwc, py::arg("images"), py::arg("dtype"), py::arg("out"),
          py::arg("threads"),
          "(N, C, H, W) float32, or float16 / bfloat16 passed as int16 bits, any strides -> uint8\n"
          "(N, H, W, C) written into out (C-contiguous). Releases the GIL.");
    m.def("normalize_nchw_lut", &normalize_nchw_lut, py::arg("images"), py::arg("lut"), py::arg("out"),
          py::arg("threads"),
          "uint8 (N, H, W, C), any strides -> (N, C, H, W) written into out (C-contiguous) via a\n"
          "(C, 256) table of out's itemsize. Releases the GIL.");
    m.attr("SIMD") = py::str(
#ifdef FASTGEN_SSE2
        "sse2"
#else
        "none"
#endif
    );
    m.def("half_conversion", &half_conversion, "The half -> float32 code in use: f16c, sse2 or scalar.");
    m.def("set_half_baseline_only", &set_half_baseline_only, py::arg("baseline_only"),
          "Tests only: restrict half -> float32 conversion to the portable code; returns the old value.");
}
