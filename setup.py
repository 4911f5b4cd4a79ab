"""Build fisherext._C: CPU kernels always, CUDA kernels when a CUDA torch and nvcc are present.

Environment knobs (printed at build time):
  FISHEREXT_CUDA=0        skip the CUDA kernels (quick CPU-only iterations)
  FORCE_CUDA=1            build the CUDA kernels even if torch or nvcc detection says no
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0+PTX" when no GPU is visible: SASS for A100 and H100/H200, and
                          compute_90 PTX that the driver compiles for any newer GPU
  MAX_JOBS                parallel compile jobs for ninja (default 2)
"""
import glob
import os
import site
import sys

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", "2")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Without a visible GPU: SASS for sm_80 (A100) and sm_90 (H100/H200), plus compute_90 PTX, which the driver
# compiles at load time for any newer GPU (so no GPU fails with "no kernel image is available").
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def log(msg):
    print(f"[fisherext setup] {msg}", file=sys.stderr, flush=True)


def want_cuda():
    if os.environ.get("FISHEREXT_CUDA", "") == "0":
        return False, "FISHEREXT_CUDA=0"
    if os.environ.get("FORCE_CUDA", "") == "1":
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"


def nvidia_wheel_dirs():
    """Headers/libs of the pip nvidia wheels (cuBLAS etc.), for minimal toolkits that lack them."""
    inc, lib = [], []
    for sp in site.getsitepackages():
        for root in glob.glob(os.path.join(sp, "nvidia", "cu*")):
            if os.path.isdir(os.path.join(root, "include")):
                inc.append(os.path.join(root, "include"))
            if os.path.isdir(os.path.join(root, "lib")):
                lib.append(os.path.join(root, "lib"))
    return inc, lib


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    use_cuda, why = want_cuda()
    log(f"torch {torch.__version__}; CUDA kernels: {'yes' if use_cuda else 'no'} ({why})")
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP pragma inlined from ATen's headers: without -fopenmp our kernels
        # compile it away and run on one thread. libgomp resolves to the copy torch has already loaded.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # No --use_fast_math, for any file: it buys nothing where it would be harmless (fisher_accum and the solver
    # updates are multiply-adds, which nvcc contracts to FMAs by default, and loads and stores) and costs
    # accuracy where it would act (approximate exp/log in fd_fisher_reduce and the softmax kernels make the
    # O(eps^2) float32 KLs inexact at small eps; flushing subnormals changes the perturbed parameters).
    nvcc = ["-O3", "-lineinfo"]
    define_macros = []
    include_dirs = [os.path.join(HERE, "csrc")]
    library_dirs = []
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            gpu = torch.cuda.is_available() if torch.version.cuda else False
            if not gpu:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(detected from the visible GPU)")
        log(f"TORCH_CUDA_ARCH_LIST={arch}; MAX_JOBS={os.environ['MAX_JOBS']}")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros += [("FISHEREXT_WITH_CUDA", None), ("FISHEREXT_CUDA_ARCH_LIST", f'"{arch}"')]
        inc, lib = nvidia_wheel_dirs()
        include_dirs += inc
        library_dirs += lib
        cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx, "nvcc": nvcc}
    else:
        cls = cpp_extension.CppExtension
        extra = {"cxx": cxx}
    return cls(
        name="fisherext._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link,
        py_limited_api=False,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
