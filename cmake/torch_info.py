"""Prints what CMakeLists.txt needs to know about the installed torch, one `KEY=value` a line.

Run by CMake with the build interpreter, so the extension is compiled against exactly the
torch that will import it (the reason the build runs with --no-build-isolation).
"""
import glob
import os

import torch

site = os.path.dirname(os.path.dirname(torch.__file__))
# A CUDA torch wheel carries cuBLAS/cuSPARSE/... headers in nvidia/*/include; ATen's CUDA
# headers include them, and a bare CUDA toolkit (as on our CI machine) may lack them.
nvidia_includes = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
print("TORCH_VERSION=" + torch.__version__)
print("TORCH_CUDA_VERSION=" + (torch.version.cuda or ""))
inc = os.path.join(os.path.dirname(torch.__file__), "include")
print("TORCH_INCLUDE_DIRS=" + inc + ";" + os.path.join(inc, "torch", "csrc", "api", "include"))
print("TORCH_LIBRARY_DIR=" + os.path.join(os.path.dirname(torch.__file__), "lib"))
print("TORCH_CXX11_ABI=" + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
print("TORCH_NVIDIA_INCLUDE_DIRS=" + ";".join(nvidia_includes))
