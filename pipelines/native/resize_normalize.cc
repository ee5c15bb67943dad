// KdkitResizeNormalize: a DALI CPU operator that resizes each uint8 HWC image (or a window of it,
// roi_start/roi_end) to size x size with Pillow's bilinear filter (antialiased when shrinking),
// optionally colour-jitters it (brightness/contrast/saturation/hue as fn.color_twist), and writes the
// normalized, optionally mirrored float32/float16 view in CHW or HWC: fn.resize (+ fn.color_twist)
// + fn.crop_mirror_normalize in one pass over the pixels.
//
// Why by hand: DALI's own CPU resampler computes the horizontal pass by gathering every filter tap
// of every output pixel one scalar at a time (dali/kernels/imgproc/resample/resampling_impl_cpu.h)
// and its pass-order cost model weighs that pass like the vectorized vertical one. Profiled on the
// 2-core train pipeline, fn.resize took 45% of all CPU time, twice what Pillow needs for the same
// resize. Neither DALI nor any library usable inside a DALI graph does it faster, and a Python
// callback would serialize the pipeline on the GIL. Here the vertical pass runs over whole rows
// (the compiler vectorizes it), the horizontal pass reads each output pixel's taps as one
// contiguous run, and the pass order minimizes the horizontal work. The filter is Pillow's
// (ImagingResample's precompute_coeffs, triangle of radius max(scale, 1)), which is also what
// fn.resize(interp_type=INTERP_LINEAR, antialias=True) computes away from the borders; at the
// borders the window is cut and renormalized as Pillow does. Values stay float until normalized,
// so there is no intermediate rounding.
//
// Portable build: compiled for the architecture's baseline (no -march=native), so one build runs
// on any CPU of that architecture. On x86 the hot code (filter setup, the two passes, the colour
// transform, the normalization) is compiled twice, for AVX2 + FMA (Haswell, Zen and later) and for
// the baseline (SSE2), and each call takes the version this CPU runs; the float16 conversion uses
// F16C where the CPU has it, else converts one value at a time. The CPU is asked once, with cpuid.
// On an AVX2 CPU the pixels are bit-identical to a -march=native build's. Why not target_clones:
// "arch=x86-64-v3" clones need GCC 12 (GCC 11: "no dispatcher found"; Clang 14 builds them but
// runs the default clone on AVX2 CPUs), "avx2,fma" makes two clones, neither with both, and
// __builtin_cpu_supports("f16c") needs GCC 11 (Clang 14: "invalid cpu feature string").
// Elsewhere (e.g. aarch64) the code is built once, for the baseline, which there has SIMD (NEON).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

// KDKIT_DISPATCH: 1 on x86 (the default), 0 elsewhere; -DKDKIT_DISPATCH=0 builds the baseline code
// only, to check it on a CPU that has AVX2 and F16C.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#ifndef KDKIT_DISPATCH
#define KDKIT_DISPATCH 1
#endif
#else
#undef KDKIT_DISPATCH
#define KDKIT_DISPATCH 0
#endif

#if KDKIT_DISPATCH
#include <cpuid.h>
#endif

#if defined(__GNUC__)
#define KDKIT_INLINE inline __attribute__((always_inline))
#else
#define KDKIT_INLINE inline
#endif

#include "dali/core/float16.h"
#include "dali/pipeline/operator/operator.h"
#include "dali/pipeline/operator/checkpointing/stateless_operator.h"

namespace kdkit {

#if KDKIT_DISPATCH
// What this CPU and OS run, from cpuid (leaf 1: AVX, FMA, F16C, OSXSAVE; leaf 7: AVX2) and xgetbv
// (the OS saves the ymm registers); asked once.
struct Cpu {
  bool avx2_fma = false, f16c = false;

  Cpu() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    const bool fma = c & bit_FMA, f16c_bit = c & bit_F16C;
    if (!(c & bit_OSXSAVE) || !(c & bit_AVX)) return;
    unsigned xcr0_lo, xcr0_hi;
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & 6) != 6) return;  // xmm and ymm state
    f16c = f16c_bit;
    if (__get_cpuid_max(0, nullptr) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    avx2_fma = fma && (b & bit_AVX2);
  }
};

const Cpu &ThisCpu() {
  static const Cpu cpu;
  return cpu;
}

