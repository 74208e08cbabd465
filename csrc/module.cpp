// The pybind11 module svd_fast._C. Importing it also runs the TORCH_LIBRARY registrations of every
// csrc/*.cpp and kernels/*.cu file linked into it, which makes torch.ops.svd_fast.* available.
#include <torch/extension.h>

#include "ops.h"

namespace {

bool built_with_cuda() {
#ifdef SVD_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "svd_fast compiled kernels (CPU always, CUDA when built with it)";
  m.def("built_with_cuda", &built_with_cuda, "True when the CUDA kernels were compiled in");

  m.def("group_norm_forward", &svd_fast::group_norm_forward, "GroupNorm(+SiLU) forward",
        py::arg("input"), py::arg("num_groups"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("silu"));
  m.def("group_norm_backward", &svd_fast::group_norm_backward, "GroupNorm(+SiLU) backward",
        py::arg("grad_output"), py::arg("input"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("bias"), py::arg("num_groups"), py::arg("silu"));

  m.def("edm_euler_step", &svd_fast::edm_euler_step, "Fused EDM guidance + v-prediction denoiser + Euler step",
        py::arg("x"), py::arg("model_out_uncond"), py::arg("model_out_cond"), py::arg("sigma"),
        py::arg("sigma_next"), py::arg("guidance"), py::arg("return_denoised"));
  m.def("edm_prepare_model_input", &svd_fast::edm_prepare_model_input,
        "EDM c_in scaling + conditioning concat + CFG batch doubling", py::arg("x"), py::arg("cond_latents"),
        py::arg("sigma"), py::arg("do_cfg"));

  m.def("temporal_attention_forward", &svd_fast::temporal_attention_forward,
        "Fused attention over the frame axis of frame-major q/k/v; returns (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("num_frames"), py::arg("num_heads"), py::arg("scale"));
  m.def("temporal_attention_backward", &svd_fast::temporal_attention_backward,
        "Backward of temporal_attention_forward; returns (grad_q, grad_k, grad_v)", py::arg("grad_out"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("num_frames"), py::arg("num_heads"),
        py::arg("scale"));
}
