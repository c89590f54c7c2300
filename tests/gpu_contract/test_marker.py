"""The folder's marker reaches its tests (so `pytest -m gpu_contract` selects them)."""


def test_tests_here_carry_the_gpu_contract_marker(request):
    assert request.node.get_closest_marker("gpu_contract") is not None