// KDKIT_VERSIONS(name, (params), (args)) defines name(params), which runs the inlined template
// name##Impl(args) compiled for AVX2 + FMA where the CPU has them, else compiled for the baseline.
#define KDKIT_VERSIONS(name, params, args)                                           \
  __attribute__((target("avx2,fma"))) void name##Avx2 params { name##Impl args; } \
  void name params {                                                                 \
    if (ThisCpu().avx2_fma)                                                          \
      name##Avx2 args;                                                               \
    else                                                                             \
      name##Impl args;                                                               \
  }
#else
#define KDKIT_VERSIONS(name, params, args) \
  void name params { name##Impl args; }
#endif

// Filter windows of one axis: output i reads `count[i]` inputs from `start[i]` with `coeffs`.
struct Window {
  std::vector<int> start, count;
  std::vector<float> coeffs;
  std::vector<double> weights;  // one output's taps before normalizing, reused
  int ksize = 0;

  // Output i is centred on roi_start + (i + 0.5) * scale, scale = (roi_end - roi_start) / out_size,
  // in input pixels; the filter may reach outside the window (as resizing the whole image and then
  // cropping does), not outside the image.
  void Init(int in_size, int out_size, bool antialias, double roi_start, double roi_end);

  KDKIT_INLINE void InitImpl(int in_size, int out_size, bool antialias, double roi_start, double roi_end) {
    const double scale = (roi_end - roi_start) / out_size;
    const double filterscale = antialias ? std::max(scale, 1.0) : 1.0;
    const double support = filterscale;  // the triangle's radius is 1 input pixel, scaled
    ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
    weights.resize(ksize);
    start.assign(out_size, 0);
    count.assign(out_size, 0);
    coeffs.assign(static_cast<size_t>(out_size) * ksize, 0.0f);
    for (int i = 0; i < out_size; i++) {
      const double center = roi_start + (i + 0.5) * scale;
      int lo = static_cast<int>(std::floor(center - support + 0.5));
      lo = std::min(std::max(lo, 0), in_size - 1);
      int hi = std::min(static_cast<int>(std::floor(center + support + 0.5)), in_size);
      int n = std::max(std::min(hi - lo, ksize), 1);
      float *k = &coeffs[static_cast<size_t>(i) * ksize];
      double *w = weights.data(), total = 0;
      for (int t = 0; t < n; t++) {
        const double d = (t + lo - center + 0.5) / filterscale;
        w[t] = std::max(0.0, 1.0 - std::abs(d));
        total += w[t];
      }
      if (total <= 0) {  // a window entirely outside the image: repeat the nearest edge pixel
        std::fill(w, w + n, 0.0);
        w[center < lo ? 0 : n - 1] = 1.0;
        total = 1.0;
      }
      start[i] = lo;
      count[i] = n;
      for (int t = 0; t < n; t++) k[t] = static_cast<float>(w[t] / total);
    }
  }

  int64_t Taps(int64_t rows) const {
    int64_t sum = 0;
    for (int c : count) sum += c;
    return sum * rows;
  }
};

// the filter setup runs per sample and axis: a few % of the time on small images
KDKIT_INLINE void InitWindowImpl(Window &win, int in_size, int out_size, bool antialias, double lo, double hi) {
  win.InitImpl(in_size, out_size, antialias, lo, hi);
}
KDKIT_VERSIONS(InitWindow, (Window &win, int in_size, int out_size, bool antialias, double lo, double hi),
               (win, in_size, out_size, antialias, lo, hi))

void Window::Init(int in_size, int out_size, bool antialias, double roi_start, double roi_end) {
  InitWindow(*this, in_size, out_size, antialias, roi_start, roi_end);
}

// The loops below are templates inlined into each version that KDKIT_VERSIONS makes of them, so
// that each version compiles its own copy of the loop for its instruction set.

// out (out_h, row_len) = vertical resampling of in (in_h rows of row_len values, `stride` values
// apart: a window of a wider image); contiguous rows, vectorizable.
template <typename In>
KDKIT_INLINE void ResampleRowsImpl(const In *in, int64_t row_len, int64_t stride, float *out, const Window &win) {
  const int out_h = static_cast<int>(win.start.size());
  for (int y = 0; y < out_h; y++) {
    float *o = out + y * row_len;
    const float *k = &win.coeffs[static_cast<size_t>(y) * win.ksize];
    const In *r = in + win.start[y] * stride;
    const float w0 = k[0];
    for (int64_t i = 0; i < row_len; i++) o[i] = w0 * static_cast<float>(r[i]);
    for (int t = 1; t < win.count[y]; t++) {
      r += stride;
      const float w = k[t];
      for (int64_t i = 0; i < row_len; i++) o[i] += w * static_cast<float>(r[i]);
    }
  }
}

KDKIT_VERSIONS(ResampleRows, (const uint8_t *in, int64_t row_len, int64_t stride, float *out, const Window &win),
               (in, row_len, stride, out, win))
KDKIT_VERSIONS(ResampleRows, (const float *in, int64_t row_len, int64_t stride, float *out, const Window &win),
               (in, row_len, stride, out, win))

// out (rows, out_w, 3) = horizontal resampling of in (rows of in_w x 3 values, `stride` values apart);
// each tap run is contiguous.
template <typename In>
KDKIT_INLINE void ResampleColsImpl(const In *in, int rows, int64_t stride, float *out, const Window &win) {
  const int out_w = static_cast<int>(win.start.size());
  for (int y = 0; y < rows; y++) {
    const In *r = in + static_cast<int64_t>(y) * stride;
    float *o = out + static_cast<int64_t>(y) * out_w * 3;
    for (int x = 0; x < out_w; x++) {
      const float *k = &win.coeffs[static_cast<size_t>(x) * win.ksize];
      const In *p = r + win.start[x] * 3;
      float a0 = 0, a1 = 0, a2 = 0;
      for (int t = 0; t < win.count[x]; t++, p += 3) {
        const float w = k[t];
        a0 += w * static_cast<float>(p[0]);
        a1 += w * static_cast<float>(p[1]);
        a2 += w * static_cast<float>(p[2]);
      }
      o[3 * x] = a0;
      o[3 * x + 1] = a1;
      o[3 * x + 2] = a2;
    }
  }
}

KDKIT_VERSIONS(ResampleCols, (const uint8_t *in, int rows, int64_t stride, float *out, const Window &win),
               (in, rows, stride, out, win))
KDKIT_VERSIONS(ResampleCols, (const float *in, int rows, int64_t stride, float *out, const Window &win),
               (in, rows, stride, out, win))

// out = (px - mean) * inv_std, size x size x 3 interleaved in, CHW (planar) or HWC out, mirrored
KDKIT_INLINE void NormalizeImpl(const float *px, int size, bool planar, bool mirror, const float *mean,
                                const float *inv_std, float *out) {
  const int64_t plane = static_cast<int64_t>(size) * size;
  // out index of output column x in a row: x, or size - 1 - x mirrored; `step` elements apart
  const int64_t step = planar ? 1 : 3;
  for (int y = 0; y < size; y++) {
    const float *row = px + static_cast<int64_t>(y) * size * 3;
    for (int c = 0; c < 3; c++) {
      float *dst = planar ? out + c * plane + static_cast<int64_t>(y) * size
                          : out + static_cast<int64_t>(y) * size * 3 + c;
      const float m = mean[c], s = inv_std[c];
      if (mirror) {
        for (int x = 0; x < size; x++) dst[(size - 1 - x) * step] = (row[3 * x + c] - m) * s;
      } else {
        for (int x = 0; x < size; x++) dst[x * step] = (row[3 * x + c] - m) * s;
      }
    }
  }
}

KDKIT_VERSIONS(Normalize, (const float *px, int size, bool planar, bool mirror, const float *mean,
                           const float *inv_std, float *out), (px, size, planar, mirror, mean, inv_std, out))

// fn.color_twist's transform: out = clamp(M x + offset) with
// M = brightness * contrast * YIQ->RGB * hue rotation * diag(1, saturation, saturation) * RGB->YIQ, the hue
// rotation turning the (I, Q) plane by `hue` degrees as color_twist.h's hue_mat does, and
// offset = (128 - 128 * contrast) * brightness (dali/operators/image/color/color_twist.h), kept in
// float here; fn.color_twist rounds its uint8 result.
struct Color {
  float m[9];
  float offset;
  bool identity;

  Color(float brightness, float contrast, float saturation, float hue) {
    static const double rgb2yiq[9] = {.299, .587, .114, .596, -.274, -.321, .211, -.523, .311};
    static const std::array<double, 9> yiq2rgb = Inverse(rgb2yiq);  // as color_twist.h: inverse(Rgb2Yiq)
    const double rad = hue * M_PI / 180, cs = std::cos(rad), sn = std::sin(rad);
    // hue rotation times saturation scale, in YIQ: rows (Y, I, Q)
    const double hs[9] = {1, 0, 0, 0, cs * saturation, sn * saturation, 0, -sn * saturation, cs * saturation};
    double t[9];  // hs * rgb2yiq
    for (int r = 0; r < 3; r++)
      for (int c = 0; c < 3; c++) {
        t[r * 3 + c] = 0;
        for (int k = 0; k < 3; k++) t[r * 3 + c] += hs[r * 3 + k] * rgb2yiq[k * 3 + c];
      }
    for (int r = 0; r < 3; r++)
      for (int c = 0; c < 3; c++) {
        double v = 0;
        for (int k = 0; k < 3; k++) v += yiq2rgb[r * 3 + k] * t[k * 3 + c];
        m[r * 3 + c] = static_cast<float>(v * brightness * contrast);
      }
    offset = (128.0f - 128.0f * contrast) * brightness;
    identity = brightness == 1.0f && contrast == 1.0f && saturation == 1.0f && hue == 0.0f;
  }

  void Apply(float *px, int64_t pixels) const;

  static std::array<double, 9> Inverse(const double *a) {  // of a 3x3 matrix, by cofactors
    std::array<double, 9> inv;
    for (int r = 0; r < 3; r++)
      for (int c = 0; c < 3; c++) {
        const int r1 = (c + 1) % 3, r2 = (c + 2) % 3, c1 = (r + 1) % 3, c2 = (r + 2) % 3;
        inv[r * 3 + c] = a[r1 * 3 + c1] * a[r2 * 3 + c2] - a[r1 * 3 + c2] * a[r2 * 3 + c1];
      }
    const double det = a[0] * inv[0] + a[1] * inv[3] + a[2] * inv[6];
    for (double &v : inv) v /= det;
    return inv;
  }
};

KDKIT_INLINE void ColorTransformImpl(const float *m, float offset, float *px, int64_t pixels) {
  for (int64_t i = 0; i < pixels; i++, px += 3) {
    const float r = px[0], g = px[1], b = px[2];
    px[0] = std::min(std::max(m[0] * r + m[1] * g + m[2] * b + offset, 0.0f), 255.0f);
    px[1] = std::min(std::max(m[3] * r + m[4] * g + m[5] * b + offset, 0.0f), 255.0f);
    px[2] = std::min(std::max(m[6] * r + m[7] * g + m[8] * b + offset, 0.0f), 255.0f);
  }
}

KDKIT_VERSIONS(ColorTransform, (const float *m, float offset, float *px, int64_t pixels), (m, offset, px, pixels))

void Color::Apply(float *px, int64_t pixels) const {
  if (!identity) ColorTransform(m, offset, px, pixels);
}

#if KDKIT_DISPATCH
// float -> float16 with F16C, 8 at a time; returns how many it converted (a multiple of 8)
__attribute__((target("avx,f16c"))) int64_t ToHalfF16C(const float *in, int64_t n, ::dali::float16 *out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i *>(out + i), h);
  }
  return i;
}
#endif

