import pytest

from moray.model import cpu_kernels


@pytest.fixture(params=["amx", "avx512"])
def products(request):
    """Runs a test with the kernels' products on AMX tiles and on the AVX-512 loop (AMX where the
    CPU has it: skipped elsewhere)."""
    if cpu_kernels.kernel() is None:
        pytest.skip("moray's CPU kernels do not build on this machine")
    if request.param == "amx" and not cpu_kernels.amx():
        pytest.skip("this CPU has no AMX")
    before = cpu_kernels.amx()
    cpu_kernels.set_amx(request.param == "amx")
    yield request.param
    cpu_kernels.set_amx(before)
