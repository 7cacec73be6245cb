"""The OpenAPI document is the contract: schemathesis generates requests for every operation of the real app
(tiny models, admin routes on, authenticated) and checks every response: no 5xx, status codes documented,
bodies and content types as documented, invalid data rejected, valid data accepted.

Valid-by-schema data may still be refused for reasons a JSON schema cannot express — a text longer than
the model's max_length with `truncate=false`, `prompts` not pairing up with `query`, both `input` and
`messages` in /classify, an admin path outside the model roots — so 413/422 (and 403/409) count as accepted
answers to positive data; they must still be documented and carry the error body.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from services.reward_api.core.config import Settings
from services.reward_api.main import build_registry, create_app
from services.reward_api.testing import make_tiny_rm

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 80
ADMIN = {"Authorization": "Bearer admin-secret"}
CONFIG = schemathesis.Config.from_str(
    """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "413", "422", "429"]
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "409", "413", "415", "422", "429"]
"""
)


# The app and its OpenAPI document are built at collection without models (cheap: nothing is loaded for a
# default `pytest -m "not slow"` run); the tiny models are made and loaded only when the tests run.
ROOT = Path(tempfile.mkdtemp(prefix="karma-schemathesis-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)
SETTINGS = Settings(
    admin_token="admin-secret",
    model_roots=[str(ROOT)],
    max_client_batch_size=16,
    max_queue_items=4096,
    max_body_bytes=64_000,
    max_wait_ms=0,
)
REGISTRY = build_registry(SETTINGS)
REGISTRY.default = "a"
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(SETTINGS, registry=REGISTRY), config=CONFIG
)


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    for name, variant, seed in (("a", "full", 0), ("b", "context", 1)):
        REGISTRY.load(name, make_tiny_rm(ROOT / name, variant, seed=seed, max_length=48))
    yield
    REGISTRY.close()


SEEN: dict[str, int] = {}


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_api_conforms_to_its_openapi_document(case):
    SEEN[case.operation.label] = SEEN.get(case.operation.label, 0) + 1
    case.call_and_validate(headers=ADMIN)


def test_at_least_1000_generated_cases_ran():
    operations = {op.ok().label for op in schema.get_all_operations()}
    if set(SEEN) != operations:
        pytest.skip("run together with test_api_conforms_to_its_openapi_document")
    assert len(operations) >= 15
    total = sum(SEEN.values())
    print(f"schemathesis: {total} generated cases over {len(operations)} operations: {SEEN}")
    assert total >= 1000, SEEN