// float -> float16 (round to nearest even), with the CPU's conversion instruction where it has
// one; dali::float16's scalar conversion is several times slower and converts the rest.
inline void ToHalf(const float *in, int64_t n, ::dali::float16 *out) {
  int64_t i = 0;
#if KDKIT_DISPATCH
  if (ThisCpu().f16c) i = ToHalfF16C(in, n, out);
#endif
  for (; i < n; i++) out[i] = static_cast<::dali::float16>(in[i]);
}

// Stateless: no state of its own, so pipelines with enable_checkpointing=True (exact resume) accept it
class ResizeNormalize : public ::dali::StatelessOperator<::dali::CPUBackend> {
 public:
  explicit ResizeNormalize(const ::dali::OpSpec &spec)
      : ::dali::StatelessOperator<::dali::CPUBackend>(spec),
        size_(spec.GetArgument<int>("size")),
        antialias_(spec.GetArgument<bool>("antialias")),
        planar_(spec.GetArgument<bool>("planar")),
        half_(spec.GetArgument<bool>("half")) {
    auto mean = spec.GetRepeatedArgument<float>("mean");
    auto stddev = spec.GetRepeatedArgument<float>("std");
    DALI_ENFORCE(size_ > 0, "size must be positive");
    DALI_ENFORCE(mean.size() == 3 && stddev.size() == 3, "mean and std need 3 values (R, G, B)");
    for (int c = 0; c < 3; c++) {
      DALI_ENFORCE(stddev[c] != 0, "std values must be non-zero");
      mean_[c] = mean[c];
      inv_std_[c] = 1.0f / stddev[c];
    }
  }

