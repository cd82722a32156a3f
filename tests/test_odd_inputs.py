"""Inputs that look like arrays but are not plain ones: subclasses, lazy torch views, dtypes
that cannot be exported. Each is either updated element by element or refused by name."""

from __future__ import annotations

import numpy as np
import pytest

import gpuopt

pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix


def test_matrix_subclass_is_updated_element_by_element():
    m = np.matrix([[1.0, 2.0], [3.0, 4.0]])
    g = np.matrix([[0.5, 1.0], [1.5, 2.0]])
    gpuopt.update(gpuopt.Descent(1.0), m, g)
    assert type(m) is np.matrix
    np.testing.assert_array_equal(np.asarray(m), [[0.5, 1.0], [1.5, 2.0]])
    opt = gpuopt.ADAM(0.1)
    plain, sub = np.arange(4.0).reshape(2, 2), np.matrix(np.arange(4.0).reshape(2, 2))
    for _ in range(3):
        gpuopt.update(opt, [plain, sub], [np.ones((2, 2)) * [[1, 2], [3, 4]], np.matrix([[1.0, 2], [3, 4]])])
    np.testing.assert_array_equal(np.asarray(sub), plain)


def _lazy_torch(kind: str):
    torch = pytest.importorskip("torch")
    z = torch.tensor([1 + 2j, 3 - 4j, 5 + 0.5j])
    if kind == "neg":
        return z.conj().imag  # negative bit set
    if kind == "conj":
        return z.conj()  # conjugate bit set (complex: refused for its dtype as well)
    return torch.ones(3, dtype=torch.int32)


@pytest.mark.parametrize("kind, expected", [("neg", r"neg bit set.*resolve_neg"), ("conj", r"conj bit set"),
                                            ("int32", r"has dtype int32; expected float16")])
@pytest.mark.parametrize("where", ["param", "grad"])
def test_torch_tensors_that_cannot_be_read_as_they_are(kind, expected, where):
    torch = pytest.importorskip("torch")
    odd = _lazy_torch(kind)
    plain = torch.zeros(3)
    params, grads = ([odd], [torch.ones(3)]) if where == "param" else ([plain], [odd])
    name = r"params\[0\]" if where == "param" else r"gradient of params\[0\]"
    with pytest.raises(TypeError, match=rf"^{name} .*{expected}"):
        gpuopt.update(gpuopt.Descent(), params, grads)
    assert torch.equal(plain, torch.zeros(3))
