// The Python bindings of the native kernels (one extension module, built from
// every .cpp in this folder: see ops/native.py).

#include <torch/extension.h>

void interleave_(torch::Tensor dst, torch::Tensor src, c10::optional<torch::Tensor> bias);
void deinterleave_(torch::Tensor dst, torch::Tensor src, c10::optional<torch::Tensor> sum);
void small_blocks_forward_(torch::Tensor y, torch::Tensor x, torch::Tensor w1t,
                           torch::Tensor w2p, c10::optional<torch::Tensor> bias,
                           c10::optional<torch::Tensor> mid);
void small_blocks_grad_x_(torch::Tensor gx, torch::Tensor gh, torch::Tensor g, torch::Tensor w2q,
                          torch::Tensor w1);
void small_blocks_grad_w_(c10::optional<torch::Tensor> gw1t, c10::optional<torch::Tensor> gw2p,
                          torch::Tensor x, torch::Tensor gh, torch::Tensor g, torch::Tensor h,
                          int64_t k, int64_t l, c10::optional<torch::Tensor> colsum);
void few_tokens_forward_(torch::Tensor y, torch::Tensor mid, torch::Tensor x, torch::Tensor w1,
                         torch::Tensor w2, c10::optional<torch::Tensor> bias);
void few_tokens_backward_(torch::Tensor g, torch::Tensor x, torch::Tensor w1, torch::Tensor w2,
                          torch::Tensor mid, c10::optional<torch::Tensor> gx,
                          c10::optional<torch::Tensor> gw1, c10::optional<torch::Tensor> gw2,
                          c10::optional<torch::Tensor> gbias);
void small_blocks_forward_dpbf16_(torch::Tensor y, torch::Tensor x, torch::Tensor w1p,
                                  torch::Tensor w2p, c10::optional<torch::Tensor> bias,
                                  c10::optional<torch::Tensor> mid);
void small_blocks_backward_dpbf16_(c10::optional<torch::Tensor> gx,
                                   c10::optional<torch::Tensor> gw1,
                                   c10::optional<torch::Tensor> gw2p,
                                   c10::optional<torch::Tensor> colsum, torch::Tensor g,
                                   c10::optional<torch::Tensor> x, c10::optional<torch::Tensor> h,
                                   torch::Tensor w2g, torch::Tensor w1g);
void weight_grad_dpbf16_(torch::Tensor c, torch::Tensor a, torch::Tensor bm, bool accumulate);

// Whether the kernels were built with the CPU's bf16 dot products (AVX512-BF16): the
// *_dpbf16_ kernels exist and the few-token bf16 forward multiplies pairs; every
// source is compiled with the same flags.
bool bf16_dot() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_dot", &bf16_dot, "whether the kernels use AVX512-BF16 dot products");
  m.doc() = "Monarch multiply CPU kernels: the stride permutations, small-block and few-token multiplies, bf16 weight gradients";
  m.def("interleave_", &interleave_, "dst[i,j,e,v] = src[i,j,v,e] (+ bias[e*l+v])",
        py::arg("dst"), py::arg("src"), py::arg("bias") = py::none());
  m.def("deinterleave_", &deinterleave_,
        "dst[i,j,v,e] = src[i,j,e,v] (and sum[e*l+v] += src[i,j,e,v] over i, j)",
        py::arg("dst"), py::arg("src"), py::arg("sum") = py::none());
  m.def("small_blocks_forward_", &small_blocks_forward_,
        "y = x M^T (+ bias) for blocks whose q and l are multiples of 16 (small_blocks.cpp)",
        py::arg("y"), py::arg("x"), py::arg("w1t"), py::arg("w2p"), py::arg("bias") = py::none(),
        py::arg("mid") = py::none());
  m.def("small_blocks_grad_x_", &small_blocks_grad_x_,
        "grad_x and grad_h of the small-block multiply (small_blocks.cpp)", py::arg("gx"),
        py::arg("gh"), py::arg("g"), py::arg("w2q"), py::arg("w1"));
  m.def("small_blocks_grad_w_", &small_blocks_grad_w_,
        "adds the weight (and bias) gradients of the small-block multiply (small_blocks.cpp)",
        py::arg("gw1t"), py::arg("gw2p"), py::arg("x"), py::arg("gh"), py::arg("g"), py::arg("h"),
        py::arg("k"), py::arg("l"), py::arg("colsum") = py::none());
  m.def("small_blocks_forward_dpbf16_", &small_blocks_forward_dpbf16_,
        "bf16 small-block forward with bf16 dot products (small_blocks_dpbf16.cpp)", py::arg("y"),
        py::arg("x"), py::arg("w1p"), py::arg("w2p"), py::arg("bias") = py::none(),
        py::arg("mid") = py::none());
  m.def("small_blocks_backward_dpbf16_", &small_blocks_backward_dpbf16_,
        "grad x, the factor gradients and g's column sums of the bf16 dot-product "
        "small-block forward, in one pass (small_blocks_dpbf16.cpp)",
        py::arg("gx"), py::arg("gw1"), py::arg("gw2p"), py::arg("colsum"), py::arg("g"),
        py::arg("x"), py::arg("h"), py::arg("w2g"), py::arg("w1g"));
  m.def("weight_grad_dpbf16_", &weight_grad_dpbf16_,
        "c[b] (= or +=) a[b]^T bm[b], bf16 in, float32 sums (weight_grad_dpbf16.cpp)",
        py::arg("c"), py::arg("a"), py::arg("bm"), py::arg("accumulate"));
  m.def("few_tokens_forward_", &few_tokens_forward_,
        "y = x M^T (+ bias) for up to 16 tokens, mid receives the middle (few_tokens.cpp)",
        py::arg("y"), py::arg("mid"), py::arg("x"), py::arg("w1"), py::arg("w2"),
        py::arg("bias") = py::none());
  m.def("few_tokens_backward_", &few_tokens_backward_,
        "the gradients of few_tokens_forward_ (few_tokens.cpp)", py::arg("g"), py::arg("x"),
        py::arg("w1"), py::arg("w2"), py::arg("mid"), py::arg("gx") = py::none(),
        py::arg("gw1") = py::none(), py::arg("gw2") = py::none(), py::arg("gbias") = py::none());
}