 protected:
  bool SetupImpl(std::vector<::dali::OutputDesc> &output_desc, const ::dali::Workspace &ws) override {
    const auto &input = ws.Input<::dali::CPUBackend>(0);
    DALI_ENFORCE(input.type() == DALI_UINT8, "expected uint8 images");
    const auto &shape = input.shape();
    DALI_ENFORCE(shape.sample_dim() == 3, "expected HWC images");
    const int n = shape.num_samples();
    const bool boxes = spec_.HasTensorArgument("boxes");
    if (boxes) {
      for (const char *name : {"roi_start", "roi_end", "mirror", "brightness", "contrast", "saturation", "hue"})
        DALI_ENFORCE(!spec_.ArgumentDefined(name),
                     ::dali::make_string(name, " with boxes: give it in the boxes' columns (flip, colour) or not at all"));
      const auto &arg = ws.ArgumentInput("boxes");
      DALI_ENFORCE(arg.type() == DALI_FLOAT && arg.shape().sample_dim() == 2,
                   "boxes must be float (N, 5) or (N, 9) per sample");
    }
    ::dali::TensorListShape<> out_shape(n, boxes ? 4 : 3);
    for (int i = 0; i < n; i++) {
      auto s = shape.tensor_shape_span(i);
      DALI_ENFORCE(s[2] == 3, ::dali::make_string("expected 3 channels, got ", s[2]));
      DALI_ENFORCE(s[0] > 0 && s[1] > 0, "empty image");
      ::dali::TensorShape<> view = planar_ ? ::dali::TensorShape<>{3, size_, size_} : ::dali::TensorShape<>{size_, size_, 3};
      if (boxes) view = ::dali::shape_cat(Boxes(ws, i, static_cast<int>(s[0]), static_cast<int>(s[1])).size(), view);
      out_shape.set_tensor_shape(i, view);
    }
    output_desc.resize(1);
    output_desc[0] = {out_shape, half_ ? DALI_FLOAT16 : DALI_FLOAT};
    return true;
  }

