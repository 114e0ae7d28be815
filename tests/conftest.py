"""Fixtures and settings every test folder shares; helpers live in tests/helpers/."""

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers.blocks import BLOCKS

# Property tests (ops/test_random_geometries.py): the same examples on every run unless a profile is chosen
# with --hypothesis-profile=thorough (500 random examples per property).
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci")


@pytest.fixture(params=sorted(BLOCKS))
def block_name(request):
    return request.param
