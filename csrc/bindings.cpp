// pybind11 module sealong_kernels._C: raw device pointers (tensor.data_ptr()) and a CUDA stream handle
// (torch.cuda.current_stream().cuda_stream), so it builds without torch's C++ API and works from any framework.
#include <pybind11/pybind11.h>

#include "mbr.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "sealong CUDA kernels (raw-pointer interface; see kernels/mbr.py for the math)";
  m.def("mbr_scores", &sealong::mbr_scores_launch, pybind11::arg("emb"), pybind11::arg("mask"),
        pybind11::arg("out"), pybind11::arg("B"), pybind11::arg("N"), pybind11::arg("D"),
        pybind11::arg("stride_b"), pybind11::arg("stride_n"), pybind11::arg("stride_d"), pybind11::arg("dtype"),
        pybind11::arg("normalize"), pybind11::arg("include_self"), pybind11::arg("eps"), pybind11::arg("stream"),
        "scores [B, N] float32 into `out` from emb [B, N, D] (dtype 0 float32, 1 float16, 2 bfloat16), "
        "mask uint8 [B, N] or 0; launched on `stream`. Throws ValueError on bad sizes.");
}