  void RunImpl(::dali::Workspace &ws) override {
    const auto &input = ws.Input<::dali::CPUBackend>(0);
    auto &output = ws.Output<::dali::CPUBackend>(0);
    const bool boxes = spec_.HasTensorArgument("boxes");
    output.SetLayout(::dali::TensorLayout(boxes ? "F" : "") + (planar_ ? "CHW" : "HWC"));
    auto &pool = ws.GetThreadPool();
    const auto &shape = input.shape();
    const int64_t view_bytes = int64_t{3} * size_ * size_ * (half_ ? 2 : 4);
    const bool has_roi = spec_.ArgumentDefined("roi_start") || spec_.ArgumentDefined("roi_end");
    for (int i = 0; i < shape.num_samples(); i++) {
      auto s = shape.tensor_shape_span(i);
      const int h = static_cast<int>(s[0]), w = static_cast<int>(s[1]);
      const auto *in = static_cast<const uint8_t *>(input.raw_tensor(i));
      auto *out = static_cast<uint8_t *>(output.raw_mutable_tensor(i));
      if (boxes) {  // one work item per view: a batch of B samples keeps the threads busy with B x N views
        int v = 0;
        for (const Box &b : Boxes(ws, i, h, w)) {
          const uint8_t *origin = in + (static_cast<int64_t>(b.y) * w + b.x) * 3;
          Roi roi{0.0, 0.0, static_cast<double>(b.h), static_cast<double>(b.w)};
          void *dst = out + v++ * view_bytes;
          pool.AddWork([this, origin, b, w, roi, dst](int) {
            Sample(origin, b.h, b.w, int64_t{w} * 3, roi, b.color, b.mirror, dst);
          }, static_cast<int64_t>(b.h) * b.w);
        }
        continue;
      }
      const bool mirror = spec_.GetArgument<int>("mirror", &ws, i) != 0;
      Roi roi{0.0, 0.0, static_cast<double>(h), static_cast<double>(w)};
      if (has_roi) {
        auto lo = RoiArg(ws, "roi_start", i, {0.0f, 0.0f});
        auto hi = RoiArg(ws, "roi_end", i, {static_cast<float>(h), static_cast<float>(w)});
        roi = {lo[0], lo[1], hi[0], hi[1]};
        DALI_ENFORCE(roi.y1 > roi.y0 && roi.x1 > roi.x0,
                     ::dali::make_string("sample ", i, ": roi_end must be beyond roi_start"));
      }
      const Color color(spec_.GetArgument<float>("brightness", &ws, i), spec_.GetArgument<float>("contrast", &ws, i),
                        spec_.GetArgument<float>("saturation", &ws, i), spec_.GetArgument<float>("hue", &ws, i));
      pool.AddWork([this, in, out, h, w, roi, color, mirror](int) {
        Sample(in, h, w, int64_t{w} * 3, roi, color, mirror, out);
      }, static_cast<int64_t>(h) * w);
    }
    pool.RunAll();
  }

