import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

import fisherext

EXPECTED_OPS = {
    "linear_sq_grad", "linear_outer_accum_", "sym_outer_accum_", "class_gram",  # K1 fisher_accum
    "unflatten_axpy_", "fd_fisher_reduce",  # K2 perturb
    "softmax_hvp", "softmax_hessian_sqrt",  # K3 softmax
    "cg_update_", "cg_direction_", "lissa_update_", "neumann_update_",  # K3 solver updates
}


def test_build_info_reports_versions_and_ops():
    info = fisherext.build_info()
    assert info["version"] == fisherext.__version__
    assert info["torch"] == torch.__version__
    assert EXPECTED_OPS <= set(info["ops"])
    assert isinstance(info["cuda_compiled"], bool)
    assert (info["cuda_arch_list"] is not None) == info["cuda_compiled"]
    assert info["cplusplus"] >= 202002, "torch >= 2.13 needs C++20"


def _nvcc_present():
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    return bool(shutil.which("nvcc") or (home and os.path.exists(os.path.join(home, "bin", "nvcc"))))


@pytest.mark.skipif(os.environ.get("FISHEREXT_CUDA") == "0", reason="CUDA build disabled by FISHEREXT_CUDA=0")
def test_cuda_kernels_compiled_when_toolchain_present():
    """CI runs where nvcc exists: a .cu file that stops compiling must fail the build, and so this test."""
    if torch.version.cuda is None or not _nvcc_present():
        pytest.skip("no CUDA torch or no nvcc: CUDA kernels are not expected")
    info = fisherext.build_info()
    assert info["cuda_compiled"], "CUDA torch and nvcc are present but the CUDA kernels were not built"
    for op in EXPECTED_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fisherext::{op}", "CUDA"), op


def _cuobjdump():
    """cuobjdump from PATH, CUDA_HOME, or the copy triton ships (minimal CUDA toolkits lack one); None without."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [shutil.which("cuobjdump"), os.path.join(home, "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_cuda_binary_holds_the_reported_arch_list():
    """Every entry X.Y of build_info()['cuda_arch_list'] is in the library as sm_XY code, and an X.Y+PTX entry
    also as compute_XY PTX, which the driver compiles for GPUs newer than any listed (and only those)."""
    info = fisherext.build_info()
    if not info["cuda_compiled"]:
        pytest.skip("CUDA kernels not compiled")
    entries = re.split(r"[;\s]+", info["cuda_arch_list"].strip())
    parsed = [re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", e) for e in entries]
    if not all(parsed):
        pytest.skip(f"arch list {info['cuda_arch_list']!r} is not numeric (detected or named architectures)")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    (lib,) = glob.glob(os.path.join(os.path.dirname(fisherext.__file__), "_C*.so"))
    elf, ptx = (subprocess.run([tool, f"--list-{kind}", lib], capture_output=True, text=True).stdout
                for kind in ("elf", "ptx"))
    for m in parsed:
        arch = m[1] + m[2] + m[3]
        assert f".sm_{arch}." in elf, f"no sm_{arch} code for {m[0]!r}:\n{elf}"
        assert (f".sm_{arch}." in ptx) == bool(m[4]), f"PTX for {m[0]!r}: {'missing' if m[4] else 'unexpected'}\n{ptx}"


@pytest.mark.parametrize("op", sorted(EXPECTED_OPS))
def test_every_op_has_cpu_kernel_fake_and_twin(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fisherext::{op}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fisherext::{op}", "Meta")
    twin = op.rstrip("_")
    assert callable(getattr(fisherext.reference, twin))
    assert callable(getattr(fisherext.ops, op))


def test_flatten_unflatten_roundtrip():
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 2)]
    flat = fisherext.flatten(ts)
    assert flat.shape == (21,)
    back = fisherext.unflatten(flat, ts)
    assert all(torch.equal(a, b) for a, b in zip(back, ts))
    with pytest.raises(ValueError, match="'vec'"):
        fisherext.unflatten(flat[:-1], ts)
    with pytest.raises(ValueError, match="'tensors'"):
        fisherext.flatten([])


def test_the_distribution_holds_every_subpackage():
    # A wheel (not only an editable install) must ship fisherext.capture, .curvature, ..., .optim.
    setuptools = pytest.importorskip("setuptools")
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    shipped = set(setuptools.find_packages(root, include=find["include"]))
    package = os.path.dirname(fisherext.__file__)
    on_disk = {os.path.relpath(d, root).replace(os.sep, ".") for d, _, files in os.walk(package)
               if "__init__.py" in files}
    assert on_disk and on_disk <= shipped
