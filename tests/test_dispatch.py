"""The dispatch policy where CuPy is missing entirely: import, the NumPy path, kernel_source
and the demo all work; GPU objects are refused with a clear TypeError."""

from __future__ import annotations

import subprocess
import sys
import textwrap

WITHOUT_CUPY = textwrap.dedent(
    """
    import sys
    sys.modules["cupy"] = None  # as if CuPy were not installed: `import cupy` fails
    import numpy as np
    import gpuopt
    from gpuopt.dispatch import gpu_available

    assert not gpu_available()
    opt = gpuopt.Optimiser(gpuopt.ClipNorm(1.0), gpuopt.ADAM(0.1))
    x = np.ones(10)
    gpuopt.update(opt, [x], [np.full(10, 0.5)])
    assert np.all(x < 1)
    assert "gpuopt_multi_reduce" in gpuopt.kernel_source(opt, "float16")

    class CudaArray:  # what a torch CUDA tensor looks like to dispatch
        __cuda_array_interface__ = {"shape": (10,), "typestr": "<f4", "data": (0, False), "version": 3}

    try:
        gpuopt.update(opt, CudaArray(), CudaArray())
    except TypeError as error:
        assert "CuPy is not installed" in str(error), error
    else:
        raise AssertionError("a CUDA array without CuPy must be a TypeError")
    print("ok")
    """
)


def test_everything_but_the_gpu_works_without_cupy():
    result = subprocess.run([sys.executable, "-c", WITHOUT_CUPY], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_demo_runs_without_cupy():
    code = "import sys; sys.modules['cupy'] = None; from gpuopt.__main__ import main; " \
           "raise SystemExit(main(['demo', '--steps', '30', '--backend', 'auto']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "final:" in result.stdout