 private:
  struct Roi {
    double y0, x0, y1, x1;  // in input pixels
  };

  // One view of `boxes`: an integer pixel window of the image, its flip and colour factors.
  struct Box {
    int x, y, w, h;
    bool mirror;
    Color color;
  };

  // Sample i's boxes: rows (x, y, w, h, flip[, brightness, contrast, saturation, hue]), each window
  // whole pixels inside the h x w image.
  std::vector<Box> Boxes(const ::dali::Workspace &ws, int i, int h, int w) const {
    const auto &arg = ws.ArgumentInput("boxes");
    auto s = arg.shape().tensor_shape_span(i);
    const int64_t cols = s[1];
    DALI_ENFORCE(cols == 5 || cols == 9, ::dali::make_string("sample ", i, ": boxes must have 5 or 9 columns, got ", cols));
    const float *p = arg.tensor<float>(i);
    std::vector<Box> out;
    for (int64_t r = 0; r < s[0]; r++, p += cols) {
      const int x = static_cast<int>(p[0]), y = static_cast<int>(p[1]), bw = static_cast<int>(p[2]),
                bh = static_cast<int>(p[3]);
      DALI_ENFORCE(x == p[0] && y == p[1] && bw == p[2] && bh == p[3] && x >= 0 && y >= 0 && bw >= 1 && bh >= 1 &&
                   x + bw <= w && y + bh <= h,
                   ::dali::make_string("sample ", i, " box ", r, ": (", p[0], ", ", p[1], ", ", p[2], ", ", p[3],
                                       ") is not a window of whole pixels inside the ", w, " x ", h, " image"));
      out.push_back({x, y, bw, bh, p[4] > 0.5f,
                     cols == 9 ? Color(p[5], p[6], p[7], p[8]) : Color(1.0f, 1.0f, 1.0f, 0.0f)});
    }
    return out;
  }

  // (y, x) of a per-sample or constant 2-element argument, or `fallback` when not given
  std::array<double, 2> RoiArg(const ::dali::Workspace &ws, const char *name, int sample,
                               std::array<float, 2> fallback) const {
    std::vector<float> v;
    if (spec_.HasTensorArgument(name)) {
      const auto &arg = ws.ArgumentInput(name);
      DALI_ENFORCE(arg.type() == DALI_FLOAT && arg.shape().tensor_size(sample) == 2,
                   ::dali::make_string(name, " must be 2 floats (y, x) per sample"));
      const float *p = arg.tensor<float>(sample);
      v = {p[0], p[1]};
    } else if (spec_.ArgumentDefined(name)) {
      v = spec_.GetRepeatedArgument<float>(name);
      DALI_ENFORCE(v.size() == 2, ::dali::make_string(name, " must be 2 floats (y, x)"));
    } else {
      v = {fallback[0], fallback[1]};
    }
    return {v[0], v[1]};
  }

  // in: an h x w image whose rows are `stride` values apart (a box of a wider image starts at its
  // top-left pixel: the same windows, taps and sums as the box cut out first, so the same pixels)
  void Sample(const uint8_t *in, int h, int w, int64_t stride, Roi roi, const Color &color, bool mirror,
              void *out) const {
    thread_local Window wy, wx;
    thread_local std::vector<float> tmp, px;
    wy.Init(h, size_, antialias_, roi.y0, roi.y1);
    wx.Init(w, size_, antialias_, roi.x0, roi.x1);
    px.resize(static_cast<size_t>(size_) * size_ * 3);
    // The horizontal pass costs several times the vertical one per tap: run it on fewer rows.
    const int64_t rows_first = wy.Taps(int64_t{w} * 3) + 4 * wx.Taps(size_) * 3;  // vertical first
    const int64_t cols_first = 4 * wx.Taps(h) * 3 + wy.Taps(int64_t{size_} * 3);  // horizontal first
    if (rows_first <= cols_first) {
      tmp.resize(static_cast<size_t>(size_) * w * 3);
      ResampleRows(in, int64_t{w} * 3, stride, tmp.data(), wy);
      ResampleCols(tmp.data(), size_, int64_t{w} * 3, px.data(), wx);
    } else {
      tmp.resize(static_cast<size_t>(h) * size_ * 3);
      ResampleCols(in, h, stride, tmp.data(), wx);
      ResampleRows(tmp.data(), int64_t{size_} * 3, int64_t{size_} * 3, px.data(), wy);
    }
    color.Apply(px.data(), static_cast<int64_t>(size_) * size_);
    if (!half_) {
      Normalize(px.data(), size_, planar_, mirror, mean_, inv_std_, static_cast<float *>(out));
      return;
    }
    thread_local std::vector<float> norm;
    norm.resize(px.size());
    Normalize(px.data(), size_, planar_, mirror, mean_, inv_std_, norm.data());
    ToHalf(norm.data(), static_cast<int64_t>(norm.size()), static_cast<::dali::float16 *>(out));
  }

  int size_;
  bool antialias_, planar_, half_;
  float mean_[3], inv_std_[3];
};

}  // namespace kdkit

DALI_REGISTER_OPERATOR(KdkitResizeNormalize, ::kdkit::ResizeNormalize, ::dali::CPU);

DALI_SCHEMA(KdkitResizeNormalize)
    .DocStr(R"(Resizes uint8 HWC images to size x size with Pillow's bilinear filter (antialiased when
shrinking unless antialias=False) and normalizes them: (x - mean) / std, mirrored horizontally where
`mirror` is 1, as float32 (or float16 with half=True) in CHW (planar=True) or HWC layout.)")
    .NumInput(1)
    .NumOutput(1)
    .AddArg("size", "Output height and width.", DALI_INT32)
    .AddOptionalArg("mean", "Per-channel mean, in 0..255 units.", std::vector<float>{0.f, 0.f, 0.f})
    .AddOptionalArg("std", "Per-channel standard deviation, in 0..255 units.", std::vector<float>{1.f, 1.f, 1.f})
    .AddOptionalArg("mirror", "Mirror horizontally (per sample: 0 or 1).", 0, true)
    .AddOptionalArg<std::vector<float>>("roi_start", "(y, x) of the window to resize, in input pixels (default 0, 0).",
                                        nullptr, true)
    .AddOptionalArg<std::vector<float>>("roi_end", "(y, x) where the window ends, in input pixels (default: H, W).",
                                        nullptr, true)
    .AddOptionalArg("brightness", "Per-sample brightness factor, applied after resizing as fn.color_twist does.",
                    1.0f, true)
    .AddOptionalArg("contrast", "Per-sample contrast factor (around grey 128), as fn.color_twist.", 1.0f, true)
    .AddOptionalArg("saturation", "Per-sample saturation factor (YIQ chroma scale), as fn.color_twist.", 1.0f, true)
    .AddOptionalArg("hue", "Per-sample hue change in degrees (a rotation of YIQ's I-Q plane), as fn.color_twist.",
                    0.0f, true)
    .AddOptionalArg("antialias", "Widen the filter when shrinking, as Pillow and torchvision do.", true)
    .AddOptionalArg("planar", "CHW output; HWC when false.", true)
    .AddOptionalArg("half", "float16 output instead of float32.", false)
    .AddOptionalArg<std::vector<float>>(
        "boxes",
        "Per sample, N rows (x, y, w, h, flip[, brightness, contrast, saturation, hue]): N views cut from the "
        "image, each window in whole input pixels, resized as if cut out first, mirrored where flip > 0.5, "
        "colour-jittered by its own factors; the output is then (N, ...) per sample. Replaces roi_start, "
        "roi_end, mirror and the colour arguments.",
        nullptr, true);
